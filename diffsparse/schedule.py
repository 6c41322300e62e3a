"""`Schedule`: a steps x units grid of cache actions (a token sparsity, and copy or forecast for the tokens not
recomputed), the contract between every allocator and the runtime."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from diffsparse.accounting.macs import schedule_macs
from diffsparse.backbones.registry import cacheable_units
from diffsparse.files import atomic_path
from diffsparse.levels import ACTION_LEVELS, ACTIONS, SPARSITY_LEVELS

_FORMAT = "diffsparse.schedule"
_VERSION = 2  # 2: adds `forecast`; version 1 files (no forecast) still load, as copy everywhere


class ScheduleError(ValueError):
    """A schedule that cannot be used as it is; the message says how to fix it."""


class Schedule:
    """A `T x U` grid of actions for `T` denoising steps and `U` cacheable units.

    Each (step, unit) has a sparsity, the share of the unit's tokens reused (`grid`, values of `SPARSITY_LEVELS`),
    and, where the sparsity is above 0, a mode for the reused tokens (`forecast`): copy their last output (False)
    or forecast it by a Taylor step in the step index from their last computations (True). Row 0 must be all zeros:
    the first step computes every token and fills the cache. A schedule stores fractions, not token counts, so it
    applies at any resolution.

    Args:
        grid: array-like of shape `(num_steps, num_units)` with values in `SPARSITY_LEVELS`.
        units: the unit names (module paths) the columns belong to, as `cacheable_units(model)` returns them.
        meta: free-form JSON-serialisable description (method, budget, ...), saved with the schedule.
        forecast: array-like of booleans of the grid's shape (None: copy everywhere); ignored where the sparsity
            is 0 (everything is recomputed there).

    Example:
        >>> sched = Schedule.uniform(units=["transformer_blocks.0.attn1", "transformer_blocks.0.ff"], num_steps=4,
        ...                          sparsity=0.5)
        >>> sched.grid[0].tolist(), sched.grid[1].tolist()
        ([0.0, 0.0], [0.5, 0.5])
    """

    def __init__(self, grid, units: Sequence[str], meta: dict | None = None, forecast=None):
        grid = np.asarray(grid, dtype=np.float64)
        units = tuple(str(u) for u in units)
        if grid.ndim != 2:
            raise ScheduleError(f"Schedule grid must be 2-D (steps x units), got shape {grid.shape}.")
        if grid.shape[1] != len(units):
            raise ScheduleError(
                f"Schedule grid has {grid.shape[1]} columns but {len(units)} unit names were given: "
                "pass one name per column (see `cacheable_units(model)`)."
            )
        if grid.shape[0] < 1:
            raise ScheduleError("Schedule needs at least one step.")
        if len(set(units)) != len(units):
            raise ScheduleError("Schedule unit names must be unique.")
        levels = np.asarray(SPARSITY_LEVELS)
        nearest = levels[np.abs(grid[..., None] - levels).argmin(-1)]
        bad = ~np.isfinite(grid) | (np.abs(grid - nearest) > 1e-6)
        if bad.any():
            t, u = np.argwhere(bad)[0]
            raise ScheduleError(
                f"Sparsity {grid[t, u]!r} at step {t}, unit {units[u]!r} is not in S = {SPARSITY_LEVELS}: "
                "round it to one of these levels."
            )
        if np.any(nearest[0] != 0):
            raise ScheduleError(
                "Row 0 of a schedule must be all zeros: the first step computes every token and fills the cache."
            )
        if forecast is None:
            forecast = np.zeros(grid.shape, dtype=bool)
        forecast = np.asarray(forecast)
        if forecast.shape != grid.shape:
            raise ScheduleError(f"forecast has shape {forecast.shape}, the grid {grid.shape}: give one mode per cell.")
        if forecast.dtype != bool and not np.isin(forecast, (0, 1)).all():
            raise ScheduleError("forecast must hold booleans (or 0 / 1): True forecasts the reused tokens.")
        self._grid = nearest
        self._grid.setflags(write=False)
        self._forecast = forecast.astype(bool) & (nearest > 0)
        self._forecast.setflags(write=False)
        self.units = units
        self.meta = dict(meta or {})

    # --- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def uniform(
        cls, units: Sequence[str] | torch.nn.Module, num_steps: int, sparsity: float, meta: dict | None = None
    ) -> Schedule:
        """The same sparsity for every unit at every step after the first (row 0 is forced to 0).

        Args:
            units: the unit names, or the transformer itself (its `cacheable_units`).
            num_steps: the pipeline's number of denoising steps.
            sparsity: a level of `SPARSITY_LEVELS`.
            meta: saved with the schedule.

        Example:
            >>> Schedule.uniform(pipe.transformer, num_steps=20, sparsity=0.5)
            Schedule(num_steps=20, num_units=56, mean_sparsity=0.475, full_steps=[0])
        """
        if isinstance(units, torch.nn.Module) or hasattr(units, "transformer"):
            units = cacheable_units(units)  # a pipeline gets the registry's "pass pipe.transformer" error
        if num_steps < 1:
            raise ScheduleError(f"num_steps must be >= 1, got {num_steps}.")
        grid = np.full((num_steps, len(units)), float(sparsity))
        grid[0] = 0.0
        return cls(grid, units, {"method": "uniform", "sparsity": float(sparsity), **(meta or {})})

    @classmethod
    def from_array(
        cls, grid, units: Sequence[str], meta: dict | None = None, force_first_step: bool = False, forecast=None
    ) -> Schedule:
        """A schedule from any array-like grid; `force_first_step=True` zeroes row 0 instead of rejecting it."""
        grid = np.array(grid, dtype=np.float64)
        if force_first_step and grid.ndim == 2 and len(grid):
            grid[0] = 0.0
        return cls(grid, units, meta, forecast)

    @classmethod
    def from_actions(cls, actions, units: Sequence[str], meta: dict | None = None) -> Schedule:
        """A schedule from a `(num_steps, num_units)` array of indices into `levels.ACTIONS`."""
        actions = np.asarray(actions, dtype=np.int64)
        if actions.size and (actions.min() < 0 or actions.max() >= len(ACTIONS)):
            raise ScheduleError(f"action indices must lie in 0..{len(ACTIONS) - 1} (levels.ACTIONS).")
        levels = np.asarray(ACTION_LEVELS)[actions]
        grid = np.asarray(SPARSITY_LEVELS)[levels]
        return cls(grid, units, meta, actions >= len(SPARSITY_LEVELS))

    # --- views --------------------------------------------------------------------------------------------------
    @property
    def grid(self) -> np.ndarray:
        """The read-only `(num_steps, num_units)` sparsity grid."""
        return self._grid

    @property
    def forecast(self) -> np.ndarray:
        """The read-only `(num_steps, num_units)` boolean grid: True where the reused tokens are forecast, False
        where they are copied (always False where the sparsity is 0)."""
        return self._forecast

    @property
    def num_steps(self) -> int:
        return self._grid.shape[0]

    @property
    def num_units(self) -> int:
        return self._grid.shape[1]

    @property
    def full_steps(self) -> list[int]:
        """Steps whose row is all zeros (every unit computes every token)."""
        return [int(t) for t in np.flatnonzero((self._grid == 0).all(axis=1))]

    def mean_sparsity(self) -> float:
        """The paper's plain budget: the average sparsity over all steps and units."""
        return float(self._grid.mean())

    def level_indices(self) -> np.ndarray:
        """The grid as indices into `SPARSITY_LEVELS` (int64)."""
        return np.rint(self._grid * (len(SPARSITY_LEVELS) - 1)).astype(np.int64)

    def action_indices(self) -> np.ndarray:
        """The grid as indices into `levels.ACTIONS` (int64): the level, plus copy or forecast."""
        levels = self.level_indices()
        return levels + (len(SPARSITY_LEVELS) - 1) * (self._forecast & (levels > 0))

    def with_forecast(self, forecast=True, meta: dict | None = None) -> Schedule:
        """The same sparsities with the reused tokens forecast (`forecast=True`), copied (False), or as a boolean
        grid says."""
        modes = np.broadcast_to(np.asarray(forecast, dtype=bool), self._grid.shape)
        return Schedule(self._grid, self.units, {**self.meta, **(meta or {})}, modes)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return (
            self.units == other.units
            and np.array_equal(self._grid, other._grid)
            and np.array_equal(self._forecast, other._forecast)
        )

    def __repr__(self) -> str:
        forecast = f", forecast={self._forecast.mean():.3f}" if self._forecast.any() else ""
        return (
            f"Schedule(num_steps={self.num_steps}, num_units={self.num_units}, "
            f"mean_sparsity={self.mean_sparsity():.3f}, full_steps={self.full_steps}{forecast})"
        )

    # --- checks against a runtime -------------------------------------------------------------------------------
    def check_units(self, units: Sequence[str]) -> None:
        """Raise if this schedule was made for other units than `units`."""
        units = tuple(units)
        if units == self.units:
            return
        if len(units) == len(self.units) and set(units) == set(self.units):
            i = next(i for i, (a, b) in enumerate(zip(units, self.units, strict=True)) if a != b)
            raise ScheduleError(
                f"Schedule has the model's {len(units)} units but in another order: the first difference is at "
                f"column {i}, where the schedule has {self.units[i]!r} and the model has {units[i]!r}. Columns must "
                "follow `cacheable_units(model)`: rebuild the grid in that order, e.g. "
                "`Schedule(s.grid[:, [s.units.index(u) for u in cacheable_units(model)]], cacheable_units(model))`."
            )
        missing = [u for u in units if u not in self.units][:3]
        extra = [u for u in self.units if u not in units][:3]
        raise ScheduleError(
            f"Schedule was made for {self.num_units} units but the model has {len(units)} "
            f"(model units missing from the schedule: {missing}; schedule units not in the model: {extra}). "
            "Make the schedule with `units=cacheable_units(model)` for this model."
        )

    # --- transforms ---------------------------------------------------------------------------------------------
    def resample(self, num_steps: int) -> Schedule:
        """The same schedule over `num_steps` steps: each new step takes the row nearest in relative time.

        Row 0 maps to row 0, so the first step stays full. Going down in steps may drop full steps.
        """
        if num_steps < 1:
            raise ScheduleError(f"num_steps must be >= 1, got {num_steps}.")
        if num_steps == 1:
            src = np.zeros(1, dtype=np.int64)
        else:
            src = np.rint(np.arange(num_steps) * (self.num_steps - 1) / (num_steps - 1)).astype(np.int64)
        meta = {**self.meta, "resampled_from": self.num_steps}
        return Schedule(self._grid[src], self.units, meta, self._forecast[src])

    # --- persistence --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "levels": list(SPARSITY_LEVELS),
            "units": list(self.units),
            "sparsity": self._grid.tolist(),
            "forecast": self._forecast.astype(int).tolist(),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "schedule") -> Schedule:
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ScheduleError(f"{source} is not a diffsparse schedule (no 'format': '{_FORMAT}' field).")
        if data.get("version") not in (1, _VERSION):
            raise ScheduleError(
                f"{source} has schedule version {data.get('version')!r}; this diffsparse reads 1 and {_VERSION}."
            )
        for key in ("units", "sparsity"):
            if key not in data:
                raise ScheduleError(f"{source} has no '{key}' field: the file is incomplete, export it again.")
        rows = data["sparsity"]
        if not isinstance(rows, list) or any(not isinstance(r, list) or len(r) != len(data["units"]) for r in rows):
            raise ScheduleError(
                f"{source}: every row of 'sparsity' must list one value per unit ({len(data['units'])}); "
                "the file is truncated or was edited by hand."
            )
        forecast = data.get("forecast") if data["version"] >= 2 else None  # version 1: copy everywhere
        if forecast is not None and (
            not isinstance(forecast, list)
            or len(forecast) != len(rows)
            or any(not isinstance(r, list) or len(r) != len(data["units"]) for r in forecast)
        ):
            raise ScheduleError(f"{source}: 'forecast' must list one row per step ({len(rows)}); export it again.")
        return cls(rows, data["units"], data.get("meta"), forecast)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the schedule as JSON, atomically (a crash never leaves a half-written file)."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=1)
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schedule:
        """Read a schedule written by `save`; a missing, corrupt or truncated file raises `ScheduleError`."""
        path = Path(path)
        if not path.is_file():
            raise ScheduleError(f"No schedule file at {path}.")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ScheduleError(f"{path} is not valid JSON ({e}): the file is corrupt or truncated.") from e
        return cls.from_dict(data, source=str(path))

    # --- accounting and pictures --------------------------------------------------------------------------------
    def macs(self, transformer, reuse_kv: bool = False, **forward_kwargs) -> dict:
        """Dense and cached multiply-accumulates of one trajectory with this schedule.

        Runs one dense forward of `transformer` with `forward_kwargs` (an example input of the batch you will
        sample) to learn token counts, then counts each unit analytically. See `diffsparse.accounting.macs`.
        `reuse_kv=True` counts self-attention as the token cache runs it with `reuse_kv=True`.

        Returns:
            dict with `dense`, `cached` (MACs per trajectory for that batch), `reduction` (dense / cached),
            `per_step_cached` (list) and `other_per_step` (MACs outside the units, per step).
        """
        return schedule_macs(self, transformer, reuse_kv, **forward_kwargs)

    def plot(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Save a heatmap (units x steps, colour = sparsity) as PNG, like the paper's Figure 3; cells whose reused
        tokens are forecast carry a dot (the legend says so)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        height = min(2.4 + 0.12 * self.num_units, 14)
        width = min(3 + 0.25 * self.num_steps, 16)
        fig = Figure(figsize=(width, height))  # no pyplot: nothing global to close, safe off the main thread
        ax = fig.subplots()
        edges = np.linspace(-0.125, 1.125, len(SPARSITY_LEVELS) + 1)  # one colour per level of S
        norm = BoundaryNorm(edges, ncolors=256)
        im = ax.imshow(self._grid.T, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("denoising step")
        ax.set_ylabel("unit")
        step = max(1, self.num_units // 40)
        ax.set_yticks(range(0, self.num_units, step))
        ax.set_yticklabels([self.units[i] for i in range(0, self.num_units, step)], fontsize=6)
        fig.colorbar(im, ax=ax, ticks=SPARSITY_LEVELS, label="sparsity (fraction of tokens reused)")
        steps, units = np.nonzero(self._forecast)
        handles = [Patch(facecolor="none", edgecolor="grey", linewidth=0.5, label="no dot: reused tokens copied")]
        if len(steps):
            dots = ax.scatter(steps, units, s=6, c="white", edgecolors="black", linewidths=0.3)
            handles.append(dots.set_label("dot: reused tokens forecast (Taylor)") or dots)
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14 * 4 / height), ncol=2, fontsize=7,
                  frameon=False)  # the actions, under the step axis  # fmt: skip
        ax.set_title(title or f"{self.meta.get('method', 'schedule')}: mean sparsity {self.mean_sparsity():.3f}")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120)
        return path
