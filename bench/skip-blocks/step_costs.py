"""The cost of one cached step relative to a dense step on the reference model (2 threads, 20 samples, 50 DDIM
steps): each schedule makes steps 0 and 1 full and every later step take one action; dense and the schedules
alternate over 3 rounds in this process. Usage: python bench/skip-blocks/step_costs.py [samples]"""

import sys
import time

import numpy as np
import torch

from diffsparse.cache import apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.models.loading import load_model
from diffsparse.models.sampling import initial_noise, sample
from diffsparse.schedule import Schedule


def main(n: int = 20) -> None:
    torch.set_num_threads(2)
    ref = load_model("reference")
    model, units = ref.transformer, cacheable_units(ref.transformer)
    classes, noise = torch.arange(n) % 10, initial_noise(n, ref.sample_shape, 0)

    def grid(level: float) -> np.ndarray:
        g = np.full((50, len(units)), level)
        g[:2] = 0.0
        return g

    cases = {
        "dense": None,
        "copy1": Schedule(grid(1.0), units, {}),
        "fcst1": Schedule(grid(1.0), units, {}).with_forecast(True),
        "copy.5": Schedule(grid(0.5), units, {}),
        "fcst.5": Schedule(grid(0.5), units, {}).with_forecast(True),
        "copy.75": Schedule(grid(0.75), units, {}),
    }
    seconds: dict[str, list[float]] = {}
    for _ in range(3):
        for name, schedule in cases.items():
            if schedule is not None:
                apply_token_cache(model, schedule, selector="toca")
            start = time.perf_counter()
            with torch.no_grad():
                sample(model, ref.scheduler("ddim"), classes, noise, 50, 1.25)
            seconds.setdefault(name, []).append(time.perf_counter() - start)
            if schedule is not None:
                remove_token_cache(model)
    dense = np.median(seconds["dense"])
    for name, runs in seconds.items():
        step = (np.median(runs) - 2 * dense / 50) / (48 * dense / 50)  # one cached step / one dense step
        print(f"{name:8s} median {np.median(runs):.3f}s  per-step rel {step:.3f}  runs {[round(x, 3) for x in runs]}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
