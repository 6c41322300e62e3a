"""The settings of `python -m diffsparse.evaluate`: its config (`EvalConfig`, one definition: the command line is
made from its fields), the checks that refuse bad ones before any model is loaded or sampled, and the command
line."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from diffsparse.backbones.registry import backbone_for
from diffsparse.evaluate.builders import BUILDERS
from diffsparse.models.loading import run_settings
from diffsparse.models.sampling import SCHEDULERS, is_flow_matching
from diffsparse.reference.featurenet import WEIGHTS as FEATURE_NET_WEIGHTS
from diffsparse.reference.model import DEFAULT_GUIDANCE

# dense, fewer-steps, every hand-made allocator of the registry, then diffusers' caches
ALL_METHODS = tuple(BUILDERS)
# The row a method's key names in the table, where they differ (diffusers' caches go by their class names).
ROW_NAMES = {"fbc": "FirstBlockCache", "taylorseer": "TaylorSeer", "pab": "PAB"}
COUNTS = ("steps", "samples", "batch_size", "rounds", "timing_samples", "calibration_samples", "bootstrap_rounds")


class UsageError(ValueError):
    """A setting that cannot work, found before any sampling."""


def option(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, help: str | None = None,
           flag: str | None = None, cli_default=dataclasses.MISSING, **argparse_options):  # fmt: skip
    """A field of `EvalConfig` and its command-line option: `help`, the `flag` (default `--field-name`), the
    `cli_default` when the command line's default differs from the field's (it is settled after parsing), and any
    other `argparse.add_argument` keywords (`metavar`, `choices`, `nargs`, `action`)."""
    if cli_default is not dataclasses.MISSING:
        argparse_options["default"] = cli_default
    metadata = {"help": help, "flag": flag, "argparse": argparse_options}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass
class EvalConfig:
    model: str = option(
        "reference",
        help="'reference' (shipped digits DiT), 'tiny' (random), another name of "
        "diffsparse.loading, or a folder (a saved pipeline, or transformer/ + noise_schedule.json)",
    )
    sampler: str | None = option(
        "ddim",
        choices=sorted(SCHEDULERS),
        cli_default=None,
        help="default: flow for flow-matching models, ddim for the others",
    )
    steps: int = option(50, cli_default=None, help="denoising steps of the dense run (default: the model's: 20 for "
                        "digits-flux, else 50)")  # fmt: skip
    budget: float = option(0.5, help="fraction of dense MACs to save")
    budgets: list[float] = option(
        default_factory=list,
        nargs="+",
        metavar="B",
        help="a Pareto sweep instead of one --budget: the whole evaluation at each of these fractions of dense MACs "
        "to save (each in (0, 1)), dense sampled and timed once for all of them, every method fitted to each; "
        "writes OUT/budget-B/ (the one-budget outputs) and, across budgets, pareto.md/.csv/.json with "
        "pareto_psnr.png and pareto_l2.png (quality vs measured speed-up, one line per method)",
    )
    methods: list[str] = option(
        default_factory=lambda: list(ALL_METHODS),
        nargs="+",
        choices=ALL_METHODS,
        metavar="METHOD",
        help=f"methods to compare, of: {' '.join(ALL_METHODS)}",
    )
    samples: int = option(500, help="samples per method (classes cycle 0..num_classes-1; captions cycle too)")
    batch_size: int = option(250)
    guidance: float = option(DEFAULT_GUIDANCE, cli_default=None, help="classifier-free guidance scale (default: the "
                             "model's: 1, none, for digits-flux, else 1.25)")  # fmt: skip
    seed: int = option(0, help="noise seed (sample i uses seed + i)")
    selector: str | None = option(
        None,
        help="token selector of the token-cache schedules (default: the "
        "backbone's: toca for DiT and PixArt, norm for FLUX and Wan)",
    )
    rounds: int = option(3, help="dense/method timing alternations")
    timing_samples: int = option(50, help="samples per timing run")
    calibration_samples: int = option(50, help="samples used to tune diffusers' caches to the budget")
    bootstrap_rounds: int = option(1000)
    threads: int | None = option(None, help="torch threads (default: torch's choice)")
    output_dir: str = option("eval", flag="--out", help="output folder")
    schedules: list[str] = option(
        default_factory=list,
        flag="--schedule",
        action="append",
        metavar="NAME[@B]=PATH",
        help="also evaluate this schedule JSON (e.g. a learned one) as a row called NAME (a "
        "plain file name, not a built-in row's), at every budget; NAME@B=PATH: only at budget B (one of --budgets, "
        "or --budget), so one row NAME can take a schedule learned for each budget; repeatable",
    )
    pruned: list[str] = option(
        default_factory=list,
        action="append",
        metavar="NAME=DIR",
        help="also evaluate this pruning plan (train.py experiment=prune_*: <output_dir>/pruned) "
        "as a row called NAME; repeatable",
    )
    learn: bool = option(
        False,
        action="store_true",
        help="learn a schedule at the budget (every budget of --budgets) with the recipe of `train.py "
        "experiment=learn`, into OUT/learned-B/, and add it as the row 'learned'",
    )
    stitched: list[str] | None = option(
        None,
        nargs="*",
        metavar="NAME",
        help="also run these pruning plans (no names: all) as one pruned copy per stage "
        "(MosaicDiff's stitching), to compare its memory with weight routing",
    )
    compare_to: str | None = option(
        "toca",
        cli_default=None,
        metavar="ROW",
        help="add paired ΔFD / ΔL2 / ΔPSNR columns against this row ('none': leave them out). Default: toca when "
        "it is run",
    )
    feature_net: str | None = option(
        None,
        metavar="NET",
        help="FD and class accuracy on this feature network: "
        "'digits' (the shipped one, with the digits as real data), a saved feature "
        "network's folder, or 'none'. Default: digits for --model reference, none for "
        "other models",
    )
    captions: str | None = option(
        None,
        metavar="PATH",
        help="caption embeddings to condition a text-conditional "
        "model on (write them with `python -m diffsparse.captions PIPELINE_DIR "
        "captions.txt OUT.safetensors`). Default: the model's own, where it ships some (digits-flux)",
    )
    budget_tolerance: float = option(
        0.05, help="flag rows whose measured MAC saving is further than this from --budget (each of --budgets)"
    )
    budget_unit: str = option(
        "macs",
        choices=["macs", "time"],
        help="what --budget (each of --budgets) is a fraction of: dense MACs, or dense time on this device. time "
        "fits the hand-made schedules and --learn's on step times measured at the start (saved as "
        "OUT/time_table.json); fewer-steps, diffusers' caches and cache-dit stay fitted on MACs",
    )
    time_table: str | None = option(
        None, metavar="PATH", help="--budget-unit time: a time_table.json to reuse instead of timing the model again"
    )


def row_name(method: str) -> str:
    """The table's name of a method key (`fbc` -> `FirstBlockCache`); other names as they are."""
    return ROW_NAMES.get(method, method)


