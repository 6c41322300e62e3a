"""Per-step forward times (forward hooks on the transformer) on the reference model, 2 threads, 20 samples, 50
DDIM steps: dense steps against the full and the reuse steps of FORA and forecast-FORA at 0.5, 3 rounds in one
process. Usage: python bench/time-budget-digits/full_steps.py
(with glibc's malloc told to keep freed memory: MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296)"""

import time

import numpy as np
import torch

from diffsparse.allocate import baselines
from diffsparse.cache import apply_token_cache, remove_token_cache
from diffsparse.models.loading import load_model
from diffsparse.models.sampling import initial_noise, sample


def main() -> None:
    torch.set_num_threads(2)
    ref = load_model("reference")
    model = ref.transformer
    classes, noise = torch.arange(20) % 10, initial_noise(20, ref.sample_shape, 0)
    scheduler = ref.scheduler("ddim")
    scheduler.set_timesteps(50)
    fitted = baselines.budget_schedules(ref.mac_table(), scheduler.timesteps.tolist(), 0.5)
    times, began = [], [0.0]
    model.register_forward_pre_hook(lambda *_: began.__setitem__(0, time.perf_counter()))
    model.register_forward_hook(lambda *_: times.append(time.perf_counter() - began[0]))

    def run() -> np.ndarray:
        times.clear()
        with torch.no_grad():
            sample(model, ref.scheduler("ddim"), classes, noise, 50, 1.25)
        return np.array(times) * 1e3

    ms: dict[str, list[float]] = {}
    for _ in range(3):
        ms.setdefault("dense", []).append(run()[2:].mean())
        for name in ("fora", "forecast_fora"):
            apply_token_cache(model, fitted[name], selector="toca")
            step = run()
            remove_token_cache(model)
            full = (fitted[name].grid == 0).all(1)
            full[:2] = False
            ms.setdefault(f"{name} full", []).append(step[full].mean())
            ms.setdefault(f"{name} reuse", []).append(step[~full][2:].mean())
    for name, values in ms.items():
        print(f"{name:20s} ms per step, each round: {np.round(values, 1)}")


if __name__ == "__main__":
    main()
