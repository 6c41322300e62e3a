"""The settings of `python -m diffsparse.evaluate`: its config, the checks that refuse bad ones before any model is
loaded or sampled, and the command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from diffsparse.models.sampling import SCHEDULERS
from diffsparse.reference.featurenet import WEIGHTS as FEATURE_NET_WEIGHTS
from diffsparse.reference.model import DEFAULT_GUIDANCE

ALL_METHODS = ("dense", "fewer-steps", "fora", "toca", "duca", "uniform", "snr-stages", "fbc", "taylorseer", "pab")
# The row a method's key names in the table, where they differ (diffusers' caches go by their class names).
ROW_NAMES = {"fbc": "FirstBlockCache", "taylorseer": "TaylorSeer", "pab": "PAB"}
COUNTS = ("steps", "samples", "batch_size", "rounds", "timing_samples", "calibration_samples", "bootstrap_rounds")


class UsageError(ValueError):
    """A setting that cannot work, found before any sampling."""


@dataclass
class EvalConfig:
    model: str = "reference"
    sampler: str | None = "ddim"  # None: flow for flow-matching models, ddim for the others
    steps: int = 50
    budget: float = 0.5
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    samples: int = 500
    batch_size: int = 250
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    selector: str | None = None  # token selector of the schedules; None: the backbone's (DiT, PixArt: toca)
    rounds: int = 3
    timing_samples: int = 50
    calibration_samples: int = 50
    bootstrap_rounds: int = 1000
    threads: int | None = None
    output_dir: str = "eval"
    schedules: list[str] = field(default_factory=list)  # extra rows: NAME=PATH of a schedule JSON
    pruned: list[str] = field(default_factory=list)  # extra rows: NAME=DIR of a pruning plan (train.py task=prune)
    stitched: list[str] | None = None  # also run these pruning plans ([] = all) as stitched copies (MosaicDiff)
    compare_to: str | None = "toca"  # paired differences (FD, L2) of every row against this row's
    feature_net: str | None = None  # FD / accuracy on: `digits`, a saved feature net's folder, `none`; None: auto
    captions: str | None = None  # caption embeddings (`python -m diffsparse.captions`) of a text-conditional model
    budget_tolerance: float = 0.05  # rows whose MAC saving is further than this from `budget` are flagged


def row_name(method: str) -> str:
    """The table's name of a method key (`fbc` -> `FirstBlockCache`); other names as they are."""
    return ROW_NAMES.get(method, method)


def default_feature_net(model: str) -> str:
    """`digits` for the shipped digits DiT, whose data the shipped feature network knows; `none` otherwise."""
    return "digits" if model == "reference" else "none"


def check_config(cfg: EvalConfig) -> None:
    """Raise `UsageError` for settings that cannot work, before any model is loaded or anything sampled."""
    for key in COUNTS:
        if getattr(cfg, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(cfg, key)}")
    if not 0.0 <= cfg.budget < 1.0:
        raise UsageError(f"--budget must be in [0, 1), got {cfg.budget}")
    if not 0.0 <= cfg.budget_tolerance < 1.0:
        raise UsageError(f"--budget-tolerance must be in [0, 1), got {cfg.budget_tolerance}")
    if cfg.sampler is not None and cfg.sampler not in SCHEDULERS:
        raise UsageError(f"--sampler {cfg.sampler!r}: choose one of {sorted(SCHEDULERS)}")
    unknown = sorted(set(cfg.methods) - set(ALL_METHODS))
    if unknown:
        raise UsageError(f"Unknown methods {unknown}; choose from {list(ALL_METHODS)}.")
    out = Path(cfg.output_dir)
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UsageError(f"--out {out}: {folder} is a file, not a folder")
            break
    rows = [row_name(m) for m in dict.fromkeys(["dense", *cfg.methods])]
    rows += _extra_rows(cfg)
    if cfg.compare_to is not None and row_name(cfg.compare_to) not in rows:
        raise UsageError(
            f"--compare-to {cfg.compare_to}: not a row of this run; choose one of {rows} (or 'none': no Δ columns)"
        )
    if cfg.feature_net not in (None, "digits", "none") and not (Path(cfg.feature_net) / FEATURE_NET_WEIGHTS).is_file():
        raise UsageError(
            f"--feature-net {cfg.feature_net}: neither 'digits', 'none' nor a saved feature network's folder (no "
            f"{FEATURE_NET_WEIGHTS} there; `python train.py --config-name feature_net` writes one)"
        )
    if cfg.captions is not None and not Path(cfg.captions).is_file():
        raise UsageError(
            f"--captions {cfg.captions}: no such file. Make one with `python -m diffsparse.captions PIPELINE_DIR "
            "captions.txt OUT.safetensors` (one caption per line)."
        )


