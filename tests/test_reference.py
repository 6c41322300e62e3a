"""Digits data, the feature network, the reference DiT (training, saving, loading) and the sampling loop."""

import copy
import math

import pytest
import torch

from diffsparse import Schedule, apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.backbones import build_transformer
from diffsparse.models.sampling import initial_noise, make_scheduler, sample
from diffsparse.reference.digits import load_digits, split, to_unit_range
from diffsparse.reference.featurenet import load_feature_net, train_feature_net
from diffsparse.reference.model import DEFAULT_GUIDANCE, NOISE_SCHEDULE, load_reference
from diffsparse.reference.training import constant_ema, train_reference, warmup_cosine


def test_digits_are_16px_in_range_and_split_stratified():
    images, labels = load_digits()
    assert images.shape == (1797, 1, 16, 16)
    assert images.min() == -1 and images.max() == 1
    train, test = split(labels, 0.2, seed=0)
    assert len(set(train.tolist()) & set(test.tolist())) == 0 and len(train) + len(test) == 1797
    for c in range(10):
        share = (labels[test] == c).sum() / (labels == c).sum()
        assert abs(float(share) - 0.2) < 0.02
    assert torch.equal(split(labels, 0.2, seed=0)[1], test)
    assert to_unit_range(images).min() == 0


def test_feature_net_trains_saves_and_loads(tmp_path):
    config = train_feature_net(tmp_path, epochs=2)
    assert config["held_out_accuracy"] > 0.5  # two epochs: far above chance (0.1)
    net = load_feature_net(tmp_path)
    images, _ = load_digits()
    assert net.features(images[:5]).shape == (5, 64)


def test_missing_weights_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.py --config-name feature_net"):
        load_feature_net(tmp_path)
    with pytest.raises(FileNotFoundError, match="train.py --config-name reference"):
        load_reference(tmp_path)


def test_reference_training_round_trips_through_from_pretrained(tmp_path):
    recipe = train_reference(tmp_path, steps=3, batch_size=8, warmup=1, log_every=1)
    assert recipe["steps"] == 3 and (tmp_path / "loss.csv").read_text().count("\n") == 4
    ref = load_reference(tmp_path)
    assert ref.sample_shape == (1, 16, 16)
    assert not any(p.requires_grad for p in ref.transformer.parameters())
    assert ref.noise_schedule == NOISE_SCHEDULE


def _hand_written_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """The learning rate the reference model was trained with before torch's schedulers took over."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize(("total", "warmup"), [(5000, 200), (40, 5), (3, 1), (10, 0), (10, 10), (10, 20)])
def test_the_learning_rate_schedule_gives_the_hand_written_values(total, warmup):
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    schedule = warmup_cosine(optimizer, total, warmup)
    for step in range(total):
        expected = _hand_written_lr(step, total, 1e-3, warmup)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=0), step
        optimizer.step()
        schedule.step()


def test_the_ema_is_the_hand_written_one():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    by_hand = copy.deepcopy(model).requires_grad_(False)
    ema = constant_ema(model, 0.9)
    for _ in range(10):
        with torch.no_grad():
            for p, q in zip(model.parameters(), by_hand.parameters(), strict=True):
                p.add_(torch.randn_like(p))
                q.lerp_(p, 1 - 0.9)
        ema.step(model.parameters())
    for shadow, q in zip(ema.shadow_params, by_hand.parameters(), strict=True):
        torch.testing.assert_close(shadow, q, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    return build_transformer("dit", "tiny", sample_size=16, in_channels=1, num_classes=10)


def _sample(model, steps=4, sampler="ddim", guidance=2.0):
    noise = initial_noise(3, (1, 16, 16), seed=5)
    with torch.no_grad():
        return sample(model, make_scheduler(sampler, NOISE_SCHEDULE), torch.tensor([1, 2, 3]), noise, steps, guidance)


def test_initial_noise_of_a_sample_does_not_depend_on_the_batch():
    assert torch.equal(initial_noise(5, (1, 4, 4), seed=3)[2:], initial_noise(3, (1, 4, 4), seed=5))


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_sampling_is_repeatable_and_sparsity_zero_is_exact(tiny, sampler):
    dense = _sample(tiny, sampler=sampler)
    assert torch.equal(dense, _sample(tiny, sampler=sampler))
    apply_token_cache(tiny, Schedule.uniform(cacheable_units(tiny), 4, 0.0))
    try:
        assert torch.equal(_sample(tiny, sampler=sampler), dense)
    finally:
        remove_token_cache(tiny)


def test_second_call_does_not_see_the_first_calls_cache(tiny):
    apply_token_cache(tiny, Schedule.uniform(cacheable_units(tiny), 4, 0.75))
    try:
        first = _sample(tiny)
        assert torch.equal(_sample(tiny), first)
    finally:
        remove_token_cache(tiny)
    assert not torch.equal(first, _sample(tiny))  # the cache changed the result, and removing it undid that


def test_guidance_scale_one_runs_a_single_batch(tiny):
    calls = []
    handle = tiny.register_forward_pre_hook(
        lambda m, a, k: calls.append((a[0] if a else k["hidden_states"]).shape[0]), with_kwargs=True
    )
    try:
        _sample(tiny, steps=2, guidance=1.0)
        _sample(tiny, steps=2, guidance=3.0)
    finally:
        handle.remove()
    assert calls == [3, 3, 6, 6]


def test_shipped_reference_model_loads_offline_and_draws_the_asked_digits():
    """The shipped weights and feature network: dense 50-step DDIM samples of 30 conditions, classified."""
    ref = load_reference()
    net = load_feature_net()
    labels = torch.arange(30) % 10
    noise = initial_noise(30, ref.sample_shape, seed=1000)
    with torch.no_grad():
        x = sample(ref.transformer, ref.scheduler("ddim"), labels, noise, 50, guidance_scale=DEFAULT_GUIDANCE)
        accuracy = (net(x.clamp(-1, 1)).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.9


def test_the_feature_net_measures_a_32px_digit_as_its_16px_self_and_refuses_other_sizes():
    net = load_feature_net()
    images, _ = load_digits()
    small = images[:8]
    large = torch.nn.functional.interpolate(small, scale_factor=2, mode="nearest")  # each pixel a 2 x 2 block
    with torch.no_grad():
        assert torch.allclose(net.features(large), net.features(small), atol=1e-6)
    assert net.accepts((1, 32, 32)) and not net.accepts((1, 24, 24)) and not net.accepts((3, 32, 32))
    with pytest.raises(ValueError, match="16 k"):
        net.features(torch.zeros(2, 1, 24, 24))
