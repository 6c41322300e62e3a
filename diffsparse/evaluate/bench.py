"""Speed benchmark: dense vs token-cached sampling, alternated in one process.

    python -m diffsparse.bench                      # DiT-XL/2, 256 tokens, batch 2, 20 DDIM steps
    python -m diffsparse.bench --size B/2 --steps 10 --rounds 5 --json bench.json
    python -m diffsparse.bench --schedules uniform-0.5,pruned-0.3   # also a structurally pruned model (30 %)
    python -m diffsparse.bench --model flux --steps 4   # FLUX (bench width), flow-matching Euler, no CFG
    python -m diffsparse.bench --model wan --frames 4   # Wan2.1 (bench width), 4 latent frames, CFG pairs

Each round runs dense, then every schedule, in the same order (A B C A B C ...), after a warm-up round. The
speed-up of a schedule in a round is that round's dense time over its own time; the table gives the median and
the min-max over rounds. MACs are analytic (`Schedule.macs`); efficiency = speed-up / MAC reduction (1.0 is the
compute-bound limit). Peak memory is measured in one extra, untimed run per row: the peak resident-set growth
over the run (CPU) or `torch.cuda.max_memory_allocated` growth (GPU).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import math
import os
import statistics
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffsparse.allocate import baselines
from diffsparse.backbones.calls import forward_kwargs, predict, set_steps, unpack
from diffsparse.backbones.flow_tiny import (
    FLUX_SIZES,
    WAN_SIZES,
    build_flux,
    build_wan,
    flux_example_inputs,
    wan_example_inputs,
)
from diffsparse.backbones.registry import backbone_for
from diffsparse.backbones.tiny import SIZES, build_transformer, example_inputs
from diffsparse.cache import BACKBONES, apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.cache.selector import make_selector
from diffsparse.files import atomic_path
from diffsparse.prune.routing import apply_pruning, remove_pruning
from diffsparse.schedule import Schedule


def sample(model, latents: torch.Tensor, conditions: dict, num_steps: int, cfg: bool, guidance: float = 4.0):
    """A plain sampling loop: DDIM for DiT / PixArt, flow-matching Euler for FLUX / Wan; with `cfg` each call is a
    batch of CFG pairs (`conditions` hold the conditional half, then the unconditional half)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    flow = backbone_for(model).name in FLOW_MODELS
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0) if flow else DDIMScheduler()
    set_steps(model, scheduler, num_steps, latents)
    with torch.inference_mode():
        for t in scheduler.timesteps:
            out = predict(model, torch.cat([latents, latents]) if cfg else latents, t, conditions)
            if cfg:
                cond, uncond = out.chunk(2)
                out = uncond + guidance * (cond - uncond)
            latents = scheduler.step(out, t, latents).prev_sample
    return latents


FLOW_MODELS = ("flux", "wan")
DEFAULT_SIZES = {"dit": "XL/2", "pixart": "XL/2", "flux": "bench", "wan": "bench"}
MODEL_SIZES = {"dit": SIZES, "pixart": SIZES, "flux": FLUX_SIZES, "wan": WAN_SIZES}
PRUNE_LEVELS = 16  # pruned-<fraction> rows prune to the nearest 1/16


