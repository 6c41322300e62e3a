"""Speed benchmark: dense vs token-cached sampling, alternated in one process.

    python -m diffsparse.bench                      # DiT-XL/2, 256 tokens, batch 2, 20 DDIM steps
    python -m diffsparse.bench --size B/2 --steps 10 --rounds 5 --json bench.json
    python -m diffsparse.bench --schedules uniform-0.5,pruned-0.3   # also a structurally pruned model (30 %)
    python -m diffsparse.bench --model flux --steps 4   # FLUX (bench width), flow-matching Euler, no CFG
    python -m diffsparse.bench --model wan --frames 4   # Wan2.1 (bench width), 4 latent frames, CFG pairs
    python -m diffsparse.bench --device cuda --dtype bfloat16 --compile   # a GPU, bf16, compiled

Each round runs dense, then every schedule, in the same order (A B C A B C ...), after a warm-up round
(`timing.alternate`). The speed-up of a schedule in a round is that round's dense time over its own time; the table
gives the median and the min-max over rounds. Every run is the project's sampling loop (`models.sampling.sample`,
diffusers' `cache_context` around each step). Schedule names are those of the allocator registry
(`registry.named_schedule`). MACs are analytic (`Schedule.macs`); efficiency = speed-up / MAC reduction (1.0 is
the compute-bound limit). Peak memory is measured in one extra, untimed run per row (`memory.peak_memory`): the
peak resident-set growth over the run (CPU) or `torch.cuda.max_memory_allocated` growth (GPU).

`--compile`: dense runs `torch.compile(model)` (the whole model, as users compile it), every cached row the token
cache with `compile_units=True` (the units' computations compiled, the hooks' bookkeeping eager); the warm-up round
compiles, and each row reports the graphs dynamo compiled for it (`graphs`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch._dynamo.utils import counters
from tqdm.auto import tqdm

from diffsparse.allocate.registry import named_forms, named_schedule, parse_named
from diffsparse.backbones import backbone_for, backbone_named, forward_kwargs
from diffsparse.cache import apply_token_cache, cacheable_units, remove_token_cache
from diffsparse.evaluate.memory import peak_memory
from diffsparse.evaluate.timing import Stopwatch, alternate
from diffsparse.models.sampling import sample
from diffsparse.prune.plan import level_macs
from diffsparse.prune.routing import apply_pruning, remove_pruning
from diffsparse.prune.store import store_from_batches
from diffsparse.schedule import Schedule

GUIDANCE = 4.0  # classifier-free guidance scale of the CFG pairs


def bench_scheduler(model: torch.nn.Module):
    """The bench's sampler: flow-matching Euler (shift 3) for flow-matching backbones (FLUX, Wan), DDIM otherwise."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0) if backbone_for(model).flow_matching else DDIMScheduler()


def sampling_options(conditions: dict, latents: torch.Tensor, cfg: bool) -> dict:
    """`models.sampling.sample`'s keywords for the bench's conditions: with `cfg` they hold a batch of CFG pairs
    (the conditional half, then the unconditional half), which `sample` takes as the conditions and their
    `null_conditions` (or `null_class`)."""
    if not cfg:
        return {"conditions": conditions, "guidance_scale": 1.0}
    half = len(latents)
    cond, null = {k: v[:half] for k, v in conditions.items()}, {k: v[half:] for k, v in conditions.items()}
    null_class = int(null["class_labels"][0]) if "class_labels" in null else None
    return {"conditions": cond, "guidance_scale": GUIDANCE, "null_conditions": null, "null_class": null_class}


PRUNE_LEVELS = 16  # pruned-<fraction> rows prune to the nearest 1/16


def bench_model(model_name: str, size: str | None, tokens: int, batch: int, frames: int = 2):
    """(model, initial latents, conditions, whether calls are CFG pairs) for a benchmark row: the backbone's
    `bench_case` at its `bench_size` unless `size` says otherwise.

    Guided backbones (DiT / PixArt / Wan): `batch` is CFG pairs (batch / 2 latents). Guidance-distilled ones (FLUX
    schnell): `batch` independent samples, no CFG. `tokens` is the image tokens per frame, a square number.
    """
    spec = backbone_named(model_name)
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"--tokens must be a square number, got {tokens}.")
    if spec.bench_case is None:
        raise ValueError(f"Backbone {model_name!r} has no benchmark case: give its registry row a bench_case.")
    size = size or spec.bench_size
    if size not in spec.sizes:
        raise ValueError(f"Unknown size {size!r} for {model_name}; choose one of {sorted(spec.sizes)}.")
    if spec.guided and batch % 2:
        raise ValueError("--batch must be even: the batch is classifier-free-guidance pairs.")
    model, latents, conditions = spec.bench_case(size, side, batch, frames)
    return model, latents, conditions, spec.guided


