"""Running a search (`diffsparse.allocate.search`) a generation at a time: stopping rules, logging, a resumable
state file and the progress plot."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from diffsparse.files import write_json

log = logging.getLogger(__name__)


def search_options(s: DictConfig) -> dict:
    """The search algorithms' options from a `search:` config section."""
    keys = ("population", "survivors", "offspring", "max_mutation", "elites", "mutation_probability")
    return {k: s[k] for k in keys}


def run_search(search, s: DictConfig, state_path: Path, logger=None) -> float:
    """Advance `search` a generation at a time until `s.generations`, `s.minutes` of wall clock (checked after each
    generation) or convergence; log each generation and save the state to `state_path`, resuming from it if it
    exists. Returns the minutes spent in all runs."""

    spent = 0.0
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        search.load_state_dict(state)
        spent = state.get("minutes", 0.0)
        log.info("resuming %s from generation %d (%.2f min spent)", search.name, search.generation, spent)
    start = time.perf_counter() - spent * 60
    bar = tqdm(total=s.generations, initial=search.generation, desc=f"{search.name} generations")
    while search.generation < s.generations and not search.done:
        if s.minutes is not None and time.perf_counter() - start >= s.minutes * 60:
            break
        search.step()
        minutes = (time.perf_counter() - start) / 60
        _, best = search.best
        metrics = {"search/best": best, "search/evaluated": len(search.evaluated), "search/minutes": minutes}
        if logger is not None:
            logger.log_metrics(metrics, step=search.generation)
        write_json(state_path, {**search.state_dict(), "minutes": minutes})
        bar.update(1)
        bar.set_postfix(best=f"{best:.4g}", evaluated=len(search.evaluated))
    bar.close()
    if logger is not None:
        logger.finalize("success")
    return (time.perf_counter() - start) / 60


def plot_progress(evaluated: list, path: Path, title: str) -> None:

    matplotlib.use("Agg")

    values = np.array([f for _, f in evaluated])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(values, ".", ms=3, alpha=0.5, label="candidate")
    ax.plot(np.maximum.accumulate(values), "-", label="best so far")
    ax.set_xlabel("candidates evaluated")
    ax.set_ylabel("fitness (higher is better)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