def default_feature_net(model: str) -> str:
    """`digits` for the shipped digits models, whose data the shipped feature network knows; `none` otherwise."""
    return run_settings(model)["feature_net"] or "none"


def check_config(cfg: EvalConfig) -> None:
    """Raise `UsageError` for settings that cannot work, before any model is loaded or anything sampled."""
    for key in COUNTS:
        if getattr(cfg, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(cfg, key)}")
    if not 0.0 <= cfg.budget < 1.0:
        raise UsageError(f"--budget must be in [0, 1), got {cfg.budget}")
    _check_budgets(cfg)
    if not 0.0 <= cfg.budget_tolerance < 1.0:
        raise UsageError(f"--budget-tolerance must be in [0, 1), got {cfg.budget_tolerance}")
    if cfg.budget_unit not in ("macs", "time"):
        raise UsageError(f"--budget-unit {cfg.budget_unit!r}: choose macs or time")
    if cfg.time_table is not None and (cfg.budget_unit != "time" or not Path(cfg.time_table).is_file()):
        raise UsageError(
            f"--time-table {cfg.time_table}: give an existing time_table.json, with --budget-unit time "
            "(a run with --budget-unit time writes one to OUT/time_table.json)."
        )
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
    if cfg.learn:
        rows.append("learned")  # the row --learn adds
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


