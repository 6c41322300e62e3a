"""How much of a cached trajectory is Python in diffsparse's own code (cProfile tottime: includes the tensor
arithmetic written with operators inside those functions) and in diffusers' hook registry, on the reference model at
budget 0.5 (20 samples, 50 DDIM steps, 2 threads). Usage: python bench/overhead/python_time.py"""

import cProfile
import pstats
import time

from case import fitted, run

for name in ("toca", "fora", "forecast_fora", "uniform"):
    s = fitted[name]
    run(s)
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable()
    run(s)
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
