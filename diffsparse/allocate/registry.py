"""The allocator registry: every hand-made rule by name, registered where it is defined, one function each.

A rule is `rule(units, num_steps, **knobs) -> Schedule` (or `rule(units, timesteps, **knobs)` when it reads the
sampler's timesteps), and `fit` gives the knob settings that `baselines.budget_schedules` sweeps to meet a MAC
budget. Everything that lists hand-made allocators reads `ALLOCATORS`: `baselines.budget_schedules`, the methods of
`python -m diffsparse.evaluate` (`--methods fora toca ...`: the name with `-` for `_`), the schedule names of
`python -m diffsparse.bench` (`presets` and `<name>-<value>` for a rule with a `knob`), and Hydra
(`conf/allocator/<name>.yaml` targets `make_schedule` with the rule's `name`). Adding a hand-made allocator is one
registered function.

Example:
    >>> @register_allocator("every_other", fit=lambda num_steps: [{"sparsity": s} for s in (0.25, 0.5, 0.75, 1.0)])
    ... def every_other(units, num_steps, sparsity=0.5):
    ...     grid = np.zeros((num_steps, len(units)))
    ...     grid[1::2] = sparsity
    ...     return Schedule(grid, units, {"method": "every_other", "sparsity": sparsity})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from diffsparse.schedule import Schedule


@dataclass(frozen=True)
class Knob:
    """The number of `<allocator>-<value>` schedule names (the bench's `uniform-0.5`): which knob, its range, and
    an example for messages."""

    name: str
    low: float
    high: float
    example: float


@dataclass(frozen=True)
class AllocatorSpec:
    """One registered rule.

    Attributes:
        name: the rule's name (`budget_schedules` keys, Hydra's `name`); `method` is the evaluation's row name.
        rule: the function making a `Schedule`.
        fit: `fit(num_steps)` -> the knob settings swept to fit the rule to a budget, in the order tried.
        timesteps: the rule takes the sampler's timesteps instead of a step count.
        selector: the token selector the rule calls for at run time (DuCa: norm); None: the run's own.
        presets: named knob settings (schedule names of the bench, e.g. `toca-like`).
        knob: the knob of `<name>-<value>` schedule names, if the rule has one.
    """

    name: str
    rule: Callable[..., Schedule]
    fit: Callable[[int], Iterable[dict]]
    timesteps: bool = False
    selector: str | None = None
    presets: Mapping[str, dict] = field(default_factory=dict)
    knob: Knob | None = None

    @property
    def method(self) -> str:
        return self.name.replace("_", "-")

    def make(self, units: Sequence[str], num_steps: int | None = None, timesteps=None, **knobs) -> Schedule:
        """The rule's schedule for `units`: over `num_steps` steps, or over the sampler's `timesteps`."""
        if self.timesteps:
            if timesteps is None:
                raise ValueError(
                    f"Allocator {self.name!r} reads the sampler's timesteps: pass timesteps=scheduler.timesteps "
                    "(after scheduler.set_timesteps(num_steps))."
                )
            return self.rule(units, [int(t) for t in timesteps], **knobs)
        if num_steps is None:
            if timesteps is None:
                raise ValueError(f"Allocator {self.name!r} needs num_steps (or the sampler's timesteps).")
            num_steps = len(timesteps)
        return self.rule(units, num_steps, **knobs)


ALLOCATORS: dict[str, AllocatorSpec] = {}


def register_allocator(
    name: str,
    *,
    fit: Callable[[int], Iterable[dict]],
    timesteps: bool = False,
    selector: str | None = None,
    presets: Mapping[str, dict] | None = None,
    knob: Knob | None = None,
) -> Callable:
    """Decorator: register `rule` as the hand-made allocator `name` (see `AllocatorSpec` for the arguments)."""

    def register(rule: Callable[..., Schedule]) -> Callable[..., Schedule]:
        if name in ALLOCATORS:
            raise ValueError(f"An allocator called {name!r} is registered already ({ALLOCATORS[name].rule}).")
        ALLOCATORS[name] = AllocatorSpec(name, rule, fit, timesteps, selector, dict(presets or {}), knob)
        return rule

    return register


def get_allocator(name: str) -> AllocatorSpec:
    if name not in ALLOCATORS:
        raise ValueError(f"Unknown allocator {name!r}; registered: {sorted(ALLOCATORS)}.")
    return ALLOCATORS[name]


def make_schedule(name: str, units: Sequence[str], num_steps: int | None = None, timesteps=None, **knobs) -> Schedule:
    """The schedule of the registered allocator `name` with `knobs` (Hydra's target for `conf/allocator/`)."""
    return get_allocator(name).make(units, num_steps, timesteps, **knobs)


def named_forms() -> list[str]:
    """The schedule names `named_schedule` takes, as a user reads them: `uniform-<sparsity> (e.g. uniform-0.5)`,
    `toca-like`, ..."""
    specs = ALLOCATORS.values()
    numbered = [f"{s.method}-<{s.knob.name}> (e.g. {s.method}-{s.knob.example:g})" for s in specs if s.knob]
    return numbered + [name for s in specs for name in s.presets]


def parse_named(text: str) -> tuple[AllocatorSpec, dict] | None:
    """(allocator, knobs) of a schedule name (a preset, or `<allocator>-<value>`); None if no allocator has that
    name. A `<value>` that is not a number in the knob's range raises a `ValueError` that says how to write it."""
    for spec in ALLOCATORS.values():
        if text in spec.presets:
            return spec, dict(spec.presets[text])
    for spec in ALLOCATORS.values():
        prefix = f"{spec.method}-"
        if spec.knob is not None and text.startswith(prefix):
            k = spec.knob
            value = _number(text.removeprefix(prefix))
            if value is None or not k.low <= value <= k.high:
                raise ValueError(
                    f"Schedule {text!r}: {spec.method}-<{k.name}> needs a {k.name} from {k.low:g} to {k.high:g}, "
                    f"e.g. {spec.method}-{k.example:g}."
                )
            return spec, {k.name: value}
    return None


def named_schedule(text: str, units: Sequence[str], num_steps: int) -> Schedule:
    """The schedule a name stands for (`parse_named`), over `num_steps` steps."""
    parsed = parse_named(text)
    if parsed is None:
        raise ValueError(f"Unknown schedule {text!r}: use {' or '.join(named_forms())}.")
    spec, knobs = parsed
    return spec.make(units, num_steps, **knobs)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
