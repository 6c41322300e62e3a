"""Key/value reuse against the current path on the reference model (50 DDIM steps, guidance 1.25, selector toca):
the hand-made schedules with partial steps fitted to budget 0.5 (ToCa, DuCa, uniform) and the shipped learned
schedule at 0.5, each run with `reuse_kv=False` and `True`.

Quality: PSNR and L2 against dense, with the evaluation's definitions (images in [0, 1]), on 100 samples (noise
seed 10_000, classes 0-9 in turn). Speed: dense and the 8 runs alternated in this process on 20 samples, 1 warm-up
and 5 timed rounds, 2 threads. MACs are counted as each run runs.

Usage: python bench/kv-reuse/kv_reuse.py > bench/kv-reuse/results.md
"""

import torch

from diffsparse.allocate import baselines
from diffsparse.cache import apply_token_cache, remove_token_cache
from diffsparse.evaluate.metrics import l2, psnr
from diffsparse.evaluate.timing import alternate
from diffsparse.models.loading import load_model
from diffsparse.models.sampling import initial_noise, sample, sample_batched
from diffsparse.reference.digits import to_unit_range
from diffsparse.schedule import Schedule

STEPS, GUIDANCE, SAMPLES, TIMED = 50, 1.25, 100, 20


def main() -> None:
    torch.set_num_threads(2)
    ref = load_model("reference")
    model = ref.transformer
    scheduler = ref.scheduler("ddim")
    scheduler.set_timesteps(STEPS)
    fitted = baselines.budget_schedules(ref.mac_table(), scheduler.timesteps.tolist(), 0.5)
    schedules = {name: fitted[name] for name in ("toca", "duca", "uniform")}
    schedules["learned"] = Schedule.load("bench/pareto-digits-ddim50/learned-0.50/schedule.json")
    probe = ref.probe_inputs()
    classes, noise = torch.arange(SAMPLES) % 10, initial_noise(SAMPLES, ref.sample_shape, 10_000)

    def images(schedule=None, reuse_kv=False):
        if schedule is not None:
            apply_token_cache(model, schedule, selector="toca", reuse_kv=reuse_kv)
        try:
            x = sample_batched(model, ref.scheduler("ddim"), classes, noise, STEPS, guidance_scale=GUIDANCE)
            return to_unit_range(ref.decode(x))  # the evaluation's images: [0, 1], as `evaluate.metrics` wants
        finally:
            if schedule is not None:
                remove_token_cache(model)

    dense = images()
    rows, runs = [], {"dense": lambda clock: timed_run(None, False, clock)}
    t_classes, t_noise = classes[:TIMED], noise[:TIMED]

    def timed_run(schedule, reuse_kv, clock):
        if schedule is not None:
            apply_token_cache(model, schedule, selector="toca", reuse_kv=reuse_kv)
        try:
            with torch.no_grad(), clock:
                sample(model, ref.scheduler("ddim"), t_classes, t_noise, STEPS, GUIDANCE)
        finally:
            if schedule is not None:
                remove_token_cache(model)

    for name, schedule in schedules.items():
        for reuse_kv in (False, True):
            key = f"{name}{' +kv' if reuse_kv else ''}"
            out = images(schedule, reuse_kv)
            macs = schedule.macs(model, reuse_kv=reuse_kv, **probe)
            rows.append((key, macs["reduction"], float(psnr(out, dense).mean()), float(l2(out, dense).mean())))
            runs[key] = lambda clock, s=schedule, k=reuse_kv: timed_run(s, k, clock)
    timings = alternate(runs, rounds=5)
    print("| schedule | MAC reduction | speed-up (min-max) | efficiency | PSNR vs dense | L2 vs dense (x1e-4) |")
    print("|---|---|---|---|---|---|")
    for key, reduction, p, e in rows:
        s = timings.speedup(key)
        print(f"| {key} | {reduction:.2f}x | {s.median:.2f}x ({s.low:.2f}-{s.high:.2f}) | {s.median / reduction:.2f} "
              f"| {p:.2f} | {e * 1e4:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
