"""`python -m diffsparse.evaluate`: every way of saving compute, side by side on one model, from the same noise.

For a model, a sampler, a step count and a MAC budget, it builds the methods (dense, fewer steps, the hand-made
schedules fitted to the budget, diffusers' own caches tuned to it), samples the same conditions (classes cycling
through the model's own, or the captions of `--captions` for a text-conditional model) from the same noise with
each, and writes one table (results.md, results.csv, results.json) with MACs per image (counted by
`FlopCounterMode` over the real run), MAC reduction (rows more than `--budget-tolerance` off the budget flagged),
wall-clock speed-up (dense and method alternated in this process), PSNR / SSIM / L2 (and LPIPS when its weights
are present) of the decoded images against the dense samples, and, given a feature network for the data
(`--feature-net`; the shipped digits one by default for the reference model), FD and class accuracy; every
quality number with a 95 % bootstrap interval over the samples. Sample grids go to samples/<method>.png and an
overview to overview.png. Every setting that cannot work is refused before any sampling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffsparse.accounting.macs import flop_counter
from diffsparse.backbones.registry import backbone_for
from diffsparse.cache.selectors import make_selector
from diffsparse.evaluate.budget import budget_table, fit_schedules
from diffsparse.evaluate.builders import BUILDERS
from diffsparse.evaluate.cli import (
    ALL_METHODS,
    EvalConfig,
    UsageError,
    check_config,
    default_feature_net,
    model_defaults,
    parse_args,
    row_name,
    schedules_at,
)
from diffsparse.evaluate.compare import add_paired_differences, budget_check
from diffsparse.evaluate.methods import SCHEDULE_METHODS, Fitting, Method, Unavailable, applied
from diffsparse.evaluate.metrics import (
    fd_estimate,
    l2,
    lpips_metric,
    mean_estimate,
    psnr,
    ssim,
)
from diffsparse.evaluate.results import write_results
from diffsparse.evaluate.timing import Speedup, Stopwatch, speedup
from diffsparse.models.captions import CAPTION_LABELS, forward_conditions, load_captions, null_conditions
from diffsparse.models.handle import ModelHandle
from diffsparse.models.loading import load_model
from diffsparse.models.sampling import initial_noise, sample, sample_batched
from diffsparse.prune.plan import PrunePlan
from diffsparse.reference.digits import to_unit_range
from diffsparse.reference.featurenet import feature_net_and_data
from diffsparse.schedule import Schedule

__all__ = ["ALL_METHODS", "EvalConfig", "UsageError", "evaluate", "parse_args"]

log = logging.getLogger(__name__)


@dataclass
class Conditions:
    """What sample i is conditioned on: class i mod the model's classes, or caption i mod the captions."""

    values: torch.Tensor | dict  # class ids (N,), or the transformer's text keywords as batch-first tensors
    guidance: dict  # `sample`'s unconditional half: `null_class`, or `null_conditions` (the empty prompt)
    labels: torch.Tensor | None  # class ids, for class accuracy
    distinct: int  # classes or captions (the sample grids' columns, when few)
    description: str
    classes: int | None = None  # the classes `labels` come from, where not `distinct` (captions with classes)

    def first(self, n: int) -> torch.Tensor | dict:
        if isinstance(self.values, torch.Tensor):
            return self.values[:n]
        return {k: v[:n] for k, v in self.values.items()}


