"""Hand-made schedules that end on a full step: forecast-FORA's 25 full steps of 50 (interval 2) up to step 2k,
then one gap of 3 and every other step to step 49, the last, computed. Same MACs as interval 2 (49.4 % saved).

python bench/learn-recipe/judge/phase-probe/make.py MODEL OUT_PREFIX   (e.g. reference bench/.../switch)
"""

from __future__ import annotations

import sys

import numpy as np

from diffsparse.cache import cacheable_units
from diffsparse.models.loading import load_model
from diffsparse.schedule import Schedule

STEPS = 50


def main(model: str, prefix: str) -> None:
    units = cacheable_units(load_model(model).transformer)
    for k in (0, 5, 12, 20, 23):
        full = list(range(0, 2 * k + 1, 2)) + list(range(2 * k + 3, STEPS, 2))
        grid = np.ones((STEPS, len(units)))
        grid[full] = 0.0
        meta = {"method": f"switch{k}", "selector": "toca", "forecast_order": 1}
        Schedule(grid, units, meta).with_forecast(True, meta).save(f"{prefix}{k}.json")
        print(f"switch{k}: full steps {full}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