def budgets_of(cfg: EvalConfig) -> list[float]:
    """The budgets a run evaluates: `--budgets`, or the one `--budget`."""
    return list(cfg.budgets) or [cfg.budget]


def budget_folder(budget: float) -> str:
    """The folder of one budget of a sweep: `budget-0.40` (more digits where two would round it)."""
    return f"budget-{budget:.2f}" if round(budget, 2) == budget else f"budget-{budget:g}"


def _check_budgets(cfg: EvalConfig) -> None:
    if not cfg.budgets:
        return
    if cfg.budget != EvalConfig.budget:
        raise UsageError(f"--budget {cfg.budget} and --budgets: give one (--budgets runs the evaluation at each)")
    for b in cfg.budgets:
        if not 0.0 < b < 1.0:
            raise UsageError(f"--budgets must each be in (0, 1), got {b}")
    folders = [budget_folder(b) for b in cfg.budgets]
    twice = sorted({f for f in folders if folders.count(f) > 1})
    if twice:
        raise UsageError(f"--budgets: {', '.join(f.removeprefix('budget-') for f in twice)} given twice")


def schedule_item(item: str) -> tuple[str, float | None, str]:
    """A `--schedule` item's row name, budget (None: every budget) and path: `NAME=PATH` or `NAME@B=PATH`."""
    head, _, path = item.partition("=")
    name, at, budget = head.rpartition("@") if "@" in head else (head, "", "")
    if not at:
        return name, None, path
    try:
        return name, float(budget), path
    except ValueError:
        raise UsageError(f"--schedule {item!r}: NAME@B=PATH takes a budget B, got {budget!r}") from None


def schedules_at(cfg: EvalConfig, budget: float) -> list[str]:
    """The `--schedule` rows at one budget, as `NAME=PATH`: the plain ones and those of `NAME@budget=PATH`."""
    items = []
    for item in cfg.schedules:
        name, at, path = schedule_item(item)
        if at is None or _same_budget(at, budget):
            items.append(f"{name}={path}")
    return items


def _same_budget(a: float, b: float) -> bool:
    return abs(a - b) < 1e-9