def make_conditions(ref: ModelHandle, cfg: EvalConfig) -> Conditions:
    """`cfg.samples` conditions: the model's classes in turn, or (text-conditional) the captions of `cfg.captions`."""
    if ref.text_conditioned:
        if cfg.captions is None:
            raise UsageError(
                f"{cfg.model} is text-conditional: pass --captions PATH, caption embeddings made with its own text "
                "encoder by `python -m diffsparse.captions PIPELINE_DIR captions.txt OUT.safetensors` (one caption "
                "per line)."
            )
        tensors, _ = load_captions(cfg.captions)
        text = forward_conditions(tensors)
        dtype = next(ref.transformer.parameters()).dtype
        text = {k: v.to(dtype) if v.is_floating_point() else v for k, v in text.items()}
        count = len(text["encoder_hidden_states"])
        index = torch.arange(cfg.samples) % count
        ref.null_conditions = null_conditions(tensors)
        values = {k: v[index] for k, v in text.items()}
        labels = tensors.get(CAPTION_LABELS)  # captions that name a class (`captions --classes`)
        classes = None if labels is None else int(labels.max()) + 1
        return Conditions(values, {"null_conditions": ref.null_conditions}, None if labels is None else labels[index],
                          count, f"the {count} captions of {Path(cfg.captions).name} in turn", classes)  # fmt: skip
    if cfg.captions is not None:
        raise UsageError(f"--captions: {cfg.model} is class-conditional ({ref.num_classes} classes), not text.")
    n = ref.num_classes
    if n < 1:
        raise UsageError(f"{cfg.model} has no classes to sample (num_classes {n}) and is not text-conditional.")
    labels = torch.arange(cfg.samples) % n
    return Conditions(labels, {"null_class": n}, labels, n, f"{cfg.samples // n} per class")


def as_images(x: torch.Tensor) -> torch.Tensor:
    """Decoded samples as (N, C, H, W) images; a video's frames side by side."""
    if x.ndim == 5:
        n, c, f, h, w = x.shape
        return x.permute(0, 1, 3, 2, 4).reshape(n, c, h, f * w)
    return x


def decoded_shape(ref: ModelHandle) -> tuple[int, ...]:
    """(C, H, W) of the model's decoded images (one decode of zero latents for a latent model)."""
    x = torch.zeros(1, *ref.sample_shape)
    if ref.vae is not None:
        with torch.no_grad():
            x = ref.decode(x.to(next(ref.vae.parameters()).dtype))
    return tuple(as_images(x).shape[1:])


