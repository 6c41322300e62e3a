"""The MLP's norm and modulation on its fresh rows only (`BlockList.fresh_mlp`, part of `skip_blocks`) against the
stock block at partial MLP steps, alternated with dense in one process (reference model, budget 0.5, 20 samples,
1 warm-up and 7 rounds); also checks the two give the same samples bit for bit.

Usage: python bench/overhead/fresh_mlp_ab.py [method ...]     # default: uniform toca duca

ToCa, DuCa and uniform reuse no whole block at 0.5 here, so `skip_blocks=False` turns off only the fresh-row MLP
path; the gain is the stock-block time over the fresh-row time within each round.
"""

import statistics
import sys

import torch
from case import fitted, run

from diffsparse.evaluate.timing import alternate, timed


def main() -> None:
    methods = sys.argv[1:] or ["uniform", "toca", "duca"]
    runs = {"dense": timed(run)}
    for m in methods:
        runs[m + " (stock block)"] = timed(lambda m=m: run(fitted[m], skip_blocks=False))
        runs[m] = timed(lambda m=m: run(fitted[m]))
    t = alternate(runs, rounds=7)
    print(f"dense {t.median_seconds('dense') * 1e3:.1f} ms")
    for m in methods:
        stock = m + " (stock block)"
        print(f"{m}: samples equal bit for bit: {torch.equal(t.outputs[stock], t.outputs[m])}")
        for name in (stock, m):
            s = t.speedup(name)
            print(f"  {name:22s} {s.median:.3f}x ({s.low:.3f}-{s.high:.3f}), {t.median_seconds(name) * 1e3:.1f} ms")
        gain = [a / b for a, b in zip(t.seconds[stock], t.seconds[m], strict=True)]
        print(f"  gain per round: median {statistics.median(gain):.4f} (min {min(gain):.4f}, max {max(gain):.4f})")


if __name__ == "__main__":
    main()