def bench_model(model_name: str, size: str | None, tokens: int, batch: int, frames: int = 2):
    """(model, initial latents, conditions, whether calls are CFG pairs) for a benchmark row.

    DiT / PixArt / Wan: `batch` is CFG pairs (batch / 2 latents). FLUX (schnell is guidance-distilled): `batch`
    independent samples, no CFG. `tokens` is the image tokens per frame, a square number.
    """
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"--tokens must be a square number, got {tokens}.")
    size = size or DEFAULT_SIZES[model_name]
    if model_name == "flux":
        model = build_flux(size)
        inputs = flux_example_inputs(model, batch=batch, height=side, width=side, text_tokens=64)
        latents = unpack(inputs["hidden_states"], 2 * side, 2 * side)
        conditions = {k: inputs[k] for k in ("encoder_hidden_states", "pooled_projections")}
        return model, latents, conditions, False
    if batch % 2:
        raise ValueError("--batch must be even: the batch is classifier-free-guidance pairs.")
    half = batch // 2
    if model_name == "wan":
        model = build_wan(size)
        inputs = wan_example_inputs(model, batch=batch, frames=frames, height=2 * side, width=2 * side, text_tokens=64)
        return model, inputs["hidden_states"][:half], {"encoder_hidden_states": inputs["encoder_hidden_states"]}, True
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r} for {model_name}; choose one of {sorted(SIZES)}.")
    model = build_transformer(model_name, size, sample_size=2 * side)
    inputs = example_inputs(model, batch=batch)
    conditions = {k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep", "added_cond_kwargs")}
    if "class_labels" in conditions:
        conditions["class_labels"][half:] = model.config.num_embeds_ada_norm  # the null class
    return model, inputs["hidden_states"][:half], conditions, True


class _PeakRSS:
    """Samples this process's resident set size in a thread; `peak - start` is the growth during the block."""

    def __enter__(self):
        _trim()
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    """Give freed heap memory back to the OS so the next peak is measured from a clean base.

    glibc only; elsewhere the growth figure is a lower bound.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _peak_memory(fn) -> int:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    with _PeakRSS() as probe:
        fn()
    return probe.growth


DEFAULT_SCHEDULES = ("uniform-0.5", "uniform-0.75", "toca-like")


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def check_schedule_name(name: str, model_name: str = "dit") -> None:
    """Raise a `ValueError` that says how to write `name` if it is not a row `run` can make for `model_name`."""
    if name == "toca-like":
        return
    if name.startswith("uniform-"):
        sparsity = _number(name.removeprefix("uniform-"))
        if sparsity is None or not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"Schedule {name!r}: uniform-<sparsity> needs a sparsity from 0 to 1, e.g. uniform-0.5.")
        return
    if name.startswith("pruned-"):
        if model_name in FLOW_MODELS:
            raise ValueError(f"Schedule {name!r}: pruned-<fraction> rows are for DiT and PixArt only.")
        fraction = _number(name.removeprefix("pruned-"))
        if fraction is None or not 0 < round(fraction * PRUNE_LEVELS) < PRUNE_LEVELS:
            raise ValueError(
                f"Schedule {name!r}: pruned-<fraction> needs a fraction that rounds to k/{PRUNE_LEVELS} with "
                f"0 < k < {PRUNE_LEVELS}, e.g. pruned-0.3."
            )
        return
    raise ValueError(
        f"Unknown schedule {name!r}: use uniform-<sparsity> (e.g. uniform-0.5), toca-like, or pruned-<fraction> "
        "(e.g. pruned-0.3)."
    )


def make_schedules(names, units, num_steps: int) -> dict[str, Schedule]:
    """Schedules by name: `uniform-<sparsity>` (first step full) or `toca-like`."""
    schedules = {}
    for name in names:
        if name == "toca-like":
            # ToCa without a ramp: self-attention reuses 0.5, MLPs 0.75, full step every 3
            schedules[name] = baselines.toca(units, num_steps, fresh_ratio=0.25, interval=3, ramp=0.0)
        elif name.startswith("uniform-"):
            check_schedule_name(name)
            schedules[name] = baselines.uniform(units, num_steps, float(name.removeprefix("uniform-")))
        else:
            raise ValueError(f"Unknown schedule {name!r}: use uniform-<sparsity> (e.g. uniform-0.5) or toca-like.")
    return schedules


def pruned_row(model, inputs: dict, fraction: float, levels: int = PRUNE_LEVELS):
    """A one-stage structural pruning store that removes `fraction` (to the nearest 1/levels) of every layer's heads
    and MLP neurons (Wanda order, calibrated on the benchmark's own inputs: speed does not depend on which
    structures go), and the MAC reduction of one forward at that level (counted with `FlopCounterMode`)."""
    from diffsparse.prune.plan import level_macs
    from diffsparse.prune.store import store_from_batches

    level = round(fraction * levels)
    if not 0 < level < levels:
        raise ValueError(f"pruned-<fraction> needs a fraction in (0, 1) that rounds to a level, got {fraction}")
    batch = {**inputs, "timestep": torch.full((len(inputs["hidden_states"]),), 500)}
    store = store_from_batches(model, "wanda", [[batch]], [], levels=levels, max_level=level)
    macs = level_macs(model, store, batch)
    return store, macs[0] / macs[level]


def run(
    model_name: str = "dit",
    size: str | None = None,
    tokens: int = 256,
    steps: int = 20,
    batch: int = 2,
    rounds: int = 3,
    selector: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    schedule_names=DEFAULT_SCHEDULES,
    frames: int = 2,
) -> list[dict]:
    """Benchmark dense against the default schedules; returns one row per method (dense first).

    `size` defaults to `DEFAULT_SIZES[model_name]`, `selector` to the backbone's default (toca for DiT and PixArt,
    norm for FLUX and Wan); `frames` (latent frames) is for Wan only.
    """
    if threads:
        torch.set_num_threads(threads)
    size = size or DEFAULT_SIZES[model_name]
    model, latents, conditions, cfg = bench_model(model_name, size, tokens, batch, frames)
    selector_name = selector or backbone_for(model).selector_defaults.get("name", "toca")
    probe = torch.cat([latents, latents]) if cfg else latents
    inputs = forward_kwargs(model, probe, torch.tensor(500), conditions)
    if model_name in FLOW_MODELS and any(n.startswith("pruned-") for n in schedule_names):
        raise ValueError("pruned-<fraction> rows are for DiT and PixArt only.")
    units = cacheable_units(model)
    pruned_names = [n for n in schedule_names if n.startswith("pruned-")]
    schedules = make_schedules([n for n in schedule_names if n not in pruned_names], units, steps)
    dense_macs = Schedule.uniform(units, steps, 0.0).macs(model, **inputs)["dense"]
    macs = {name: s.macs(model, **inputs)["cached"] for name, s in schedules.items()}
    pruned = {name: pruned_row(model, inputs, float(name.removeprefix("pruned-"))) for name in pruned_names}
    macs |= {name: dense_macs / reduction for name, (_, reduction) in pruned.items()}

    def timed(name: str) -> float:
        schedule = schedules.get(name)
        if schedule is not None:
            apply_token_cache(model, schedule, selector=selector_name, cfg=cfg)
        if name in pruned:
            apply_pruning(model, pruned[name][0], [pruned[name][0].max_level])
        try:
            start = time.perf_counter()
            sample(model, latents, conditions, steps, cfg)
            return time.perf_counter() - start
        finally:
            if schedule is not None:
                remove_token_cache(model)
            remove_pruning(model)

    names = ["dense", *schedules, *pruned]
    times: dict[str, list[float]] = {n: [] for n in names}
    total = (rounds + 1) * len(names)
    with tqdm(total=total, desc="bench", disable=not progress) as bar:
        for r in range(rounds + 1):  # round 0 is the warm-up
            for n in names:
                elapsed = timed(n)
                if r > 0:
                    times[n].append(elapsed)
                bar.update(1)
    memory = {n: _peak_memory(lambda n=n: timed(n)) for n in names}

    rows = []
    for n in names:
        ratios = [d / c for d, c in zip(times["dense"], times[n], strict=True)]
        cached = macs[n] if n != "dense" else dense_macs
        reduction = dense_macs / cached
        speedup = statistics.median(ratios)
        rows.append(
            dict(
                method=n,
                model=f"{model_name}-{size}",
                tokens=tokens,
                batch=batch,
                steps=steps,
                selector=selector_name if n in schedules else "-",
                gmacs=cached / 1e9,
                mac_reduction=reduction,
                speedup=speedup,
                speedup_min=min(ratios),
                speedup_max=max(ratios),
                efficiency=speedup / reduction,
                seconds=statistics.median(times[n]),
                peak_mem_mb=memory[n] / 2**20,
                threads=torch.get_num_threads(),
            )
        )
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        "| method | GMACs / trajectory | MAC reduction | speed-up (median, min-max) | efficiency | "
        "time (s) | peak mem (MB) |\n|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['gmacs']:.1f} | {r['mac_reduction']:.2f}x | {r['speedup']:.2f}x "
            f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {r['efficiency']:.2f} | {r['seconds']:.2f} | "
            f"{r['peak_mem_mb']:.0f} |"
        )
    return "\n".join(lines)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Refuse bad arguments with `parser.error` (usage and the reason on stderr, exit status 2) before any model is
    built or anything is written; returns the schedule names."""
    sizes = MODEL_SIZES[args.model]
    if args.size is not None and args.size not in sizes:
        parser.error(f"--size {args.size!r} is not a {args.model} size: choose one of {sorted(sizes)}.")
    if args.tokens < 1 or math.isqrt(args.tokens) ** 2 != args.tokens:
        parser.error(f"--tokens must be a positive square number of tokens (e.g. 256 = 16 x 16), got {args.tokens}.")
    for flag in ("steps", "rounds", "batch", "frames"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.model != "flux" and args.batch % 2:
        parser.error(
            f"--batch must be even for {args.model}: the batch is classifier-free-guidance pairs (e.g. --batch 2), "
            f"got {args.batch}."
        )
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1 (leave it out for torch's choice), got {args.threads}.")
    if args.selector is not None:
        try:
            make_selector(args.selector, BACKBONES[args.model].selector_defaults)
        except ValueError as e:
            parser.error(f"--selector {args.selector}: {e}")
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


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m diffsparse.bench",
        description="Dense vs token-cached sampling speed on a random-weight diffusion transformer "
        "(speed does not depend on the weights). Dense and cached runs alternate in one process.",
    )
    parser.add_argument("--model", default="dit", choices=sorted(DEFAULT_SIZES), help="backbone (default: dit)")
    parser.add_argument(
        "--size",
        default=None,
        help=f"architecture size: DiT/PixArt {sorted(SIZES)}, FLUX {sorted(FLUX_SIZES)}, Wan {sorted(WAN_SIZES)} "
        "(default: XL/2 for DiT and PixArt, bench for FLUX and Wan)",
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
        default=",".join(DEFAULT_SCHEDULES),
        help="comma-separated: uniform-<sparsity>, toca-like, and pruned-<fraction> (heads and MLP neurons "
        "structurally pruned, weights routed in; no token cache) (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    names = check_args(parser, args)
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
    )
    cmd = "python -m diffsparse.bench " + " ".join(argv if argv is not None else os.sys.argv[1:])
    frames = f" x {args.frames} frames" if args.model == "wan" else ""
    print(
        f"\n{rows[0]['model']}, {args.tokens} tokens{frames}, batch {args.batch}, {args.steps} steps, "
        f"selector {rows[1]['selector'] if len(rows) > 1 else '-'}, {rows[0]['threads']} threads, "
        f"{args.rounds} rounds  [{cmd.strip()}]"
    )
    print(format_table(rows))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