class Runner:
    """Samples a method over a set of conditions and counts its MACs."""

    def __init__(self, ref: ModelHandle, cfg: EvalConfig, conditions: Conditions | None = None):
        self.ref, self.cfg = ref, cfg
        self.conditions = conditions if conditions is not None else make_conditions(ref, cfg)
        self.labels = self.conditions.labels
        self.noise = initial_noise(cfg.samples, ref.sample_shape, cfg.seed)
        self._dense_macs: dict[int, float] = {}
        self.time_table = None  # --budget-unit time: measured once (`budget.budget_table`)

    def dense_macs(self, count: int) -> float:
        """MACs per image of dense sampling on the first `count` conditions (sampled once per count: the budgets
        of a sweep share it)."""
        if count not in self._dense_macs:
            self._dense_macs[count] = self.run(Method("dense", self.cfg.steps), count)[1]
        return self._dense_macs[count]

    def run(self, method: Method, count: int | None = None) -> tuple[torch.Tensor, float]:
        """x0 for the first `count` conditions (default: all), and the MACs per image counted while sampling."""
        n = count or self.cfg.samples
        scheduler = self.ref.scheduler(self.cfg.sampler)
        kwargs = dict(batch_size=self.cfg.batch_size, guidance_scale=self.cfg.guidance, **self.conditions.guidance)
        with applied(method, self.ref.transformer) as model, flop_counter() as counter:
            x = sample_batched(model, scheduler, self.conditions.first(n), self.noise[:n], method.num_steps, **kwargs)
        return x, counter.get_total_flops() / 2 / n

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples as images in [-1, 1] (N, C, H, W): latents through the VAE, `batch_size` at a time."""
        if self.ref.vae is None:
            return as_images(x)
        with torch.no_grad():
            return as_images(torch.cat([self.ref.decode(c).float() for c in x.split(self.cfg.batch_size)]))

    def timing_run(self, method: Method, count: int):
        """A run of `timing.alternate`: `method` set up (outside the clock), then `count` samples timed."""
        c, noise = self.conditions, self.noise[:count]

        def run(clock: Stopwatch) -> None:
            scheduler = self.ref.scheduler(self.cfg.sampler)
            with applied(method, self.ref.transformer) as model, torch.no_grad(), clock:
                sample(model, scheduler, c.first(count), noise, method.num_steps, self.cfg.guidance, **c.guidance)

        return run


def build_methods(cfg: EvalConfig, runner: Runner, schedules: dict[str, Schedule] | None = None) -> list[Method]:
    """The requested methods, each fitted to `cfg.budget` (hand-made schedules analytically, `schedules` when
    already fitted by `fit_schedules`; diffusers' caches by measuring their MACs on `calibration_samples`
    conditions)."""
    ref, steps = runner.ref, cfg.steps
    unknown = sorted(set(cfg.methods) - set(ALL_METHODS))
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {list(ALL_METHODS)}.")
    scheduler = ref.scheduler(cfg.sampler)
    scheduler.set_timesteps(steps)
    table = ref.mac_table()
    if schedules is None:  # fitted before anything is sampled
        schedules = fit_schedules(cfg, runner)
    calib = min(cfg.calibration_samples, cfg.samples)

    def saved(method: Method) -> float:
        return 1.0 - runner.run(method, calib)[1] / runner.dense_macs(calib)

    fit = Fitting(steps, cfg.budget, ref.transformer, schedules, cfg.selector, saved)
    on_macs = [row_name(m) for m in cfg.methods if m not in (*SCHEDULE_METHODS, "dense")]
    if cfg.budget_unit == "time" and on_macs:
        log.warning("--budget-unit time: %s are fitted on their measured MACs, not on time", ", ".join(on_macs))
    methods = []
    for name in cfg.methods:
        try:
            methods.append(BUILDERS[name](fit))
        except Unavailable as e:  # a peer not installed here (or not for this model): its row skipped, and said so
            log.warning("%s: row skipped (%s)", row_name(name), e)
    for item in schedules_at(cfg, cfg.budget):
        name, path = item.split("=", 1)
        sched = Schedule.load(path)
        if sched.num_steps != steps:
            sched = sched.resample(steps)
        sched.check_units(table.units)
        note = f"{Path(path).name}, saves {table.saved_fraction(sched):.1%}"
        if cfg.budget_unit == "time":
            note += f" of MACs, {budget_table(cfg, runner).saved_fraction(sched):.1%} of time (predicted)"
        selector = sched.meta.get("selector") or cfg.selector  # a learned schedule runs with its own selector
        note += f", selector {selector}" if selector != cfg.selector else ""
        methods.append(Method(name, steps, sched, selector, note=note))
    for item in cfg.pruned:
        methods.extend(pruned_methods(item, cfg, scheduler.timesteps.tolist()))
    return methods


def pruned_methods(item: str, cfg: EvalConfig, timesteps) -> list[Method]:
    """The row(s) of a pruning plan `NAME=DIR`: weights routed in, and (if `cfg.stitched` asks) stitched copies."""
    name, path = item.split("=", 1)
    plan = PrunePlan.load(path)
    if plan.meta.get("sampler", cfg.sampler) != cfg.sampler or int(plan.meta.get("num_steps", cfg.steps)) != cfg.steps:
        log.warning("%s was planned for %s %s steps; evaluated with %s %d steps", name, plan.meta.get("sampler"),
                    plan.meta.get("num_steps"), cfg.sampler, cfg.steps)  # fmt: skip
    m = plan.meta
    prep = m.get("calibration_minutes", 0) + m.get("pruning_minutes", 0) + m.get("search_minutes", 0)
    note = f"{plan.store.method}, {m.get('schedule')}, levels {'/'.join(map(str, plan.stage_levels))}"
    knobs = {"prep_minutes": prep, "calibration_minutes": m.get("calibration_minutes"),
             "pruning_minutes": m.get("pruning_minutes"), "search_minutes": m.get("search_minutes")}  # fmt: skip
    rows = [Method(name, cfg.steps, note=note, knobs=knobs, pruning=plan)]
    if cfg.stitched is not None and (not cfg.stitched or name in cfg.stitched):
        rows.append(Method(f"{name} (stitched)", cfg.steps, note=note + ", stitched copies", knobs=knobs,
                           pruning=plan, stitched=True))  # fmt: skip
    return rows


def speedup_of(runner: Runner, method: Method, dense: Method, rounds: int, count: int) -> Speedup:
    """Dense time / method time over `rounds` alternations after a warm-up of both (`timing.alternate`)."""
    device = next(runner.ref.transformer.parameters()).device
    return speedup(runner.timing_run(dense, count), runner.timing_run(method, count), rounds, device=device)


def prepare(ref: ModelHandle, cfg: EvalConfig):
    """The checks that need the model, before any sampling: the sampler and the token selector fit it, its
    conditions, and the feature network's image size. Returns the conditions and (feature network, features of
    the real images), or None without a feature network."""
    cfg.sampler, cfg.selector = model_defaults(ref, cfg)
    try:
        ref.scheduler(cfg.sampler)
    except ValueError as e:
        raise UsageError(f"--sampler {cfg.sampler}: {e}") from e
    defaults = backbone_for(ref.transformer).selector_defaults
    try:
        make_selector(cfg.selector, defaults)
    except ValueError as e:
        raise UsageError(f"--selector {cfg.selector}: {e}") from e
    conditions = make_conditions(ref, cfg)
    if cfg.feature_net == "none":
        return conditions, None
    shape = decoded_shape(ref)
    net, real_images = feature_net_and_data(cfg.feature_net)
    if not net.accepts(tuple(shape)):
        wanted, got = " x ".join(map(str, net.input_shape)), " x ".join(map(str, shape))
        raise UsageError(
            f"--feature-net {cfg.feature_net}: it takes {wanted} images (or whole multiples of that size), "
            f"{cfg.model} decodes to {got}; FD and class "
            "accuracy need a feature network for this model's data: pass one (a folder) or --feature-net none."
        )
    classes = conditions.classes or conditions.distinct
    if conditions.labels is not None and net.num_classes != classes:
        log.warning("No class accuracy: the model has %d classes, the feature network %d.", classes,
                    net.num_classes)  # fmt: skip
        conditions.labels = None
    with torch.no_grad():
        real_features = net.features(real_images).numpy()
    return conditions, (net, real_features)


@dataclass
class Session:
    """What every row of an evaluation shares, at any budget: the config, the loaded model, the conditions, the
    feature network with the real images' features (None without one), the runner and LPIPS (None without its
    weights)."""

    cfg: EvalConfig
    ref: ModelHandle
    conditions: Conditions
    metric: tuple | None
    runner: Runner
    lpips_fn: Callable | None


def start(cfg: EvalConfig) -> Session:
    """Check `cfg` (before anything is loaded), settle its defaults (dense first), load the model and run the
    checks that need it; nothing sampled yet."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.methods = ["dense", *(m for m in cfg.methods if m != "dense")]
    if cfg.compare_to is not None:
        cfg.compare_to = row_name(cfg.compare_to)
    if cfg.feature_net is None:
        cfg.feature_net = default_feature_net(cfg.model)
    ref = load_model(cfg.model)
    conditions, metric = prepare(ref, cfg)
    return Session(cfg, ref, conditions, metric, Runner(ref, cfg, conditions), lpips_metric())


