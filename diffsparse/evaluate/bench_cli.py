"""`python -m diffsparse.bench`'s command line: its arguments, their checks, and the printed table; one run
(`bench.run`) or, with `--sweep`, a grid of them (`sweep.run_sweep`)."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

from diffsparse.cache import BACKBONES
from diffsparse.cache.selectors import make_selector
from diffsparse.evaluate.bench import DEFAULT_SCHEDULES, DTYPES, check_schedule_name, format_table, run
from diffsparse.evaluate.sweep import (
    FLOOR,
    SWEEP_SCHEDULES,
    SWEEP_SIZE,
    SWEEP_STEPS,
    SWEEP_TOKENS,
    plot_sweep,
    run_sweep,
    sweep_table,
)
from diffsparse.evaluate.timing import allocator_note
from diffsparse.files import atomic_path


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Refuse bad arguments with `parser.error` (usage and the reason on stderr, exit status 2) before any model is
    built or anything is written; returns the schedule names."""
    sizes = BACKBONES[args.model].sizes
    if args.size is not None and args.size not in sizes:
        parser.error(f"--size {args.size!r} is not a {args.model} size: choose one of {sorted(sizes)}.")
    if args.tokens < 1 or math.isqrt(args.tokens) ** 2 != args.tokens:
        parser.error(f"--tokens must be a positive square number of tokens (e.g. 256 = 16 x 16), got {args.tokens}.")
    for flag in ("steps", "rounds", "batch", "frames"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if BACKBONES[args.model].guided and args.batch % 2:
        parser.error(
            f"--batch must be even for {args.model}: the batch is classifier-free-guidance pairs (e.g. --batch 2), "
            f"got {args.batch}."
        )
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device the bench runs on: use cpu, cuda or cuda:<index>.")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: the bench runs on cpu or cuda.")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}); use cpu.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1 (leave it out for torch's choice), got {args.threads}.")
    if args.selector is not None:
        try:
            make_selector(args.selector, BACKBONES[args.model].selector_defaults)
        except ValueError as e:
            parser.error(f"--selector {args.selector}: {e}")
    if args.schedules is None:
        args.schedules = ",".join(SWEEP_SCHEDULES if args.sweep else DEFAULT_SCHEDULES)
    if args.sweep and args.size is None and SWEEP_SIZE in sizes:
        args.size = SWEEP_SIZE
    for flag in ("sweep_tokens", "sweep_steps"):
        try:
            values = [int(v) for v in getattr(args, flag).split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be comma-separated positive integers, e.g. 64,256.")
        if flag == "sweep_tokens" and any(math.isqrt(v) ** 2 != v for v in values):
            parser.error(f"--sweep-tokens must be square numbers of tokens (e.g. 64,256,1024), got {values}.")
        setattr(args, flag, values)
    if args.plot is not None and not args.sweep:
        parser.error("--plot is for --sweep (the efficiency curves).")
    names = [n.strip() for n in args.schedules.split(",") if n.strip()]
    for name in names:
        try:
            check_schedule_name(name, args.model)
        except ValueError as e:
            parser.error(f"--schedules: {e}")
    if args.json is not None:
        folder = args.json.parent
        if args.json.is_dir():
            parser.error(f"--json {args.json} is a directory: give a file path, e.g. {args.json / 'bench.json'}.")
        if not folder.is_dir():
            parser.error(f"--json {args.json}: {folder} is not an existing folder; create it or choose another path.")
        if not os.access(folder, os.W_OK | os.X_OK):
            parser.error(f"--json {args.json}: the folder {folder} is not writable; choose another path.")
    return names


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The bench's options and its schedules' names, checked (a usage error exits, as argparse does)."""
    parser = argparse.ArgumentParser(
        prog="python -m diffsparse.bench",
        description="Dense vs token-cached sampling speed on a random-weight diffusion transformer "
        "(speed does not depend on the weights). Dense and cached runs alternate in one process.",
    )
    benched = {name: spec for name, spec in BACKBONES.items() if spec.bench_case is not None}
    parser.add_argument("--model", default="dit", choices=sorted(benched), help="backbone (default: dit)")
    parser.add_argument(
        "--size",
        default=None,
        help="architecture size: "
        + "; ".join(f"{name} {sorted(spec.sizes)} (default {spec.bench_size})" for name, spec in benched.items()),
    )
    parser.add_argument(
        "--tokens", type=int, default=256, help="image tokens (per frame for Wan), a square number (default: 256)"
    )
    parser.add_argument("--frames", type=int, default=2, help="latent frames, Wan only (default: 2)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps, DDIM or flow Euler (default: 20)")
    parser.add_argument(
        "--batch", type=int, default=2, help="transformer batch: CFG pairs; FLUX: samples, no CFG (default: 2)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up (default: 3)")
    parser.add_argument("--selector", default=None, help="token selector (default: the backbone's: toca or norm)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--schedules",
        default=None,
        help="comma-separated: uniform-<sparsity>, toca-like, and pruned-<fraction> (heads and MLP neurons "
        f"structurally pruned, weights routed in; no token cache) (default: {','.join(DEFAULT_SCHEDULES)}; "
        f"with --sweep {','.join(SWEEP_SCHEDULES)})",
    )
    parser.add_argument("--device", default="cpu", help="torch device to run on: cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="the model's and latents' dtype (default: float32)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile: dense compiles the whole model, cached rows their units (compile_units=True); the "
        "warm-up round compiles, and the table counts each row's compiled graphs",
    )
    parser.add_argument(
        "--reuse-kv",
        action="store_true",
        help="also run every schedule with key/value reuse (reuse_kv=True), as a <name>+kv row",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help=f"efficiency curves: the bench at every --sweep-tokens x --sweep-steps (--size default {SWEEP_SIZE}), "
        "a table, and a plot (--plot, or beside --json)",
    )
    parser.add_argument("--sweep-tokens", default=",".join(map(str, SWEEP_TOKENS)), help="(default: %(default)s)")
    parser.add_argument("--sweep-steps", default=",".join(map(str, SWEEP_STEPS)), help="(default: %(default)s)")
    parser.add_argument("--plot", type=Path, default=None, help="--sweep: the plot's path (default: --json's, .png)")
    args = parser.parse_args(argv)
    return args, check_args(parser, args)


def main(argv: list[str] | None = None) -> list[dict]:
    args, names = parse_args(argv)
    cmd = "python -m diffsparse.bench " + " ".join(argv if argv is not None else os.sys.argv[1:])
    if args.sweep:
        return sweep_main(args, names, cmd.strip())
    rows = run(
        args.model,
        args.size,
        args.tokens,
        args.steps,
        args.batch,
        args.rounds,
        args.selector,
        args.threads,
        schedule_names=names,
        frames=args.frames,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        reuse_kv=args.reuse_kv,
    )
    frames = f" x {args.frames} frames" if BACKBONES[args.model].video else ""
    print(
        f"\n{rows[0]['model']}, {args.tokens} tokens{frames}, batch {args.batch}, {args.steps} steps, "
        f"selector {rows[1]['selector'] if len(rows) > 1 else '-'}, {rows[0]['threads']} threads, "
        f"{args.device}, {args.dtype}{', compiled' if args.compile else ''}, {args.rounds} rounds  [{cmd.strip()}]"
    )
    _print_allocator(args.device)
    print(format_table(rows))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(rows, indent=1))
    return rows


def _print_allocator(device: str) -> None:
    note = allocator_note(device)
    if note:
        print(note)


def sweep_main(args: argparse.Namespace, names: list[str], cmd: str) -> list[dict]:
    """`--sweep`: the grid, its table (efficiency below 0.9 in bold) and its plot."""
    rows = run_sweep(args.sweep_tokens, args.sweep_steps, names, model_name=args.model, size=args.size,
                     batch=args.batch, rounds=args.rounds, selector=args.selector, threads=args.threads,
                     frames=args.frames, device=args.device, dtype=args.dtype, compile=args.compile,
                     reuse_kv=args.reuse_kv)  # fmt: skip
    print(f"\n{rows[0]['model']}, batch {args.batch}, {rows[0]['threads']} threads, {args.device}, {args.dtype}"
          f"{', compiled' if args.compile else ''}, {args.rounds} rounds  [{cmd}]")  # fmt: skip
    _print_allocator(args.device)
    print(sweep_table(rows))
    below = [r for r in rows if r["method"] != "dense" and r["efficiency"] < FLOOR]
    print(f"{len(below)} of {sum(r['method'] != 'dense' for r in rows)} cells below efficiency {FLOOR}.")
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(rows, indent=1))
    plot = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if plot is not None:
        plot_sweep(rows, plot)
        print(f"plot: {plot}")
    return rows