DEFAULT_SCHEDULES = ("uniform-0.5", "uniform-0.75", "toca-like")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_device(model, latents: torch.Tensor, conditions: dict, device: str, dtype: str):
    """The bench case on `device` in `dtype` (a `DTYPES` name): the model, the latents and the floating
    conditions; integer conditions (class labels) keep their dtype."""
    kind = DTYPES[dtype]
    model = model.to(device=device)
    if kind != model.dtype:
        model = model.to(dtype=kind)
    move = {k: v.to(device=device, dtype=kind if v.is_floating_point() else v.dtype) for k, v in conditions.items()}
    return model, latents.to(device=device, dtype=kind), move


@dataclass
class BenchCase:
    """A benchmark row's model and inputs, on their device and in their dtype (`make_case`).

    Attributes:
        cfg: each call is a batch of CFG pairs.
        options: `models.sampling.sample`'s keywords for these conditions (`sampling_options`).
    """

    model: torch.nn.Module
    latents: torch.Tensor
    conditions: dict
    cfg: bool
    options: dict


def make_case(model_name: str, size: str | None, tokens: int, batch: int, frames: int = 2, device: str = "cpu",
              dtype: str = "float32") -> BenchCase:  # fmt: skip
    """`bench_model` moved by `to_device`, with its sampling options: what the bench and its GPU scripts time."""
    model, latents, conditions, cfg = bench_model(model_name, size, tokens, batch, frames)
    model, latents, conditions = to_device(model, latents, conditions, device, dtype)
    return BenchCase(model, latents, conditions, cfg, sampling_options(conditions, latents, cfg))


def compiled_graphs() -> int:
    """The graphs dynamo has compiled in this process so far (recompilations included)."""
    return int(counters["stats"]["unique_graphs"])


def check_schedule_name(name: str, model_name: str = "dit") -> None:
    """Raise a `ValueError` that says how to write `name` if it is not a row `run` can make for `model_name`: a
    schedule name of the allocator registry (`registry.parse_named`) or `pruned-<fraction>`."""
    if parse_named(name) is not None:
        return
    if name.startswith("pruned-"):
        if not backbone_named(model_name).prunable:
            raise ValueError(f"Schedule {name!r}: pruned-<fraction> rows are for DiT and PixArt only.")
        fraction = _fraction(name.removeprefix("pruned-"))
        if fraction is None or not 0 < round(fraction * PRUNE_LEVELS) < PRUNE_LEVELS:
            raise ValueError(
                f"Schedule {name!r}: pruned-<fraction> needs a fraction that rounds to k/{PRUNE_LEVELS} with "
                f"0 < k < {PRUNE_LEVELS}, e.g. pruned-0.3."
            )
        return
    forms = ", ".join(named_forms())
    raise ValueError(f"Unknown schedule {name!r}: use {forms}, or pruned-<fraction> (e.g. pruned-0.3).")