@dataclass
class Measured:
    """A method sampled and measured: its row (quality numbers; no timing yet), its images in [0, 1], and what
    the paired columns need: its features (with a feature network) and per-sample L2 / PSNR vs dense."""

    method: Method
    row: dict
    images: torch.Tensor
    features: np.ndarray | None = None
    per_sample: dict[str, np.ndarray] = field(default_factory=dict)

    def copy(self) -> Measured:
        """The same measurement with its own row (a sweep's budgets each add their columns to dense's)."""
        return Measured(self.method, dict(self.row), self.images, self.features, self.per_sample)


def measure(session: Session, method: Method, dense: torch.Tensor | None) -> Measured:
    """Sample `method` on every condition and measure it: MACs, weights, FD and class accuracy (with a feature
    network), and fidelity to the `dense` images ([0, 1]; None: this is dense)."""
    cfg, runner, ref = session.cfg, session.runner, session.ref
    x, macs = runner.run(method)
    decoded = runner.decode(x)
    images = to_unit_range(decoded)
    row = {"method": method.name, "steps": method.num_steps, "setting": method.note, "gmacs_per_image": macs / 1e9,
           "weights_mb": method.weight_bytes(ref.transformer) / 2**20}  # fmt: skip
    measured = Measured(method, row, images)
    if method.pruning is not None:
        row["prep_minutes"] = method.knobs["prep_minutes"]
    if session.metric is not None:
        net, real_features = session.metric
        with torch.no_grad():
            features = net.features(decoded.clamp(-1, 1))
            logits = net.head(features)
        measured.features = features.numpy()
        row["fd"] = fd_estimate(measured.features, real_features, rounds=max(cfg.bootstrap_rounds // 5, 20))
        labels = session.conditions.labels
        if labels is not None:
            row["accuracy"] = mean_estimate((logits.argmax(1) == labels).double(), cfg.bootstrap_rounds)
    if dense is not None:
        measured.per_sample = {"l2": l2(images, dense).numpy(), "psnr": psnr(images, dense).numpy()}
        row["l2"] = mean_estimate(measured.per_sample["l2"], cfg.bootstrap_rounds)
        row["psnr"] = mean_estimate(measured.per_sample["psnr"], cfg.bootstrap_rounds)
        row["ssim"] = mean_estimate(ssim(images, dense), cfg.bootstrap_rounds)
        if session.lpips_fn is not None:
            row["lpips"] = mean_estimate(session.lpips_fn(images, dense), cfg.bootstrap_rounds)
    return measured


def finish(session: Session, cfg: EvalConfig, measured: list[Measured], speedups: list[Speedup], command: str,
           out: Path) -> list[dict]:  # fmt: skip
    """The table of one budget (`cfg.budget`; dense first in `measured`, then `speedups` row by row): paired Δ
    columns, MAC reduction and budget check, speed-ups; written to `out` with the sample grids. Returns the rows."""
    rows = [m.row for m in measured]
    if cfg.compare_to is not None:
        features_of = {m.method.name: m.features for m in measured if m.features is not None}
        per_sample = {m.method.name: m.per_sample for m in measured if m.per_sample}
        add_paired_differences(rows, features_of, per_sample, session.metric[1] if session.metric else None, cfg)
    dense_macs = rows[0]["gmacs_per_image"]
    for row, speed, (saved, off) in zip(rows, speedups, budget_check(rows, dense_macs, cfg), strict=True):
        row["mac_reduction"] = dense_macs / row["gmacs_per_image"]
        row.update(speed.as_row())
        row["saved_macs"], row["off_budget"] = saved, off
    c = session.conditions
    images = {m.method.name: m.images for m in measured}
    write_results(rows, images, cfg, command, out, c.description, c.distinct if c.distinct <= 16 else 8)
    return rows


def evaluate(cfg: EvalConfig, command: str = "") -> list[dict]:
    """Run the evaluation described by `cfg` at its one budget; write the table, samples and overview to
    `cfg.output_dir`. (`--budgets`, a sweep over several: `diffsparse.evaluate.pareto.sweep`.)"""
    if cfg.budgets:
        raise ValueError("cfg.budgets: a sweep over several budgets is diffsparse.evaluate.pareto.sweep(cfg)")
    session = start(cfg)
    methods = build_methods(cfg, session.runner)
    measured = []
    for method in tqdm(methods, desc="methods"):
        measured.append(measure(session, method, measured[0].images if measured else None))
    timing_count = min(cfg.timing_samples, cfg.samples)
    speedups = [Speedup(1.0, 1.0, 1.0)]
    for method in tqdm(methods[1:], desc="timing"):
        speedups.append(speedup_of(session.runner, method, methods[0], cfg.rounds, timing_count))
    return finish(session, cfg, measured, speedups, command, Path(cfg.output_dir))
