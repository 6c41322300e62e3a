"""Per-trajectory cache state, and the controller that tracks which denoising step the model is at."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from diffsparse.backbones.registry import (
    CROSS_ATTN,
    IMAGE,
    JOINT_ATTN,
    MODULE,
    PARALLEL_BLOCK,
    SELF_ATTN,
    BackboneSpec,
    UnitInfo,
)
from diffsparse.cache.forecast import factor_bytes
from diffsparse.cache.rows import may_write_in_place, put_rows
from diffsparse.cache.selectors import ENTROPY, INFLUENCE, TokenSelector
from diffsparse.levels import ACTIONS, fresh_tokens
from diffsparse.schedule import Schedule, ScheduleError

logger = logging.getLogger(__name__)

_SIGNAL_OF_KIND = {SELF_ATTN: INFLUENCE, CROSS_ATTN: ENTROPY, JOINT_ATTN: ENTROPY, PARALLEL_BLOCK: ENTROPY}


def signal_of(unit: UnitInfo) -> str | None:
    """The attention signal a unit's full compute can give the selector: self-attention influence, or the image
    queries' entropy over the text (cross-attention; FLUX's joint attention and single-stream blocks)."""
    if unit.kind == JOINT_ATTN and unit.stream != IMAGE:
        return None
    return _SIGNAL_OF_KIND.get(unit.kind)


@dataclass
class TrajectoryState:
    """Everything one sampling trajectory caches. A new trajectory starts from a fresh one."""

    step: int = -1
    last_timestep: float | None = None
    finished: bool = False  # the schedule's last step ran; the cache is already freed
    grid: tuple[int, ...] | None = None
    cfg: bool = False
    input_shape: tuple | None = None  # shapes the grid and `cfg` were worked out from (`_input_shape`)
    cache: dict[int, torch.Tensor] = field(default_factory=dict)  # unit -> its last output (B, N, D)
    last_fresh: dict[int, torch.Tensor] = field(default_factory=dict)  # unit -> step each token was last computed
    full_at: dict[int, int] = field(default_factory=dict)  # unit -> the step of its last full compute, while no
    # token has been computed since (then every token's last_fresh is that step: the forecast's fast path)
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # unit -> input when each token was computed
    signals: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (block, signal) -> (B, N)
    shapes: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # unit -> (batch, tokens, context tokens)
    # forecast history (forecast.py): unit -> its divided differences; unit -> step of each token's computation before
    factors: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    prev_fresh: dict[int, torch.Tensor] = field(default_factory=dict)
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # unit -> (keys, values): reuse_kv
    saw_inference_mode: bool = False  # some forward of this trajectory ran in inference mode
    in_place: bool = False  # `put_rows` may write in place at this forward (`may_write_in_place`)

    def reset(self) -> None:
        self.__init__()

    def store_full(self, unit: int, out: torch.Tensor, x: torch.Tensor, keep_inputs: bool, context: int = 0) -> None:
        """Record unit `unit`'s output `out` on all its tokens (input `x`; `context`: its key/value tokens from the
        other stream or the text, for MAC accounting)."""
        self.cache[unit] = out
        self.shapes[unit] = (out.shape[0], out.shape[1], context)
        self.last_fresh[unit] = torch.full(out.shape[:2], self.step, dtype=torch.int32, device=out.device)
        self.full_at[unit] = self.step
        if keep_inputs:
            self.inputs[unit] = x

    def store_partial(self, unit: int, cache, idx: torch.Tensor, rows: torch.Tensor, x_fresh, keep_inputs: bool):
        self.cache[unit] = cache
        self.last_fresh[unit] = self.last_fresh[unit].scatter(1, idx, self.step)
        self.full_at.pop(unit, None)
        if keep_inputs:
            self.inputs[unit] = put_rows(self.inputs[unit], rows, x_fresh, self.in_place)


@dataclass(frozen=True)
class TrajectoryRecord:
    """What a trajectory did, kept when it ends (for `token_cache_summary`).

    Attributes:
        context: the pipeline's cache context (`"cond"`, `"uncond"`) or `"default"`.
        steps: the steps it ran.
        plan: the sparsity of each unit at each step it ran.
        shapes: unit -> (batch, tokens, context tokens) at its last full compute.
        forecast_bytes: unit -> the extra memory its forecast history held (factors and step records), in bytes.
    """

    context: str
    steps: int
    plan: tuple[tuple[float, ...], ...]
    shapes: dict[int, tuple[int, int, int]]
    forecast_bytes: dict[int, int] = field(default_factory=dict)


class TokenCacheController:
    """Shared by the hooks of one model: the plan (sparsity per step and unit), the selector, and the states.

    States are kept per pipeline cache context (`"cond"` / `"uncond"` for pipelines that run the two CFG branches
    as separate calls), or under `"default"`.
    """

    def __init__(
        self,
        spec: BackboneSpec,
        units: list[UnitInfo],
        schedule: Schedule,
        selector: TokenSelector,
        cfg,
        forecast_order: int = 1,
        forecast_dtype: torch.dtype | None = torch.float32,
        reuse_kv: bool = False,
    ):
        schedule.check_units([u.name for u in units])
        missing = [s for s in selector.signals if s not in {signal_of(u) for u in units}]
        if missing:
            raise ValueError(
                f"Selector {selector.name!r} weights signal(s) {missing} but {spec.name} has no unit that produces "
                "them (influence comes from self-attention, entropy from cross-attention or FLUX's joint attention): "
                "set their weight to 0."
            )
        self.spec = spec
        self.units = units
        self.schedule = schedule
        self.selector = selector
        self.cfg_mode = cfg
        self.forecast_order = forecast_order
        self.forecast_dtype = forecast_dtype  # None: the model's dtype
        self.choice: torch.Tensor | None = None  # (T, U, |A|) soft choice: training mode (see blend.py)
        self.reuse_kv = [reuse_kv and u.kind == SELF_ATTN and u.runner == MODULE for u in units]
        self._set_plans(schedule)
        self.states: dict[str, TrajectoryState] = {}
        self.current: TrajectoryState | None = None
        self.paused = False
        self._warned_short: set[int] = set()  # step counts of short trajectories already warned about
        self.last_trajectory: TrajectoryRecord | None = None

    def set_schedule(self, schedule: Schedule, choice: torch.Tensor | None = None) -> None:
        """Switch to `schedule` between trajectories; with `choice` (its straight-through one-hot), training mode."""
        schedule.check_units([u.name for u in self.units])
        if choice is not None and tuple(choice.shape[:2]) != schedule.grid.shape:
            raise ValueError(f"choice {tuple(choice.shape)} does not match the schedule {schedule.grid.shape}")
        self.reset()
        self.choice = choice
        self._set_plans(schedule)

    def _set_plans(self, schedule: Schedule) -> None:
        """Plans of the schedule: sparsities, forecast modes, and which units keep a forecast history (those that
        forecast somewhere; every unit in training mode over all actions, where any may be chosen)."""
        self.schedule = schedule
        self.plan = schedule.grid.tolist()
        self.forecast_plan: list[list[bool]] = schedule.forecast.tolist()
        history = schedule.forecast.any(axis=0)
        if self.choice is not None and self.choice.shape[-1] == len(ACTIONS):
            history[:] = True
        self.history = history.tolist()
        self.signal_plan = self._plan_signals()
        partial = (schedule.grid > 0) & (schedule.grid < 1)
        later = np.flip(np.logical_or.accumulate(np.flip(partial, 0), 0), 0)  # a partial step at t or after
        later = np.vstack([later[1:], np.zeros_like(later[:1])])  # ... strictly after t
        # keep keys and values at a full compute followed by partial steps (reuse_kv units only)
        self.kv_plan = ((schedule.grid == 0) & later & np.array(self.reuse_kv, dtype=bool)).tolist()
        blocks = np.array([u.block for u in self.units])
        reused = schedule.grid == 1.0
        self.reused_blocks = [set(blocks[row].tolist()) - set(blocks[~row].tolist()) for row in reused]

    def block_reused(self, step: int, block: int) -> bool:
        """Whether every unit of block `block` reuses all its tokens at `step`."""
        return block in self.reused_blocks[step]

    def _plan_signals(self) -> list[list[str | None]]:
        """Which attention signal each (step, unit) must compute: only on full computes with partial steps after."""
        grid = self.schedule.grid
        partial = (grid > 0) & (grid < 1)
        plan = []
        for t in range(grid.shape[0]):
            row = []
            for u in self.units:
                signal = signal_of(u)
                later = partial[t + 1 :, [v.index for v in self.units if v.block == u.block]].any()
                row.append(signal if signal in self.selector.signals and grid[t, u.index] == 0 and later else None)
            plan.append(row)
        return plan

    def sparsity(self, step: int, unit: int) -> float:
        return self.plan[step][unit]

    def forecasting(self, step: int, unit: int) -> bool:
        """Whether unit `unit` forecasts (rather than copies) the tokens it reuses at `step`."""
        return self.forecast_plan[step][unit]

    def fresh(self, step: int, unit: int, num_tokens: int) -> int:
        return fresh_tokens(self.plan[step][unit], num_tokens)

    # --- step tracking ------------------------------------------------------------------------------------------
    def begin_forward(self, model, inputs: dict, timestep, context) -> None:
        """Called before every transformer forward (`inputs`: its keyword arguments): work out the step and whether
        a new trajectory starts."""
        name = context.name if context is not None else "default"
        state = self.states.setdefault(name, TrajectoryState())
        self.current = state
        t_value, counted = _host_timestep(timestep), False
        step_index = getattr(context, "step_index", None) if context is not None else None
        if t_value is _ON_DEVICE:  # not read: that would wait for the device at every step
            t_value, counted = None, step_index is None
        if state.finished:
            overran = (
                step_index > 0
                if step_index is not None
                else (t_value is not None and state.last_timestep is not None and t_value < state.last_timestep)
            )
            state.reset()
            if overran:
                raise self._too_many_steps()
        if step_index is not None:
            new = step_index == 0 or step_index <= state.step
            step = step_index
        else:
            # counted: a trajectory runs until the schedule's last step or a reset (stock pipelines reset at the end)
            new = (
                state.step < 0
                if counted
                else (
                    state.step < 0 or t_value is None or state.last_timestep is None or t_value >= state.last_timestep
                )
            )
            step = 0 if new else state.step + 1
        if new and state.step >= 0:
            self._end_trajectory(name, state)
            state.reset()
        if step >= self.schedule.num_steps:
            state.reset()
            raise self._too_many_steps()
        shape = _input_shape(inputs)
        changed = state.input_shape is not None and shape != state.input_shape
        if step > 0 and changed and any(self.plan[step]):
            old = state.input_shape
            state.reset()
            raise RuntimeError(
                f"The model input changed shape at step {step} of a trajectory (from {old[0]} to {shape[0]}: a new "
                "batch size or resolution) on a step that reuses cached tokens, which have the old shape. Call "
                "reset_token_cache(model) before sampling with a new batch size or resolution."
            )
        state.step = step
        state.last_timestep = t_value
        state.saw_inference_mode = state.saw_inference_mode or torch.is_inference_mode_enabled()
        state.in_place = may_write_in_place(state.saw_inference_mode)
        if step == 0:
            self.selector.reset()
        if step == 0 or shape != state.input_shape:
            # A new batch size or resolution at a full step recomputes every token: re-tile the token grid for
            # the spatial bonus and look at the CFG halves again. Shapes are Python ints: no device sync per step.
            state.grid = self.spec.token_grid(model, inputs)
            state.cfg = self._is_cfg_batch(inputs["hidden_states"])
            state.input_shape = shape

    def _too_many_steps(self) -> ScheduleError:
        return ScheduleError(
            f"Schedule has {self.schedule.num_steps} steps but the sampling loop runs more: re-export it with "
            "num_steps equal to the pipeline's num_inference_steps, or use Schedule.resample(n)."
        )

    def end_forward(self) -> None:
        """Called after every transformer forward: after the schedule's last step, free the cache."""
        state = self.current
        if state is not None and state.step == self.schedule.num_steps - 1:
            self.last_trajectory = self.record(state)
            last = state.last_timestep
            state.reset()
            state.last_timestep, state.finished = last, True

    def _is_cfg_batch(self, hidden_states: torch.Tensor) -> bool:
        if self.cfg_mode != "auto":
            return bool(self.cfg_mode) and hidden_states.shape[0] % 2 == 0
        b = hidden_states.shape[0]
        return b % 2 == 0 and b > 0 and torch.equal(hidden_states[: b // 2], hidden_states[b // 2 :])

    def _end_trajectory(self, name: str, state: TrajectoryState) -> None:
        """A trajectory ends before the schedule's last step: keep its record, warn (once per step count); the
        caller frees it."""
        ran = state.step + 1
        if ran > 0:
            self.last_trajectory = self.record(state, name)
        if 0 < ran < self.schedule.num_steps and ran not in self._warned_short:
            self._warned_short.add(ran)
            logger.warning(
                "diffsparse: a trajectory (%s) ran %d steps but the schedule has %d; the last %d rows were unused. "
                "Make the schedule with num_steps=%d or use Schedule.resample(%d).",
                name,
                ran,
                self.schedule.num_steps,
                self.schedule.num_steps - ran,
                ran,
                ran,
            )

    def record(self, state: TrajectoryState, name: str | None = None) -> TrajectoryRecord:
        """What trajectory `state` has done so far."""
        if name is None:
            name = next((n for n, s in self.states.items() if s is state), "default")
        ran = state.step + 1
        plan = tuple(tuple(row) for row in self.plan[:ran])
        return TrajectoryRecord(name, ran, plan, dict(state.shapes), factor_bytes(state))

    def snapshot(self, mode: bool = True, clone: bool = False):
        """A function that puts the controller back as it is now: the trajectory states, and with `mode` the
        schedule and mode too.

        For recomputing a step in the backward pass (gradient checkpointing), which may run after the caller has
        switched schedules or modes. With `clone` the states' tensors are copied when taken and again when put
        back, so that steps run after a restore (which may write the cache in place) leave the snapshot as it was
        and it can be restored again.
        """
        keys = ("schedule", "plan", "forecast_plan", "history", "signal_plan", "kv_plan", "reused_blocks", "choice",
                "paused") if mode else ()  # fmt: skip
        saved_mode = {k: getattr(self, k) for k in keys}
        saved = {name: _copied(state, clone) for name, state in self.states.items()}
        current = next((name for name, state in self.states.items() if state is self.current), None)
        rng = self.selector.random_state()

        def restore() -> None:
            for key, value in saved_mode.items():
                setattr(self, key, value)
            self.states = {name: _copied(state, clone) for name, state in saved.items()}
            self.current = self.states.get(current)
            self.selector.set_random_state(rng)

        return restore

    def suspend(self):
        """Set the trajectories aside, unfinished: returns a function that puts them back (`snapshot(mode=False,
        clone=True)`: as often as needed), and leaves the controller with none, so the next call starts a
        trajectory without recording or warning about the suspended one."""
        restore = self.snapshot(mode=False, clone=True)
        self.states.clear()
        self.current = None
        return restore

    def reset(self) -> None:
        """Drop every cached tensor (end of a pipeline call, or `reset_token_cache`)."""
        for name, state in self.states.items():
            self._end_trajectory(name, state)
        self.states.clear()
        self.current = None
        self.selector.reset()


_ON_DEVICE = object()


def _host_timestep(timestep) -> float | None | object:
    """The loop's timestep as a Python float when it is on the host (a number or a CPU tensor), None when none was
    given, `_ON_DEVICE` for a tensor on an accelerator, whose value is not read."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.device.type != "cpu":
            return _ON_DEVICE
        return float(timestep.flatten()[0])
    return float(timestep)


def _input_shape(inputs: dict) -> tuple:
    """The shapes that fix the token grid and the batch: the image input's, and FLUX's image position ids'."""
    ids = inputs.get("img_ids")
    return tuple(inputs["hidden_states"].shape), None if ids is None else tuple(ids.shape)


def _copied(state: TrajectoryState, clone: bool) -> TrajectoryState:
    """A copy of `state` whose dicts are new (and, with `clone`, whose tensors are too)."""
    copy = _cloned if clone else (lambda value: value)
    return dataclasses.replace(state, **{f: {k: copy(v) for k, v in getattr(state, f).items()} for f in _DICT_FIELDS})


def _cloned(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v) for v in value)
    return value


_DICT_FIELDS = ("cache", "last_fresh", "full_at", "inputs", "signals", "shapes", "factors", "prev_fresh", "kv")
