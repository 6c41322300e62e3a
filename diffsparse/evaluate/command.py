"""`python -m diffsparse.evaluate`: the command line over the one-budget evaluation (`harness.evaluate`), the Pareto
sweep (`pareto.sweep`, with `--budgets`) and the learned rows (`learned.learned_rows`, with `--learn`)."""

from __future__ import annotations

import logging
import shlex
import sys

import torch

from diffsparse.evaluate.cli import UsageError, check_config, parse_args
from diffsparse.evaluate.harness import evaluate
from diffsparse.evaluate.learned import learned_rows
from diffsparse.evaluate.pareto import sweep


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse_args(argv)
    args = sys.argv[1:] if argv is None else argv
    try:
        if cfg.learn:
            check_config(cfg)  # every setting checked before the learning, which takes minutes per budget
            if cfg.threads:
                torch.set_num_threads(cfg.threads)  # the learning runs in this process too
            cfg.schedules = [*cfg.schedules, *learned_rows(cfg)]
        run = sweep if cfg.budgets else evaluate
        run(cfg, command=shlex.join(["python", "-m", "diffsparse.evaluate", *args]))
    except UsageError as e:  # found before any sampling: said as argparse says its errors
        print(f"python -m diffsparse.evaluate: error: {e}", file=sys.stderr)
        sys.exit(2)
