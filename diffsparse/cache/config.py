"""`TokenCacheConfig`: everything `apply_token_cache` needs, as one value."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffsparse.cache.selectors import SelectorConfig
from diffsparse.schedule import Schedule


@dataclass
class TokenCacheConfig:
    """Options of the token cache.

    Attributes:
        schedule: the `Schedule` to run (made for `cacheable_units(model)` and the pipeline's number of steps).
        selector: a selector name (`toca`, `norm`, `similarity`, `random`, or any registered one), a
            `SelectorConfig`, or a dict of its fields.
        cfg: whether the batch holds classifier-free-guidance halves that must pick the same tokens: `"auto"` (the
            two halves of the first step's input are equal), `True` or `False`; anything else raises a ValueError.

    Example:
        >>> config = TokenCacheConfig(schedule=Schedule.uniform(pipe.transformer, num_steps=20, sparsity=0.5),
        ...                           selector="norm")
        >>> apply_token_cache(pipe.transformer, config)
    """

    schedule: Schedule | None = None
    selector: str | SelectorConfig | dict = field(default_factory=SelectorConfig)
    cfg: bool | str = "auto"

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
