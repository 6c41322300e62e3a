"""Where time goes in a cached trajectory on the reference model: torch.profiler's self CPU time per op, dense
against a schedule fitted to budget 0.5 (20 samples, 50 DDIM steps, 2 threads).
Usage: python bench/overhead/profile_ops.py toca   (or fora, forecast_fora, uniform, duca)"""

import sys

from case import fitted, run
from torch.profiler import ProfilerActivity, profile

s = fitted[sys.argv[1]]
run(None)
run(s)
res = {}
for name, sc in (("dense", None), ("cached", s)):
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_stack=(name == "cached")) as prof:
        run(sc)
    res[name] = {e.key: (e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()}
    if name == "cached":
        print(
            prof.key_averages(group_by_stack_n=4).table(
                sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60
            )
        )
keys = sorted(set(res["dense"]) | set(res["cached"]), key=lambda k: -res["cached"].get(k, (0, 0))[1])
print(f"{'op':45s} {'dense n':>8s} {'dense ms':>9s} {'cached n':>8s} {'cached ms':>9s}")
for k in keys[:30]:
    d, c = res["dense"].get(k, (0, 0)), res["cached"].get(k, (0, 0))
    print(f"{k[:45]:45s} {d[0]:8d} {d[1]:9.1f} {c[0]:8d} {c[1]:9.1f}")
