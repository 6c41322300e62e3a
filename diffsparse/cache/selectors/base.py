"""The selector base class and registry: rank a unit's tokens; the top-k are recomputed, the rest reused.

Every selector scores tokens as `base + reuse_weight * s3`, adds the spatial bonus B, and takes the top k; a
selector class only defines its base score and declares what that needs from the runtime (attention signals, the
unit's inputs). s3 is the number of steps since the token was last computed (O(N)); the bonus B adds lambda_4 to a
token that is the maximum of its k x k tile of the token grid (one max-pool over N).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

INFLUENCE = "influence"  # s1, from self-attention units
ENTROPY = "entropy"  # s2, from cross-attention units

SELECTORS: dict[str, type[TokenSelector]] = {}  # name -> class, filled by `register_selector`


@dataclass
class SelectorConfig:
    """Which selector and its weights; `None` takes the backbone's default (paper A.5.1) or 0.

    Attributes:
        name: a registered selector (`toca`, `norm`, `similarity`, `random`); None: the one the schedule records
            (`meta["selector"]`, a learned schedule's), else the backbone's default (`toca` for DiT and
            PixArt-alpha, `norm` for FLUX and Wan).
        self_attn_weight: lambda_1, weight of self-attention influence (attention selectors only).
        cross_attn_weight: lambda_2, weight of cross-attention entropy (attention selectors only).
        reuse_weight: lambda_3, weight of the steps since a token was last computed.
        bonus: lambda_4, spatial bonus for the best token of each k x k tile (0 disables it).
        bonus_kernel: k.
        seed: seed of the `random` selector's generator.
    """

    name: str | None = None
    self_attn_weight: float | None = None
    cross_attn_weight: float | None = None
    reuse_weight: float | None = None
    bonus: float | None = None
    bonus_kernel: int | None = None
    seed: int = 0


class TokenSelector:
    """Scores and picks fresh tokens. Subclasses set `name`, define `base_score`, and declare what they need.

    Attributes:
        name: the registry name.
        reads_attention: the base score weighs attention signals (lambda_1, lambda_2), which the runtime computes
            on full steps; such a selector also takes the backbone's spatial bonus by default.
        needs_inputs: the runtime keeps each unit's input from when each token was last computed
            (`state.inputs`).
        side_effects: scoring advances the selector's state (a random stream), so it must be called exactly
            where inference calls it.
        reads_tokens: the score reads the values of the unit's input tokens (True unless a selector says not);
            one that does not may be given another tensor of the same shape (a block's residual stream instead
            of the MLP's normed input: `BlockList.fresh_mlp`).
        signals: the attention signals (`INFLUENCE`, `ENTROPY`) with a non-zero weight.
    """

    name: ClassVar[str] = ""
    reads_attention: ClassVar[bool] = False
    needs_inputs: ClassVar[bool] = False
    side_effects: ClassVar[bool] = False
    reads_tokens: ClassVar[bool] = True

    def __init__(self, config: SelectorConfig, defaults: dict):
        def pick(key, fallback):
            value = getattr(config, key)
            return float(value) if value is not None else float(defaults.get(key, fallback))

        reads = self.reads_attention
        # The backbone's bonus goes with its default selector (and attention selectors); others get one when asked.
        own_default = self.name == defaults.get("name", "toca")
        self.self_attn_weight = pick("self_attn_weight", 0.0) if reads else 0.0
        self.cross_attn_weight = pick("cross_attn_weight", 0.0) if reads else 0.0
        self.reuse_weight = pick("reuse_weight", 0.25 / 3)
        self.bonus = pick("bonus", 0.0) if reads or own_default or config.bonus is not None else 0.0
        self.bonus_kernel = int(pick("bonus_kernel", 2))
        self.signals = frozenset(
            name for name, w in ((INFLUENCE, self.self_attn_weight), (ENTROPY, self.cross_attn_weight)) if w != 0
        )

    def base_score(self, x: torch.Tensor, state, unit) -> torch.Tensor:
        """The selector's own per-token score `(B, N)` (before the reuse term and the spatial bonus)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Start a new trajectory (a stateful selector draws the same tokens again)."""

    def random_state(self):
        """Where the selector's random stream is (None: it has none, or before its first draw)."""
        return None

    def set_random_state(self, state) -> None:
        """Put the stream back where `random_state` said it was."""

    def score(self, x: torch.Tensor, state, unit) -> torch.Tensor:
        """Per-token scores `(B, N)` of unit `unit` whose input is `x` `(B, N, D)` in trajectory `state`."""
        score = self.base_score(x, state, unit)
        if self.reuse_weight != 0:
            score = score + self.reuse_weight * (state.step - state.last_fresh[unit.index]).float()
        if self.bonus != 0 and state.grid is not None and getattr(unit, "stream", "image") == "image":
            score = spatial_bonus(score, state.grid, self.bonus_kernel, self.bonus)
        return score

    def select(self, x: torch.Tensor, k: int, state, unit) -> torch.Tensor:
        """Indices `(B, k)` of the tokens to recompute. CFG halves (when `state.cfg`) get the same tokens."""
        score = self.score(x, state, unit)
        if state.cfg:
            half = score.shape[0] // 2
            idx = torch.topk(score[:half] + score[half:], k, dim=1, sorted=False).indices
            return torch.cat([idx, idx], dim=0)
        return torch.topk(score, k, dim=1, sorted=False).indices


def register_selector(cls: type[TokenSelector]) -> type[TokenSelector]:
    """Class decorator: make `cls` available by its `name` (`SelectorConfig(name=...)`, `selector="..."`).

    Example:
        >>> @register_selector
        ... class MeanSelector(TokenSelector):
        ...     name = "mean"
        ...
        ...     def base_score(self, x, state, unit):
        ...         return x.float().mean(dim=-1)
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name` to be registered as a selector.")
    if SELECTORS.get(cls.name, cls) is not cls:
        raise ValueError(f"A selector named {cls.name!r} is already registered ({SELECTORS[cls.name].__name__}).")
    SELECTORS[cls.name] = cls
    return cls


def make_selector(selector: str | SelectorConfig | dict | None, defaults: dict) -> TokenSelector:
    """A `TokenSelector` from a name, a `SelectorConfig`, a dict of its fields, or None (the backbone's default)."""
    if selector is None:
        selector = SelectorConfig()
    elif isinstance(selector, str):
        selector = SelectorConfig(name=selector)
    elif isinstance(selector, dict):
        selector = SelectorConfig(**selector)
    name = selector.name or defaults.get("name", "toca")
    if name not in SELECTORS:
        raise ValueError(f"Unknown selector {name!r}; choose one of {tuple(SELECTORS)}.")
    return SELECTORS[name](selector, defaults)


def spatial_bonus(score: torch.Tensor, grid: tuple[int, ...], k: int, bonus: float) -> torch.Tensor:
    """Add `bonus` to each token that is the maximum of its (non-overlapping) `k x k` tile of the token grid.

    `grid` is (rows, cols), or (frames, rows, cols) for video: tiles are then `k x k` within each frame.
    """
    b, n = score.shape
    h, w = grid[-2:]
    frames = n // (h * w) if h * w else 0
    if frames * h * w != n or (len(grid) == 3 and grid[0] != frames) or k <= 1:
        return score
    if h % k == 0 and w % k == 0:  # the usual case: tiles by reshaping, no copies
        tiles = score.view(b * frames, h // k, k, w // k, k)
        winners = tiles == tiles.amax(dim=(2, 4), keepdim=True)
        return score.add(winners.view(b, n).to(score.dtype), alpha=bonus)
    s = score.view(b * frames, 1, h, w)
    tile_max = F.max_pool2d(s, k, stride=k, ceil_mode=True)
    tile_max = tile_max.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)[..., :h, :w]
    return score + bonus * (s == tile_max).view(b, n).to(score.dtype)