def _extra_rows(cfg: EvalConfig) -> list[str]:
    """The names of the --schedule and --pruned rows, checked: NAME=PATH (NAME@B=PATH: a --schedule row at budget B
    only, one of the run's), a plain file name (it names samples/NAME.png under --out), not a built-in row's, each
    once per budget; and their files present."""
    reserved = {n.lower() for n in (*ALL_METHODS, *ROW_NAMES.values())}
    names, budgets = [], budgets_of(cfg)
    taken: dict[str, list[float | None]] = {}  # row name (lower case) -> its budgets (None: every budget)
    for option, items in (("--schedule", cfg.schedules), ("--pruned", cfg.pruned)):
        for item in items:
            if option == "--schedule":
                name, at, path = schedule_item(item)
            else:
                (name, _, path), at = item.partition("="), None
            if not name or not path:
                raise UsageError(f"{option} takes NAME={'DIR' if option == '--pruned' else 'PATH'}, got {item!r}")
            if at is not None and not any(_same_budget(at, b) for b in budgets):
                run = " ".join(f"{b:g}" for b in budgets)
                raise UsageError(f"--schedule {name}@{at:g}: {at:g} is not a budget of this run ({run})")
            if name in (".", "..") or name != Path(name).name or "\\" in name or name != name.strip():
                raise UsageError(
                    f"{option} {name!r}: the row's name must be a plain file name (it names samples/<NAME>.png "
                    "under --out), without folders"
                )
            if name.lower() in reserved:
                raise UsageError(f"{option} {name}: the name of a built-in row; call it something else")
            others = taken.setdefault(name.lower(), [])
            if others and (at is None or None in others or any(_same_budget(at, b) for b in others)):
                raise UsageError(f"{option} {name}: two extra rows of that name" + (" at one budget" if at else ""))
            others.append(at)
            if option == "--schedule" and not Path(path).is_file():
                raise UsageError(f"--schedule {name}: no file at {path}")
            if option == "--pruned" and not (Path(path) / "plan.json").is_file():
                raise UsageError(f"--pruned {name}: no pruning plan (plan.json) in {path}")
            if name not in names:
                names.append(name)
    pruned = [item.partition("=")[0] for item in cfg.pruned]
    if cfg.stitched is not None:
        unknown = set(cfg.stitched) - set(pruned)
        if unknown:
            raise UsageError(f"--stitched names no --pruned plan: {sorted(unknown)}")
        names += [f"{n} (stitched)" for n in pruned if not cfg.stitched or n in cfg.stitched]
    return names


def _add_option(parser: argparse.ArgumentParser, f: dataclasses.Field, annotation) -> None:
    """The command-line option of an `EvalConfig` field: its flag, dest, type (int, float, else a string),
    default, help and the argparse keywords of its metadata."""
    options = dict(f.metadata["argparse"])
    if "default" not in options:
        options["default"] = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(annotation, types.UnionType):  # `int | None`: an int when given
        annotation = next(t for t in typing.get_args(annotation) if t is not type(None))
    if typing.get_origin(annotation) is list:  # `list[float]`: each item a float
        annotation = typing.get_args(annotation)[0]
    if annotation in (int, float):
        options["type"] = annotation
    flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
    dest = {} if flag == "--" + f.name.replace("_", "-") else {"dest": f.name}
    parser.add_argument(flag, **dest, help=f.metadata["help"], **options)


def parse_args(argv=None) -> EvalConfig:
    d = EvalConfig()
    p = argparse.ArgumentParser(
        prog="python -m diffsparse.evaluate",
        description="every way of saving compute, side by side on one model, from the same noise.",
        epilog="Example (the README table): python -m diffsparse.evaluate --steps 50 --budget 0.5 --out eval/ref50. "
        "A Pareto sweep: python -m diffsparse.evaluate --steps 50 --budgets 0.3 0.5 0.7 --out eval/pareto50",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(EvalConfig)
    for f in dataclasses.fields(EvalConfig):
        _add_option(p, f, hints[f.name])
    p.add_argument("--quick", action="store_true", help="smoke test: 5 steps, 20 samples, 1 timing round")
    args = vars(p.parse_args(argv))
    if args.pop("quick"):  # smaller defaults; values given on the command line win
        quick = dict(steps=5, samples=20, rounds=1, timing_samples=4, calibration_samples=4, bootstrap_rounds=50)
        args.update({k: v for k, v in quick.items() if args[k] in (None, getattr(d, k))})
    settings = run_settings(args["model"])  # the model's own step count, guidance and captions, where not given
    for key, setting in (("steps", "num_steps"), ("guidance", "guidance"), ("captions", "captions")):
        if args[key] is None:
            args[key] = settings[setting]
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


def model_defaults(ref, cfg: EvalConfig) -> tuple[str, str]:
    """The run's sampler and token selector: the given ones, else flow for flow-matching models and ddim for the
    others, and the backbone's default selector."""
    sampler = cfg.sampler or ("flow" if is_flow_matching(ref.noise_schedule) else "ddim")
    return sampler, cfg.selector or backbone_for(ref.transformer).selector_defaults.get("name", "toca")
