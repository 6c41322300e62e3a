"""Best fitness against wall-clock minutes for the searches in this folder (from their CSV logs).

python bench/search-digits-ddim50/plot_progress.py   (after copying each run's folder here as <algorithm>/)
"""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent

fig, ax = plt.subplots(figsize=(6, 3.5))
for name in ("evolution", "genetic", "random", "greedy"):
    path = HERE / name / "logs" / "version_0" / "metrics.csv"
    if not path.is_file():
        continue
    rows = list(csv.DictReader(path.open()))
    minutes = [float(r["search/minutes"]) for r in rows]
    best = [float(r["search/best"]) for r in rows]
    ax.step(minutes, best, where="post", marker=".", label=f"{name} ({rows[-1]['search/evaluated']} candidates)")
ax.set_xlabel("wall-clock minutes")
ax.set_ylabel("best fitness (SSIM vs dense, 16 samples)")
ax.set_title("stage-wise search on the reference model, 50 DDIM steps, half the MACs", fontsize=9)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(HERE / "progress.png", dpi=120)