def _fraction(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def make_schedules(names, units, num_steps: int) -> dict[str, Schedule]:
    """Schedules by their names in the allocator registry (`registry.named_schedule`: `uniform-<sparsity>`, first
    step full, `toca-like`, ...)."""
    return {name: named_schedule(name, units, num_steps) for name in names}


def pruned_row(model, inputs: dict, fraction: float, levels: int = PRUNE_LEVELS):
    """A one-stage structural pruning store that removes `fraction` (to the nearest 1/levels) of every layer's heads
    and MLP neurons (Wanda order, calibrated on the benchmark's own inputs: speed does not depend on which
    structures go), and the MAC reduction of one forward at that level (counted with `FlopCounterMode`)."""
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
    device: str = "cpu",
    dtype: str = "float32",
    compile: bool = False,
    memory: bool = True,
    reuse_kv: bool = False,
) -> list[dict]:
    """Benchmark dense against the default schedules; returns one row per method (dense first).

    `size` defaults to the backbone's `bench_size`, `selector` to the backbone's default (toca for DiT and PixArt,
    norm for FLUX and Wan); `frames` (latent frames) is for Wan only. `device` and `dtype` (a `DTYPES` name) are
    where and in what the model runs; `compile`: compiled dense against compiled units (the module's docstring);
    `memory`: also measure each row's peak memory (one more run each; 0 when False); `reuse_kv`: every schedule also
    gets a `<name>+kv` row, run with the token cache's `reuse_kv=True`.
    """
    if threads:
        torch.set_num_threads(threads)
    size = size or backbone_named(model_name).bench_size
    case = make_case(model_name, size, tokens, batch, frames, device, dtype)
    model, latents, conditions, cfg = case.model, case.latents, case.conditions, case.cfg
    # Compiled dense runs on a copy: once dynamo has compiled the whole model, its units' own compiled forwards
    # never ran compiled on that same instance (torch 2.14).
    dense_model = torch.compile(copy.deepcopy(model)) if compile else model
    selector_name = selector or backbone_for(model).selector_defaults.get("name", "toca")
    probe = torch.cat([latents, latents]) if cfg else latents
    inputs = forward_kwargs(model, probe, torch.tensor(500), conditions)
    if not backbone_named(model_name).prunable and any(n.startswith("pruned-") for n in schedule_names):
        raise ValueError("pruned-<fraction> rows are for DiT and PixArt only.")
    units = cacheable_units(model)
    pruned_names = [n for n in schedule_names if n.startswith("pruned-")]
    schedules = make_schedules([n for n in schedule_names if n not in pruned_names], units, steps)
    kv_rows = {f"{name}+kv": s for name, s in schedules.items()} if reuse_kv else {}
    dense_macs = Schedule.uniform(units, steps, 0.0).macs(model, **inputs)["dense"]
    macs = {name: s.macs(model, **inputs)["cached"] for name, s in schedules.items()}
    macs |= {name: s.macs(model, reuse_kv=True, **inputs)["cached"] for name, s in kv_rows.items()}
    pruned = {name: pruned_row(model, inputs, float(name.removeprefix("pruned-"))) for name in pruned_names}
    macs |= {name: dense_macs / reduction for name, (_, reduction) in pruned.items()}

    options = case.options

    def timed(name: str):
        def run(clock: Stopwatch) -> None:
            schedule = schedules.get(name, kv_rows.get(name))
            if schedule is not None:
                apply_token_cache(model, schedule, selector=selector_name, cfg=cfg, compile_units=compile,
                                  reuse_kv=name in kv_rows)  # fmt: skip
            if name in pruned:
                apply_pruning(model, pruned[name][0], [pruned[name][0].max_level])
            before = compiled_graphs()
            try:
                with torch.inference_mode(), clock:
                    runner = dense_model if name == "dense" else model
                    sample(runner, bench_scheduler(model), noise=latents, num_steps=steps, **options)
            finally:
                graphs[name] += compiled_graphs() - before
                if schedule is not None:
                    remove_token_cache(model)
                if name in pruned:
                    remove_pruning(model)

        return run

    names = ["dense", *schedules, *kv_rows, *pruned]
    graphs = dict.fromkeys(names, 0)  # graphs dynamo compiled while each row ran
    with tqdm(total=(rounds + 1) * len(names), desc="bench", disable=not progress) as bar:
        timings = alternate({n: timed(n) for n in names}, rounds, device=latents.device, progress=bar.update)
    peaks = {n: peak_memory(lambda n=n: timed(n)(Stopwatch())) if memory else 0 for n in names}

    rows = []
    for n in names:
        cached = macs[n] if n != "dense" else dense_macs
        reduction = dense_macs / cached
        speedup = timings.speedup(n)
        rows.append(
            dict(
                method=n,
                model=f"{model_name}-{size}",
                tokens=tokens,
                batch=batch,
                steps=steps,
                selector=selector_name if n in schedules or n in kv_rows else "-",
                gmacs=cached / 1e9,
                mac_reduction=reduction,
                speedup=speedup.median,
                speedup_min=speedup.low,
                speedup_max=speedup.high,
                efficiency=speedup.median / reduction,
                seconds=timings.median_seconds(n),
                peak_mem_mb=peaks[n] / 2**20,
                threads=torch.get_num_threads(),
                device=str(latents.device),
                dtype=dtype,
                compiled=compile,
                graphs=graphs[n],
            )
        )
    return rows


def format_table(rows: list[dict]) -> str:
    compiled = any(r.get("compiled") for r in rows)
    head = (
        "| method | GMACs / trajectory | MAC reduction | speed-up (median, min-max) | efficiency | "
        "time (s) | peak mem (MB) |" + (" graphs |" if compiled else "")
    )
    lines = [head, "|---" * (8 if compiled else 7) + "|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['gmacs']:.1f} | {r['mac_reduction']:.2f}x | {r['speedup']:.2f}x "
            f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {r['efficiency']:.2f} | {r['seconds']:.2f} | "
            f"{r['peak_mem_mb']:.0f} |" + (f" {r['graphs']} |" if compiled else "")
        )
    return "\n".join(lines)
