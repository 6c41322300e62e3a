"""`TokenCacheConfig`: everything `apply_token_cache` needs, as one value."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffsparse.cache.forecast import FORECAST_ORDERS
from diffsparse.cache.selectors import SelectorConfig
from diffsparse.schedule import Schedule


@dataclass
class TokenCacheConfig:
    """Options of the token cache.

    Attributes:
        schedule: the `Schedule` to run (made for `cacheable_units(model)` and the pipeline's number of steps).
        selector: a selector name (`toca`, `norm`, `similarity`, `random`, or any registered one), a
            `SelectorConfig`, or a dict of its fields. Without a name: the schedule's `meta["selector"]` (a learned
            schedule records the one it was learned with), else the backbone's default.
        cfg: whether the batch holds classifier-free-guidance halves that must pick the same tokens: `"auto"` (the
            two halves of the first step's input are equal), `True` or `False`; anything else raises a ValueError.
        forecast_order: Taylor order of the forecast actions (1 or 2); None: the schedule's `meta["forecast_order"]`
            (what it was learned with), else 1.
        forecast_dtype: dtype of the forecast's factors: `"float32"` (default), `"model"` (the model's dtype: half
            the memory in bf16), or a torch dtype.
        skip_blocks: run less of a block where the backbone row says how (`BlockList`: DiT and PixArt): at a step
            where every unit of the block reuses all its tokens, put its output together from theirs and skip the
            rest of its work (its norms and modulations); at a step where its MLP recomputes some tokens, norm and
            modulate the MLP's input on those tokens only (with a selector that reads no token values: `toca`,
            `random`). The output is the same bit for bit; False runs every block as diffusers writes it.
        reuse_kv: on partial steps of self-attention units (DiT, PixArt), take the reused tokens' keys and values from
            when they were last computed instead of projecting them again (`diffsparse.cache.kv`): less work, at
            some fidelity cost. False (default): project every token's key and value.
        compile_units: compile each unit's computation (all its tokens, or the fresh ones) with `torch.compile`:
            True (torch's defaults), or a dict of `torch.compile` keywords (`{"mode": "max-autotune"}`). The hooks'
            bookkeeping stays eager, so it compiles per unit kind and token count, not per step. Not applied to
            FLUX's joint attention and single-stream blocks, nor to full steps that gather the `toca` selector's
            attention maps. False (default): eager.

    Example:
        >>> config = TokenCacheConfig(schedule=Schedule.uniform(pipe.transformer, num_steps=20, sparsity=0.5),
        ...                           selector="norm")
        >>> apply_token_cache(pipe.transformer, config)
    """

    schedule: Schedule | None = None
    selector: str | SelectorConfig | dict = field(default_factory=SelectorConfig)
    cfg: bool | str = "auto"
    forecast_order: int | None = None
    forecast_dtype: str | torch.dtype = "float32"
    skip_blocks: bool = True
    compile_units: bool | dict = False
    reuse_kv: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise a `ValueError` for an option outside what is documented above (a missing schedule is checked
        when the config is applied)."""
        if not (isinstance(self.cfg, bool) or (isinstance(self.cfg, str) and self.cfg == "auto")):
            raise ValueError(
                f"Token-cache option cfg={self.cfg!r} is not valid: use cfg=True (the batch is classifier-free-"
                "guidance halves), cfg=False (it is not), or cfg='auto' (detect it at the first step)."
            )
        if self.forecast_order is not None and self.forecast_order not in FORECAST_ORDERS:
            raise ValueError(f"forecast_order={self.forecast_order!r}: choose one of {FORECAST_ORDERS} (or None).")
        self.factor_dtype()
        if not isinstance(self.skip_blocks, bool):
            raise ValueError(f"skip_blocks={self.skip_blocks!r}: use True or False.")
        if not isinstance(self.reuse_kv, bool):
            raise ValueError(f"reuse_kv={self.reuse_kv!r}: use True or False.")
        if not isinstance(self.compile_units, bool | dict):
            raise ValueError(
                f"compile_units={self.compile_units!r}: use True, False, or a dict of torch.compile keywords."
            )

    def compile_options(self) -> dict | None:
        """`torch.compile`'s keywords for the units' computations, or None (eager)."""
        if self.compile_units is False:
            return None
        return {} if self.compile_units is True else dict(self.compile_units)

    def order(self) -> int:
        """The forecast order to run: the option, else the schedule's own, else 1."""
        if self.forecast_order is not None:
            return self.forecast_order
        order = (self.schedule.meta.get("forecast_order") if self.schedule is not None else None) or 1
        if order not in FORECAST_ORDERS:
            raise ValueError(f"The schedule's meta forecast_order={order!r} is not one of {FORECAST_ORDERS}.")
        return int(order)

    def factor_dtype(self) -> torch.dtype | None:
        """The forecast factors' dtype (None: the model's)."""
        if isinstance(self.forecast_dtype, torch.dtype):
            return self.forecast_dtype
        if self.forecast_dtype == "model":
            return None
        dtype = getattr(torch, str(self.forecast_dtype), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(
                f"forecast_dtype={self.forecast_dtype!r}: use 'float32', 'bfloat16', 'float16', 'model' or a "
                "floating torch dtype."
            )
        return dtype
