"""Whole trajectories with and without skipping blocks on the reference model (2 threads, 20 samples, 50 DDIM
steps): dense, then each schedule with `skip_blocks=True` and `False`, alternated in this process, 1 warm-up and 4
timed rounds. Usage: python bench/skip-blocks/trajectory_ab.py"""

import time

import numpy as np
import torch

from diffsparse.allocate import baselines
from diffsparse.cache import apply_token_cache, remove_token_cache
from diffsparse.models.loading import load_model
from diffsparse.models.sampling import initial_noise, sample
from diffsparse.schedule import Schedule


def main() -> None:
    torch.set_num_threads(2)
    ref = load_model("reference")
    model = ref.transformer
    classes, noise = torch.arange(20) % 10, initial_noise(20, ref.sample_shape, 0)
    scheduler = ref.scheduler("ddim")
    scheduler.set_timesteps(50)
    fitted = baselines.budget_schedules(ref.mac_table(), scheduler.timesteps.tolist(), 0.5)
    schedules = {
        "fora": fitted["fora"],
        "forecast_fora": fitted["forecast_fora"],
        "learned-time": Schedule.load("bench/time-budget-digits/learned-time-0.50/schedule.json"),
    }
    cases = [("dense", None, True)]
    cases += [(f"{k}-{'skip' if s else 'noskip'}", v, s) for k, v in schedules.items() for s in (True, False)]
    seconds: dict[str, list[float]] = {}
    for r in range(5):
        for name, schedule, skip in cases:
            if schedule is not None:
                apply_token_cache(model, schedule, selector="toca", skip_blocks=skip)
            start = time.perf_counter()
            with torch.no_grad():
                sample(model, ref.scheduler("ddim"), classes, noise, 50, 1.25)
            took = time.perf_counter() - start
            if schedule is not None:
                remove_token_cache(model)
            if r:
                seconds.setdefault(name, []).append(took)
    dense = np.array(seconds["dense"])
    for name, runs in seconds.items():
        ratio = dense / np.array(runs)
        print(f"{name:22s} median {np.median(runs):.3f}s speed-up {np.median(ratio):.2f}x "
              f"({ratio.min():.2f}-{ratio.max():.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
