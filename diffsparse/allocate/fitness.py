"""The fitness of a schedule for search: sample a handful of fixed conditions and noises with it, compare.

As in Diff-ES (section 3.2: a small fixed batch, a cheap reference-based metric such as SSIM against the full
model's samples), or the evaluation harness's FD / class accuracy on the feature network (reference model only).
Higher is better for every metric (distances are negated). The conditions use the training seed range, so a
searched schedule is judged by `python -m diffsparse.evaluate` on noise it never saw.
"""

from __future__ import annotations

import torch

from diffsparse.cache import apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.cache.control import set_soft_choice
from diffsparse.evaluate.metrics import frechet_distance, l2, lpips_metric, psnr, ssim
from diffsparse.learn.data import TRAIN_SEED_OFFSET
from diffsparse.models.handle import ModelHandle
from diffsparse.models.sampling import initial_noise, sample
from diffsparse.reference.digits import load_digits
from diffsparse.reference.featurenet import load_feature_net
from diffsparse.schedule import Schedule

METRICS = ("ssim", "psnr", "l2", "lpips", "fd", "accuracy")


class SampleFitness:
    """`fitness(schedule)`: quality of `schedule` on `samples` fixed class-conditional samples (higher is better).

    The token cache stays applied to the model between calls (only its schedule changes); call `close()` (or use
    it as a context manager) to take it off. With `token_cache=False` no cache is applied and `score()` rates the
    model as it is set up by the caller (a routed pruned model, say).
    """

    def __init__(
        self,
        ref: ModelHandle,
        num_steps: int,
        metric: str = "ssim",
        samples: int = 16,
        sampler: str = "ddim",
        guidance: float = 1.25,
        selector: str = "toca",
        seed: int = TRAIN_SEED_OFFSET,
        token_cache: bool = True,
    ):
        if metric not in METRICS:
            raise ValueError(f"Unknown fitness metric {metric!r}; choose one of {METRICS}.")
        if ref.text_conditioned:
            raise NotImplementedError("Search fitness samples class-conditional models only, for now.")
        self.ref, self.num_steps, self.metric, self.sampler, self.guidance = ref, num_steps, metric, sampler, guidance
        self.labels = torch.arange(samples) % ref.num_classes
        self.noise = initial_noise(samples, ref.sample_shape, seed)
        self.dense = self._images()
        self._distance = None
        if metric == "lpips":
            self._distance = lpips_metric(required=True)  # raises with what to do when the weights are missing
        if metric in ("fd", "accuracy"):
            self._net = load_feature_net()
            with torch.no_grad():
                self._real = self._net.features(load_digits()[0]).numpy()
        self.token_cache = token_cache
        if token_cache:
            units = cacheable_units(ref.transformer)
            apply_token_cache(ref.transformer, Schedule.uniform(units, num_steps, 0.0), selector=selector)

    def _images(self) -> torch.Tensor:
        with torch.no_grad():
            x = sample(self.ref.transformer, self.ref.scheduler(self.sampler), self.labels, self.noise,
                       self.num_steps, self.guidance)  # fmt: skip
            return (self.ref.decode(x).clamp(-1, 1) + 1) / 2

    def __call__(self, schedule: Schedule) -> float:
        if not self.token_cache:
            raise RuntimeError("This fitness was made with token_cache=False: set the model up and call score().")
        set_soft_choice(self.ref.transformer, schedule, None)
        return self.score()

    def score(self) -> float:
        """The metric of the model's samples as it is now against the dense samples (higher is better)."""
        x = self._images()
        if self.metric == "ssim":
            return float(ssim(x, self.dense).mean())
        if self.metric == "psnr":
            return float(psnr(x, self.dense).mean())
        if self.metric == "l2":
            return -float(l2(x, self.dense).mean())
        if self.metric == "lpips":
            return -float(self._distance(x, self.dense).mean())
        with torch.no_grad():
            features = self._net.features(x * 2 - 1)
        if self.metric == "fd":
            return -frechet_distance(features.numpy(), self._real)
        return float((self._net.head(features).argmax(1) == self.labels).double().mean())

    def close(self) -> None:
        if self.token_cache:
            remove_token_cache(self.ref.transformer)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
