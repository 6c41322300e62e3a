"""The case the overhead scripts share: the reference model on 2 threads, the hand-made schedules fitted to
budget 0.5 (50 DDIM steps), 20 conditions and noises, and one sampling run with or without a schedule."""

import torch

from diffsparse.allocate import baselines
from diffsparse.cache import apply_token_cache, remove_token_cache
from diffsparse.models.loading import load_model
from diffsparse.models.sampling import initial_noise, sample

STEPS, GUIDANCE, SAMPLES = 50, 1.25, 20

torch.set_num_threads(2)
ref = load_model("reference")
model = ref.transformer
_timesteps = ref.scheduler("ddim")
_timesteps.set_timesteps(STEPS)
fitted = baselines.budget_schedules(ref.mac_table(), _timesteps.timesteps.tolist(), 0.5)
classes, noise = torch.arange(SAMPLES) % 10, initial_noise(SAMPLES, ref.sample_shape, 0)


def run(schedule=None, **options) -> torch.Tensor:
    """One trajectory of the 20 samples: dense, or with `schedule` (selector toca; `options`: other
    `apply_token_cache` keywords) applied for its length."""
    if schedule is not None:
        apply_token_cache(model, schedule, selector="toca", **options)
    try:
        with torch.no_grad():
            return sample(model, ref.scheduler("ddim"), classes, noise, STEPS, GUIDANCE)
    finally:
        if schedule is not None:
            remove_token_cache(model)
