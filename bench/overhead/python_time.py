"""How much of a cached trajectory is Python in diffsparse's own code (cProfile tottime: includes the tensor
arithmetic written with operators inside those functions) and in diffusers' hook registry, on the reference model at
budget 0.5 (20 samples, 50 DDIM steps, 2 threads). Usage: python bench/overhead/python_time.py"""

import cProfile
import pstats
import time

import torch

from diffsparse.allocate import baselines
from diffsparse.cache import apply_token_cache, remove_token_cache
from diffsparse.models.loading import load_model
from diffsparse.models.sampling import initial_noise, sample

torch.set_num_threads(2)
ref = load_model("reference")
model = ref.transformer
sch = ref.scheduler("ddim")
sch.set_timesteps(50)
fitted = baselines.budget_schedules(ref.mac_table(), sch.timesteps.tolist(), 0.5)
classes, noise = torch.arange(20) % 10, initial_noise(20, ref.sample_shape, 0)
for name in ("toca", "fora", "forecast_fora", "uniform"):
    s = fitted[name]

    def go(s=s):
        apply_token_cache(model, s, selector="toca")
        with torch.no_grad():
            sample(model, ref.scheduler("ddim"), classes, noise, 50, 1.25)
        remove_token_cache(model)

    go()
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable()
    go()
    pr.disable()
    t = time.perf_counter() - t
    st = pstats.Stats(pr).stats
    ours = sum(v[2] for k, v in st.items() if "/diffsparse/" in k[0])  # tottime in our Python
    hooks = sum(v[2] for k, v in st.items() if "diffusers/hooks" in k[0])
    print(f"{name:14s} wall {t:.3f}s  tottime in diffsparse code {ours * 1e3:.1f} ms ({ours / t:.1%}), "
          f"in diffusers hooks {hooks * 1e3:.1f} ms")  # fmt: skip
    top = sorted(((v[2], k) for k, v in st.items() if "/diffsparse/" in k[0]), reverse=True)[:6]
    for tt, k in top:
        print(f"    {tt * 1e3:6.1f} ms  {k[0].split('diffsparse/')[-1]}:{k[1]} {k[2]}")