def _extra_rows(cfg: EvalConfig) -> list[str]:
    """The names of the --schedule and --pruned rows, checked: NAME=PATH, a plain file name (it names
    samples/NAME.png under --out), not a built-in row's, each once; and their files present."""
    reserved = {n.lower() for n in (*ALL_METHODS, *ROW_NAMES.values())}
    names = []
    for option, items in (("--schedule", cfg.schedules), ("--pruned", cfg.pruned)):
        for item in items:
            name, _, path = item.partition("=")
            if not name or not path:
                raise UsageError(f"{option} takes NAME={'DIR' if option == '--pruned' else 'PATH'}, got {item!r}")
            if name in (".", "..") or name != Path(name).name or "\\" in name or name != name.strip():
                raise UsageError(
                    f"{option} {name!r}: the row's name must be a plain file name (it names samples/<NAME>.png "
                    "under --out), without folders"
                )
            if name.lower() in reserved:
                raise UsageError(f"{option} {name}: the name of a built-in row; call it something else")
            if name.lower() in {n.lower() for n in names}:
                raise UsageError(f"{option} {name}: two extra rows of that name")
            if option == "--schedule" and not Path(path).is_file():
                raise UsageError(f"--schedule {name}: no file at {path}")
            if option == "--pruned" and not (Path(path) / "plan.json").is_file():
                raise UsageError(f"--pruned {name}: no pruning plan (plan.json) in {path}")
            names.append(name)
    pruned = [item.partition("=")[0] for item in cfg.pruned]
    if cfg.stitched is not None:
        unknown = set(cfg.stitched) - set(pruned)
        if unknown:
            raise UsageError(f"--stitched names no --pruned plan: {sorted(unknown)}")
        names += [f"{n} (stitched)" for n in pruned if not cfg.stitched or n in cfg.stitched]
    return names


def parse_args(argv=None) -> EvalConfig:
    d = EvalConfig()
    p = argparse.ArgumentParser(
        prog="python -m diffsparse.evaluate",
        description="every way of saving compute, side by side on one model, from the same noise.",
        epilog="Example (the README table): python -m diffsparse.evaluate --steps 50 --budget 0.5 --out eval/ref50",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=d.model,
                   help="'reference' (shipped digits DiT), 'tiny' (random), another name of diffsparse.loading, or "
                        "a folder (a saved pipeline, or transformer/ + noise_schedule.json)")  # fmt: skip
    p.add_argument("--sampler", default=None, choices=sorted(SCHEDULERS),
                   help="default: flow for flow-matching models, ddim for the others")  # fmt: skip
    p.add_argument("--steps", type=int, default=d.steps, help="denoising steps of the dense run")
    p.add_argument("--budget", type=float, default=d.budget, help="fraction of dense MACs to save")
    p.add_argument("--budget-tolerance", type=float, default=d.budget_tolerance,
                   help="flag rows whose measured MAC saving is further than this from --budget")  # fmt: skip
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS, metavar="METHOD",
                   help=f"methods to compare, of: {' '.join(ALL_METHODS)}")  # fmt: skip
    p.add_argument("--samples", type=int, default=d.samples,
                   help="samples per method (classes cycle 0..num_classes-1; captions cycle too)")  # fmt: skip
    p.add_argument("--captions", default=d.captions, metavar="PATH",
                   help="caption embeddings to condition a text-conditional model on (write them with `python -m "
                        "diffsparse.captions PIPELINE_DIR captions.txt OUT.safetensors`)")  # fmt: skip
    p.add_argument("--feature-net", default=d.feature_net, metavar="NET",
                   help="FD and class accuracy on this feature network: 'digits' (the shipped one, with the digits "
                        "as real data), a saved feature network's folder, or 'none'. Default: digits for "
                        "--model reference, none for other models")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=d.seed, help="noise seed (sample i uses seed + i)")
    p.add_argument("--selector", default=d.selector,
                   help="token selector of the token-cache schedules (default: the backbone's: toca for DiT and "
                        "PixArt, norm for FLUX and Wan)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=d.rounds, help="dense/method timing alternations")
    p.add_argument("--timing-samples", type=int, default=d.timing_samples, help="samples per timing run")
    p.add_argument("--calibration-samples", type=int, default=d.calibration_samples,
                   help="samples used to tune diffusers' caches to the budget")  # fmt: skip
    p.add_argument("--bootstrap-rounds", type=int, default=d.bootstrap_rounds)
    p.add_argument("--schedule", dest="schedules", action="append", default=[], metavar="NAME=PATH",
                   help="also evaluate this schedule JSON (e.g. a learned one) as a row called NAME (a plain file "
                        "name, not a built-in row's); repeatable")  # fmt: skip
    p.add_argument("--pruned", action="append", default=[], metavar="NAME=DIR",
                   help="also evaluate this pruning plan (train.py experiment=prune_*: <output_dir>/pruned) as a row "
                        "called NAME; repeatable")  # fmt: skip
    p.add_argument("--stitched", nargs="*", default=None, metavar="NAME",
                   help="also run these pruning plans (no names: all) as one pruned copy per stage (MosaicDiff's "
                        "stitching), to compare its memory with weight routing")  # fmt: skip
    p.add_argument("--compare-to", default=None, metavar="ROW",
                   help="add paired ΔFD / ΔL2 columns against this row ('none': leave them out). Default: toca "
                        "when it is run")  # fmt: skip
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (default: torch's choice)")
    p.add_argument("--out", dest="output_dir", default=d.output_dir, help="output folder")
    p.add_argument("--quick", action="store_true", help="smoke test: 5 steps, 20 samples, 1 timing round")
    args = vars(p.parse_args(argv))
    if args.pop("quick"):  # smaller defaults; values given on the command line win
        quick = dict(steps=5, samples=20, rounds=1, timing_samples=4, calibration_samples=4, bootstrap_rounds=50)
        args.update({k: v for k, v in quick.items() if args[k] == getattr(d, k)})
    if args["compare_to"] is None:
        args["compare_to"] = "toca" if "toca" in args["methods"] else None
    elif args["compare_to"] in ("none", ""):
        args["compare_to"] = None
    else:
        args["compare_to"] = row_name(args["compare_to"])
    cfg = EvalConfig(**args)
    try:
        check_config(cfg)
    except UsageError as e:
        p.error(str(e))
    return cfg
