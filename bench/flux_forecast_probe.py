"""Our forecast against diffusers' TaylorSeer on the shipped FLUX digits model, on the same steps and units.

`python bench/flux_forecast_probe.py`: 8 captions, 20 flow-matching steps; TaylorSeer's steps (3 full, then a full
step every 2) for the dual-stream attention units alone, their MLPs alone, the single-stream blocks alone, and all
of them, with our `forecast_warmup` schedule and with `TaylorSeerCacheConfig(cache_interval=2)`; PSNR of each
against dense, and of ours against theirs (100 dB: the same images). About a minute on 2 cores.
"""

from re import fullmatch

import numpy as np
import torch
from diffusers.hooks import TaylorSeerCacheConfig

from diffsparse import Schedule, apply_token_cache, cacheable_units, load_model, remove_token_cache
from diffsparse.allocate.baselines import forecast_warmup
from diffsparse.evaluate.metrics import psnr

pipe = load_model("digits-flux").pipeline
pipe.set_progress_bar_config(disable=True)
model, prompts = pipe.transformer, ["the digit seven", "a small two", "a large nine", "one"] * 2
units = cacheable_units(model)


def run():
    g = torch.Generator().manual_seed(0)
    return pipe(prompts, height=32, width=32, num_inference_steps=20, max_sequence_length=8, generator=g,
                output_type="pt").images  # fmt: skip


dense = run()
attn, ff, single = (
    r"transformer_blocks\.\d+\.attn",
    r"transformer_blocks\.\d+\.ff(_context)?",
    r"single_transformer_blocks\.\d+",
)
groups = {"dual-stream attention": [attn], "dual-stream MLPs": [ff], "single-stream blocks": [single],
          "all units": [attn, ff, single]}  # fmt: skip
for name, patterns in groups.items():
    # our units split FLUX's joint attention module into its image and text streams (attn, attn_context)
    columns = np.array([any(fullmatch(p + r"(_context)?", u) for p in patterns) for u in units])
    grid = forecast_warmup(units, 20, interval=2).grid * columns[None]
    apply_token_cache(model, Schedule(grid, units, forecast=grid > 0))
    ours = run()
    remove_token_cache(model)
    config = TaylorSeerCacheConfig(cache_interval=2, max_order=1, taylor_factors_dtype=torch.float32,
                                   cache_identifiers=patterns)  # fmt: skip
    model.enable_cache(config)
    theirs = run()
    model.disable_cache()
    print(f"{name}: ours {psnr(ours, dense).mean():.2f} dB, TaylorSeer {psnr(theirs, dense).mean():.2f} dB, "
          f"ours vs TaylorSeer {psnr(ours, theirs).mean():.2f} dB")  # fmt: skip
