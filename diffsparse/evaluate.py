"""`python -m diffsparse.evaluate`: every way of saving compute, side by side on one model, from the same noise.

For a model, a sampler, a step count and a MAC budget, it builds the methods (dense, fewer steps, the hand-made
schedules fitted to the budget, diffusers' own caches tuned to it), samples the same classes from the same noise
with each, and writes one table (results.md, results.csv, results.json) with MACs per image (counted by
`FlopCounterMode` over the real run), MAC reduction, wall-clock speed-up (dense and method alternated in this
process), FD and class accuracy on the feature network, PSNR / SSIM (and LPIPS when its weights are present)
against the dense samples; every quality number with a 95 % bootstrap interval over the samples. Sample grids go
to samples/<method>.png and an overview to overview.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import baselines
from .cache.macs import flop_counter
from .digits import NUM_CLASSES, load_digits, to_unit_range
from .featurenet import load_feature_net
from .files import atomic_path
from .methods import Method, applied, first_block_cache, fit_threshold, pyramid_attention_broadcast, taylorseer
from .metrics import (
    Estimate,
    fd_estimate,
    frechet_distance,
    l2,
    lpips_metric,
    mean_estimate,
    paired_difference,
    psnr,
    ssim,
)
from .reference import DEFAULT_GUIDANCE, Reference, load_model
from .sampling import initial_noise, sample, sample_batched
from .schedule import Schedule

log = logging.getLogger(__name__)

ALL_METHODS = ("dense", "fewer-steps", "fora", "toca", "duca", "uniform", "snr-stages", "fbc", "taylorseer", "pab")
SCHEDULE_METHODS = {"fora": "fora", "toca": "toca", "duca": "duca", "uniform": "uniform", "snr-stages": "snr_stages"}
UNIT_PATTERN = r"transformer_blocks\.\d+\.(attn1|attn2|ff)"


@dataclass
class EvalConfig:
    model: str = "reference"
    sampler: str = "ddim"
    steps: int = 50
    budget: float = 0.5
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    samples: int = 500
    batch_size: int = 250
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    selector: str = "toca"
    rounds: int = 3
    timing_samples: int = 50
    calibration_samples: int = 50
    bootstrap_rounds: int = 1000
    threads: int | None = None
    output_dir: str = "eval"
    schedules: list[str] = field(default_factory=list)  # extra rows: NAME=PATH of a schedule JSON
    pruned: list[str] = field(default_factory=list)  # extra rows: NAME=DIR of a pruning plan (train.py task=prune)
    stitched: list[str] | None = None  # also run these pruning plans ([] = all) as stitched copies (MosaicDiff)
    compare_to: str | None = "toca"  # paired differences (FD, L2) of every row against this method's


class Runner:
    """Samples a method over a set of conditions and counts its MACs."""

    def __init__(self, ref: Reference, cfg: EvalConfig):
        self.ref, self.cfg = ref, cfg
        self.labels = torch.arange(cfg.samples) % ref.num_classes
        self.noise = initial_noise(cfg.samples, ref.sample_shape, cfg.seed)

    def run(self, method: Method, count: int | None = None) -> tuple[torch.Tensor, float]:
        """x0 for the first `count` conditions (default: all), and the MACs per image counted while sampling."""
        n = count or self.cfg.samples
        scheduler = self.ref.scheduler(self.cfg.sampler)
        kwargs = dict(batch_size=self.cfg.batch_size, guidance_scale=self.cfg.guidance)
        with applied(method, self.ref.transformer) as model, flop_counter() as counter:
            x = sample_batched(model, scheduler, self.labels[:n], self.noise[:n], method.num_steps, **kwargs)
        return x, counter.get_total_flops() / 2 / n

    def seconds(self, method: Method, count: int) -> float:
        scheduler = self.ref.scheduler(self.cfg.sampler)
        with applied(method, self.ref.transformer) as model, torch.no_grad():
            start = time.perf_counter()
            sample(model, scheduler, self.labels[:count], self.noise[:count], method.num_steps, self.cfg.guidance)
            return time.perf_counter() - start


def build_methods(cfg: EvalConfig, runner: Runner) -> list[Method]:
    """The requested methods, each fitted to `cfg.budget` (hand-made schedules analytically, diffusers' caches by
    measuring their MACs on `calibration_samples` conditions)."""
    ref, steps = runner.ref, cfg.steps
    unknown = sorted(set(cfg.methods) - set(ALL_METHODS))
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {list(ALL_METHODS)}.")
    scheduler = ref.scheduler(cfg.sampler)
    scheduler.set_timesteps(steps)
    table = ref.mac_table()
    schedules = baselines.budget_schedules(table, scheduler.timesteps.tolist(), cfg.budget)
    calib = min(cfg.calibration_samples, cfg.samples)
    dense_macs = None

    def saved(method: Method) -> float:
        nonlocal dense_macs
        if dense_macs is None:
            dense_macs = runner.run(Method("dense", steps), calib)[1]
        return 1.0 - runner.run(method, calib)[1] / dense_macs

    methods = []
    for name in cfg.methods:
        if name == "dense":
            methods.append(Method("dense", steps))
        elif name == "fewer-steps":
            n = baselines.fewer_steps(steps, cfg.budget)
            methods.append(Method("fewer-steps", n, note=f"{n} steps", knobs={"steps": n}))
        elif name in SCHEDULE_METHODS:
            sched = schedules[SCHEDULE_METHODS[name]]
            selector = "norm" if name == "duca" else cfg.selector
            knobs = {k: v for k, v in sched.meta.items() if k != "method"}
            methods.append(Method(name, steps, sched, selector, note=_describe(knobs), knobs=knobs))
        elif name == "fbc":
            threshold = fit_threshold(lambda t: saved(first_block_cache(steps, t)), cfg.budget)
            methods.append(first_block_cache(steps, threshold))
        elif name == "taylorseer":
            options = [taylorseer(steps, n, UNIT_PATTERN) for n in range(2, 7)]
            methods.append(min(options, key=lambda m: abs(saved(m) - cfg.budget)))
        elif name == "pab":
            methods.append(pyramid_attention_broadcast(steps, 2))
    for m in methods:
        if m.diffusers_config is not None:
            m.note = _describe(m.knobs)
    for item in cfg.schedules:
        name, path = item.split("=", 1)
        sched = Schedule.load(path)
        if sched.num_steps != steps:
            sched = sched.resample(steps)
        sched.check_units(table.units)
        note = f"{Path(path).name}, saves {table.saved_fraction(sched):.1%}"
        methods.append(Method(name, steps, sched, cfg.selector, note=note))
    for item in cfg.pruned:
        methods.extend(pruned_methods(item, cfg, scheduler.timesteps.tolist()))
    return methods


def pruned_methods(item: str, cfg: EvalConfig, timesteps) -> list[Method]:
    """The row(s) of a pruning plan `NAME=DIR`: weights routed in, and (if `cfg.stitched` asks) stitched copies."""
    from .prune.plan import PrunePlan

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


def _describe(knobs: dict) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ", ".join(
        f"{k}={fmt(v) if not isinstance(v, list) else '/'.join(fmt(x) for x in v)}" for k, v in knobs.items()
    )


def speedup(runner: Runner, method: Method, dense: Method, rounds: int, count: int) -> tuple[float, float, float]:
    """Median, min and max of dense time / method time over `rounds` alternating runs, after one warm-up each."""
    runner.seconds(dense, count)
    runner.seconds(method, count)
    ratios = []
    for _ in range(rounds):
        t_dense = runner.seconds(dense, count)
        ratios.append(t_dense / runner.seconds(method, count))
    return statistics.median(ratios), min(ratios), max(ratios)


def evaluate(cfg: EvalConfig, command: str = "") -> list[dict]:
    """Run the evaluation described by `cfg`; write the table, samples and overview to `cfg.output_dir`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if "dense" not in cfg.methods:
        cfg.methods = ["dense", *cfg.methods]
    out = Path(cfg.output_dir)
    ref = load_model(cfg.model)
    feature_net = load_feature_net()
    real_images, _ = load_digits()
    with torch.no_grad():
        real_features = feature_net.features(real_images).numpy()
    runner = Runner(ref, cfg)
    methods = build_methods(cfg, runner)
    lpips_fn = lpips_metric()
    rows, images, features_of, l2_of = [], {}, {}, {}
    for method in tqdm(methods, desc="methods"):
        x, macs = runner.run(method)
        images[method.name] = to_unit_range(x)
        with torch.no_grad():
            features = feature_net.features(x.clamp(-1, 1))
            correct = (feature_net.head(features).argmax(1) == runner.labels).double()
        row = {"method": method.name, "steps": method.num_steps, "setting": method.note, "gmacs_per_image": macs / 1e9,
               "weights_mb": method.weight_bytes(ref.transformer) / 2**20}  # fmt: skip
        if method.pruning is not None:
            row["prep_minutes"] = method.knobs["prep_minutes"]
        features_of[method.name] = features.numpy()
        row["fd"] = fd_estimate(features.numpy(), real_features, rounds=max(cfg.bootstrap_rounds // 5, 20))
        row["accuracy"] = mean_estimate(correct, cfg.bootstrap_rounds)
        if method.name != "dense":
            dense_images = images["dense"]
            l2_of[method.name] = l2(images[method.name], dense_images).numpy()
            row["l2"] = mean_estimate(l2_of[method.name], cfg.bootstrap_rounds)
            row["psnr"] = mean_estimate(psnr(images[method.name], dense_images), cfg.bootstrap_rounds)
            row["ssim"] = mean_estimate(ssim(images[method.name], dense_images), cfg.bootstrap_rounds)
            if lpips_fn is not None:
                row["lpips"] = mean_estimate(lpips_fn(images[method.name], dense_images), cfg.bootstrap_rounds)
        rows.append(row)
    if cfg.compare_to in features_of:
        add_paired_differences(rows, features_of, l2_of, real_features, cfg)
    dense_macs = rows[0]["gmacs_per_image"]
    timing_count = min(cfg.timing_samples, cfg.samples)
    for method, row in zip(tqdm(methods, desc="timing"), rows, strict=True):
        row["mac_reduction"] = dense_macs / row["gmacs_per_image"]
        if method.name == "dense":
            row["speedup"], row["speedup_min"], row["speedup_max"] = 1.0, 1.0, 1.0
        else:
            row["speedup"], row["speedup_min"], row["speedup_max"] = speedup(
                runner, method, methods[0], cfg.rounds, timing_count
            )
    write_results(rows, images, cfg, command, out)
    return rows


def add_paired_differences(rows, features_of: dict, l2_of: dict, real_features: np.ndarray, cfg: EvalConfig) -> None:
    """Columns `dfd` and `dl2`: each method's FD and L2 minus those of `cfg.compare_to`, on the same samples, with
    paired bootstrap intervals (an interval below 0 means: better than that method, beyond sampling noise)."""
    base = cfg.compare_to
    for row in rows:
        name = row["method"]
        if name == base:
            continue
        a, b = features_of[name], features_of[base]

        def dfd(i, a=a, b=b):
            return frechet_distance(a[i], real_features) - frechet_distance(b[i], real_features)

        rounds = max(cfg.bootstrap_rounds // 5, 20)
        row["dfd"] = paired_difference(dfd, len(a), rounds, cfg.seed, normal=True)
        if name in l2_of and base in l2_of:
            la, lb = l2_of[name], l2_of[base]
            row["dl2"] = paired_difference(lambda i, la=la, lb=lb: float((la[i] - lb[i]).mean()), len(la),
                                           cfg.bootstrap_rounds, cfg.seed)  # fmt: skip


COLUMNS = ("fd", "accuracy", "l2", "psnr", "ssim", "lpips", "dfd", "dl2")


def write_results(rows: list[dict], images: dict, cfg: EvalConfig, command: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    metrics = [c for c in COLUMNS if any(c in r for r in rows)]
    flat = []
    for r in rows:
        item = {k: v for k, v in r.items() if not isinstance(v, Estimate)}
        for c in metrics:
            e = r.get(c)
            item.update(
                {c: e.value, f"{c}_low": e.low, f"{c}_high": e.high} if e else {c: "", f"{c}_low": "", f"{c}_high": ""}
            )
        flat.append(item)
    _write_atomic(out / "results.csv", lambda f: _csv(f, flat))
    _write_atomic(out / "results.json", lambda f: json.dump({"config": asdict(cfg), "rows": flat}, f, indent=2))
    _write_atomic(out / "results.md", lambda f: f.write(markdown_table(rows, cfg, command)))
    save_grids(images, out)
    print(markdown_table(rows, cfg, command))


def _csv(f, flat: list[dict]) -> None:
    names = list(dict.fromkeys(k for row in flat for k in row))  # rows may add columns (pruning plans)
    writer = csv.DictWriter(f, fieldnames=names, restval="")
    writer.writeheader()
    writer.writerows(flat)


def _write_atomic(path: Path, write) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        write(f)


def markdown_table(rows: list[dict], cfg: EvalConfig, command: str) -> str:
    """The results as a markdown table; intervals are 95 % bootstrap intervals over the samples."""
    metrics = [c for c in COLUMNS if any(c in r for r in rows)]
    names = {"fd": "FD ↓", "accuracy": "accuracy ↑", "l2": "L2 vs dense (x1e-4) ↓", "psnr": "PSNR vs dense ↑",
             "ssim": "SSIM vs dense ↑", "lpips": "LPIPS vs dense ↓",
             "dfd": f"ΔFD vs {cfg.compare_to} ↓", "dl2": f"ΔL2 vs {cfg.compare_to} (x1e-4) ↓"}  # fmt: skip
    digits = {"fd": 2, "accuracy": 3, "l2": 2, "psnr": 2, "ssim": 3, "lpips": 3, "dfd": 2, "dl2": 2}
    scale = {"l2": 1e4, "dl2": 1e4}
    header = ["method", "setting", "steps", "GMACs / image", "MAC reduction", "speed-up (min-max)"]
    pruned = any("prep_minutes" in r for r in rows)
    header += ["weights MB", "prep. min"] if pruned else []
    header += [names[c] for c in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["method"], r["setting"], str(r["steps"]), f"{r['gmacs_per_image']:.4f}", f"{r['mac_reduction']:.2f}x",
            f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})",
        ]  # fmt: skip
        if pruned:
            cells += [f"{r['weights_mb']:.2f}", f"{r['prep_minutes']:.2f}" if "prep_minutes" in r else "—"]
        for c in metrics:
            e, d, k = r.get(c), digits[c], scale.get(c, 1.0)
            cells.append(f"{e.value * k:.{d}f} [{e.low * k:.{d}f}, {e.high * k:.{d}f}]" if e else "—")
        lines.append("| " + " | ".join(cells) + " |")
    settings = (
        f"{cfg.samples} samples ({cfg.samples // NUM_CLASSES} per class), {cfg.sampler} {cfg.steps} steps, "
        f"guidance {cfg.guidance}, budget {cfg.budget:.0%} of dense MACs, selector {cfg.selector}, seed {cfg.seed}; "
        f"speed-up: median of {cfg.rounds} dense/method alternations on {min(cfg.timing_samples, cfg.samples)} "
        f"samples, {torch.get_num_threads()} threads. Brackets: 95 % bootstrap intervals over samples; Δ columns: "
        f"the row minus {cfg.compare_to}, on the same samples, with paired bootstrap intervals."
        + (" Weights MB: parameters kept in memory (routed: the model plus the plan's stored pruned weights; "
           "stitched: one pruned copy per stage). Prep. min: calibration + pruning (+ search) time of the plan."
           if pruned else "")
    )  # fmt: skip
    return "\n".join([f"`{command}`" if command else "", "", *lines, "", settings, ""])


def save_grids(images: dict[str, torch.Tensor], out: Path, per_class: int = 8) -> None:
    """samples/<method>.png: `per_class` rows of one sample per class; overview.png: one row per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid, save_image

    (out / "samples").mkdir(parents=True, exist_ok=True)
    for name, x in images.items():
        n = min(len(x), per_class * NUM_CLASSES)
        big = torch.nn.functional.interpolate(x[:n], scale_factor=4, mode="nearest")
        save_image(make_grid(big, nrow=NUM_CLASSES, padding=2, pad_value=0.5), out / "samples" / f"{name}.png")
    fig, axes = plt.subplots(len(images), 1, figsize=(NUM_CLASSES * 0.6 + 1.5, len(images) * 0.75 + 0.3))
    for ax, (name, x) in zip(np.atleast_1d(axes), images.items(), strict=True):
        row = make_grid(x[:NUM_CLASSES], nrow=NUM_CLASSES, padding=1, pad_value=1.0)
        ax.imshow(row.permute(1, 2, 0).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "overview.png", dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> EvalConfig:
    d = EvalConfig()
    p = argparse.ArgumentParser(
        prog="python -m diffsparse.evaluate",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="Example (the README table): python -m diffsparse.evaluate --steps 50 --budget 0.5 --out eval/ref50",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=d.model, help="'reference' (shipped digits DiT), 'tiny' (random), or a path")
    p.add_argument("--sampler", default=d.sampler, choices=["ddim", "dpm"])
    p.add_argument("--steps", type=int, default=d.steps, help="denoising steps of the dense run")
    p.add_argument("--budget", type=float, default=d.budget, help="fraction of dense MACs to save")
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS, metavar="METHOD",
                   help=f"methods to compare, of: {' '.join(ALL_METHODS)}")  # fmt: skip
    p.add_argument("--samples", type=int, default=d.samples, help="samples per method (classes cycle 0..9)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=d.seed, help="noise seed (sample i uses seed + i)")
    p.add_argument("--selector", default=d.selector, help="token selector of the token-cache schedules")
    p.add_argument("--rounds", type=int, default=d.rounds, help="dense/method timing alternations")
    p.add_argument("--timing-samples", type=int, default=d.timing_samples, help="samples per timing run")
    p.add_argument("--calibration-samples", type=int, default=d.calibration_samples,
                   help="samples used to tune diffusers' caches to the budget")  # fmt: skip
    p.add_argument("--bootstrap-rounds", type=int, default=d.bootstrap_rounds)
    p.add_argument(
        "--schedule",
        dest="schedules",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also evaluate this schedule JSON (e.g. a learned one) as a row called NAME; repeatable",
    )
    p.add_argument("--pruned", action="append", default=[], metavar="NAME=DIR",
                   help="also evaluate this pruning plan (train.py experiment=prune_*: <output_dir>/pruned) as a row "
                        "called NAME; repeatable")  # fmt: skip
    p.add_argument("--stitched", nargs="*", default=None, metavar="NAME",
                   help="also run these pruning plans (no names: all) as one pruned copy per stage (MosaicDiff's "
                        "stitching), to compare its memory with weight routing")  # fmt: skip
    p.add_argument("--compare-to", default=d.compare_to, metavar="METHOD",
                   help="add paired ΔFD / ΔL2 columns against this row ('none': leave them out)")  # fmt: skip
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (default: torch's choice)")
    p.add_argument("--out", dest="output_dir", default=d.output_dir, help="output folder")
    p.add_argument("--quick", action="store_true", help="smoke test: 5 steps, 20 samples, 1 timing round")
    args = vars(p.parse_args(argv))
    if args.pop("quick"):  # smaller defaults; values given on the command line win
        quick = dict(steps=5, samples=20, rounds=1, timing_samples=4, calibration_samples=4, bootstrap_rounds=50)
        args.update({k: v for k, v in quick.items() if args[k] == getattr(d, k)})
    for key in ("steps", "samples", "batch_size", "rounds", "timing_samples", "calibration_samples"):
        if args[key] < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if not 0.0 <= args["budget"] < 1.0:
        p.error("--budget must be in [0, 1)")
    if args["compare_to"] in ("none", ""):
        args["compare_to"] = None
    for item in args["schedules"]:
        name, _, path = item.partition("=")
        if not name or not path:
            p.error(f"--schedule takes NAME=PATH, got {item!r}")
        if not Path(path).is_file():
            p.error(f"--schedule {name}: no file at {path}")
    for item in args["pruned"]:
        name, _, path = item.partition("=")
        if not name or not path:
            p.error(f"--pruned takes NAME=DIR, got {item!r}")
        if not (Path(path) / "plan.json").is_file():
            p.error(f"--pruned {name}: no pruning plan (plan.json) in {path}")
    unknown = set(args["stitched"] or []) - {item.partition("=")[0] for item in args["pruned"]}
    if unknown:
        p.error(f"--stitched names no --pruned plan: {sorted(unknown)}")
    return EvalConfig(**args)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse_args(argv)
    args = sys.argv[1:] if argv is None else argv
    evaluate(cfg, command=shlex.join(["python", "-m", "diffsparse.evaluate", *args]))


if __name__ == "__main__":
    main()
