"""Training mode: with a one-hot choice it reproduces the inference path, and the loss reaches the choice."""

import pytest
import torch

from diffsparse import Schedule, apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.allocate.baselines import toca
from diffsparse.backbones import build_transformer
from diffsparse.cache.control import set_soft_choice
from diffsparse.models.sampling import initial_noise, make_scheduler, sample
from diffsparse.reference.model import NOISE_SCHEDULE

STEPS = 6


@pytest.fixture(scope="module")
def tiny():
    return build_transformer("dit", "tiny", sample_size=16, in_channels=1, num_classes=10).requires_grad_(False)


def _rollout(model, grad=False):
    noise = initial_noise(3, (1, 16, 16), seed=9)
    with torch.set_grad_enabled(grad):
        return sample(model, make_scheduler("ddim", NOISE_SCHEDULE), torch.tensor([1, 5, 7]), noise, STEPS, 2.0)


def _one_hot(schedule: Schedule, requires_grad=False) -> torch.Tensor:
    h = torch.nn.functional.one_hot(torch.as_tensor(schedule.level_indices()), 5).float()
    return h.requires_grad_(requires_grad)


@pytest.mark.parametrize("selector", ["toca", "norm", "random", "similarity"])
def test_train_mode_with_a_hard_choice_equals_inference(tiny, selector):
    sched = toca(cacheable_units(tiny), STEPS, fresh_ratio=0.3, interval=3)
    apply_token_cache(tiny, sched, selector=selector)
    try:
        fast = _rollout(tiny)
        set_soft_choice(tiny, sched, _one_hot(sched))
        blended = _rollout(tiny)
        set_soft_choice(tiny, sched, None)
        again = _rollout(tiny)
    finally:
        remove_token_cache(tiny)
    assert torch.allclose(blended, fast, atol=1e-4), (blended - fast).abs().max()  # GEMM shapes differ
    assert torch.equal(again, fast)


def test_gradients_reach_the_choice_and_not_the_model(tiny):
    units = cacheable_units(tiny)
    sched = Schedule.uniform(units, STEPS, 0.5)
    dense = _rollout(tiny)
    h = _one_hot(sched, requires_grad=True)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    apply_token_cache(tiny, sched)
    try:
        set_soft_choice(tiny, sched, h)
        loss = (_rollout(tiny, grad=True) - dense).pow(2).mean()
        loss.backward()
    finally:
        remove_token_cache(tiny)
    assert h.grad is not None and h.grad[1:].abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())


@pytest.mark.parametrize("selector", ["toca", "random"])
def test_checkpointed_steps_give_the_same_gradients_with_far_fewer_saved_activations(tiny, selector):
    """Gradient checkpointing per step replays the token cache as each step saw it, even when the backward runs
    after the caller switched back to inference (as Lightning's training step does); the live state is kept."""
    sched = toca(cacheable_units(tiny), STEPS, fresh_ratio=0.3, interval=3)
    dense = _rollout(tiny)
    controller = apply_token_cache(tiny, sched, selector=selector)
    grads, saved = [], []
    try:
        for checkpointed in (False, True):
            h = _one_hot(sched, requires_grad=True)
            nbytes = [0]

            def pack(t, nbytes=nbytes):
                nbytes[0] += t.numel() * t.element_size()
                return t

            set_soft_choice(tiny, sched, h)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                noise = initial_noise(3, (1, 16, 16), seed=9)
                scheduler = make_scheduler("ddim", NOISE_SCHEDULE)
                x = sample(tiny, scheduler, torch.tensor([1, 5, 7]), noise, STEPS, 2.0, checkpoint_steps=checkpointed)
            set_soft_choice(tiny, sched, None)
            (x - dense).pow(2).mean().backward()
            assert controller.choice is None and not controller.states  # the recomputation left no trace
            grads.append(h.grad)
            saved.append(nbytes[0])
    finally:
        remove_token_cache(tiny)
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])
    assert saved[1] * 20 < saved[0], saved  # only the scheduler's arithmetic is kept outside the steps
