"""Pausing a sampling loop between steps and resuming it, also under another schedule (what the refinement's
paused rollouts rest on)."""

import pytest
import torch

from diffsparse import apply_token_cache, cacheable_units
from diffsparse.allocate.baselines import toca
from diffsparse.backbones import build_transformer
from diffsparse.cache.control import set_soft_choice
from diffsparse.models.sampling import initial_noise, make_scheduler, sample
from diffsparse.reference.model import NOISE_SCHEDULE

STEPS = 8


@pytest.fixture(scope="module")
def cached():
    model = build_transformer("dit", "tiny", sample_size=16, in_channels=1, num_classes=10).requires_grad_(False)
    units = cacheable_units(model)
    first = toca(units, STEPS, interval=3).with_forecast(True)  # partial steps, forecasting the reused tokens
    apply_token_cache(model, first)
    return model, first, toca(units, STEPS, interval=2).with_forecast(True)


def run(model, schedule, **options):
    set_soft_choice(model, schedule, None)
    noise = initial_noise(2, (1, 16, 16), seed=3)
    with torch.no_grad():
        return sample(model, make_scheduler("ddim", NOISE_SCHEDULE), torch.tensor([1, 7]), noise, STEPS, 2.0,
                      **options)  # fmt: skip


def test_a_resumed_loop_ends_where_the_whole_loop_does_as_often_as_it_is_resumed(cached):
    model, schedule, _ = cached
    whole = run(model, schedule)
    paused = run(model, schedule, pause_at=3)
    assert paused.step == 3 and paused.x.shape == whole.shape
    for _ in range(2):  # the pause is left as it was: the cache state comes back from a copy
        assert torch.equal(run(model, schedule, resume=paused), whole)
    assert torch.equal(run(model, schedule), whole)  # a whole loop after a pause sees nothing of it


def test_another_schedule_that_acts_the_same_before_the_pause_resumes_from_it(cached):
    model, schedule, other = cached
    a, b = schedule.action_indices(), other.action_indices()
    agree = next(t for t in range(STEPS) if (a[t] != b[t]).any())
    assert agree > 1
    paused = run(model, schedule, pause_at=agree)
    assert torch.equal(run(model, other, resume=paused), run(model, other))
    with pytest.raises(ValueError, match="Cannot run steps"):
        run(model, schedule, pause_at=STEPS + 1)
