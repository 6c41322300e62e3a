"""The learner's settings checked before anything is loaded, and the cost table its budget is counted in."""

from __future__ import annotations

from pathlib import Path

from diffsparse.allocate.solver import check_num_steps

BUDGET_UNITS = ("macs", "time")

STAGE1_HOWTO = ("run stage 1 first (`python train.py experiment=digits_stage1` writes <output_dir>/stage1.ckpt) "
                "and pass learn.stage1_checkpoint=PATH")  # fmt: skip


def check_settings(num_steps, budget, stage, num_full, stage1_checkpoint, budget_unit="macs") -> None:
    """Refuse settings that cannot work, before the model is loaded, with what to set instead."""
    if budget_unit not in BUDGET_UNITS:
        raise ValueError(
            f"learn.budget_unit={budget_unit!r}: choose one of {BUDGET_UNITS} (the budget as a fraction of the dense "
            "MACs, or of the dense time measured on this device)."
        )
    if stage not in (1, 2):
        raise ValueError(f"learn.stage={stage}: choose learn.stage=1 (step and layer costs) or 2 (from stage 1).")
    check_num_steps(num_steps, "learn.num_steps")
    if not 0.0 < budget < 1.0:
        raise ValueError(
            f"learn.budget={budget}: the budget is the fraction of the dense MACs (or time) to save, so it must lie "
            "strictly between 0 and 1 (e.g. learn.budget=0.5)."
        )
    if num_full is not None and not 1 <= num_full <= num_steps:
        raise ValueError(
            f"learn.num_full={num_full}: the number of full steps must be in 1..learn.num_steps ({num_steps}); the "
            "first step is always full, so at least 1. Leave learn.num_full=null to let the DP choose them."
        )
    if stage == 2:
        if stage1_checkpoint is None or stage1_checkpoint == "???":
            raise ValueError(f"learn.stage=2 starts from a stage-1 checkpoint, and none was given: {STAGE1_HOWTO}.")
        if not Path(stage1_checkpoint).is_file():
            raise ValueError(f"learn.stage1_checkpoint={stage1_checkpoint} is not a file: {STAGE1_HOWTO}.")
