"""Measuring: the evaluation harness (`python -m diffsparse.evaluate`), its methods and metrics, the one timing
helper (`timing`: alternated runs, synchronised clock) and memory probe, the speed bench (`python -m
diffsparse.bench`) and cached inference with a schedule. May import every library sub-package; only the Hydra tasks
and the entry points import it.
"""
