"""Measured step times per unit and action: the cost table of a time budget (`budget_unit=time`).

A `MacTable` counts what a schedule computes; on a small model, or a partial step whose gathers, scatters and
token scoring do not shrink with it, time falls by less. A `TimeTable` holds seconds measured on one device, dtype,
batch and token count (`diffsparse.cache.costs.measure_time_table`), per action rather than per level, because a
forecast costs more than a copy of the same tokens. It has the `MacTable`'s interface (`units`, `dense_step`,
`level_costs`, `action_costs`, `saved_fraction`), so the DP, the hand-made fitting and the search take either.

The model is additive: a step costs `other` (every unit copying all its tokens) plus the cost of each unit's action
(0 for that copy). Pure data: imports nothing that runs a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffsparse.accounting.macs import step_totals
from diffsparse.levels import ACTIONS, SPARSITY_LEVELS


@dataclass(frozen=True)
class TimeTable:
    """Seconds of one denoising step, per unit and action (`levels.ACTIONS`).

    Attributes:
        units: the unit names (the columns of a schedule for the model).
        action_seconds: (U, |A|): what unit u adds to a step when it takes action a (0 for copying all tokens).
        other: a step in which every unit copies all its tokens.
        meta: where and how it was measured (device, dtype, batch, tokens, the measured dense step, ...).
        dense_seconds: the dense model's step, what a time budget is a fraction of; None: a step where every unit
            computes all its tokens (`full_step`), which inside a cached trajectory may cost more.
    """

    units: tuple[str, ...]
    action_seconds: np.ndarray
    other: float
    meta: dict = field(default_factory=dict)
    dense_seconds: float | None = None
    unit_name = "time"  # how budgets on this table are worded

    def __post_init__(self):
        shape = (len(self.units), len(ACTIONS))
        if np.shape(self.action_seconds) != shape:
            raise ValueError(f"action_seconds must be {shape} (units x actions), got {np.shape(self.action_seconds)}")

    @property
    def full_step(self) -> float:
        """A step of the cached trajectory in which every unit computes all its tokens."""
        return float(np.asarray(self.action_seconds)[:, 0].sum()) + float(self.other)

    @property
    def dense_step(self) -> float:
        return self.full_step if self.dense_seconds is None else float(self.dense_seconds)

    @property
    def action_costs(self) -> np.ndarray:
        return np.asarray(self.action_seconds, dtype=np.float64)

    @property
    def level_costs(self) -> np.ndarray:
        """(U, |S|): the levels with copy (the first |S| actions)."""
        return self.action_costs[:, : len(SPARSITY_LEVELS)]

    def step_costs(self, action_indices: np.ndarray) -> np.ndarray:
        """Seconds of each step for a (T, U) array of action indices."""
        return step_totals(self.action_costs, action_indices, self.other)

    def saved_fraction(self, schedule) -> float:
        """Fraction of the dense trajectory's time that `schedule` is predicted to save."""
        schedule.check_units(self.units)
        return 1.0 - self.step_costs(schedule.action_indices()).sum() / (self.dense_step * schedule.num_steps)

    def predicted_speedup(self, schedule) -> float:
        return 1.0 / (1.0 - self.saved_fraction(schedule))

    def save(self, path: str | Path) -> None:
        data = {
            "units": list(self.units),
            "actions": [f"{s:g} {mode}" for s, mode in ACTIONS],
            "action_seconds": np.asarray(self.action_seconds).tolist(),
            "other": float(self.other),
            "dense_seconds": self.dense_seconds,
            "meta": self.meta,
        }
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TimeTable:
        """A table saved by `save`; a file that is missing or not one says so."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No time table at {path}: measure one (learn.budget_unit=time without a table).")
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or {"units", "action_seconds", "other"} - set(data):
            raise ValueError(f"{path} is not a time table (units, action_seconds, other).")
        return cls(tuple(data["units"]), np.asarray(data["action_seconds"], dtype=np.float64), data["other"],
                   data.get("meta", {}), data.get("dense_seconds"))  # fmt: skip
