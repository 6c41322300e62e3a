"""Token selectors: rank a unit's tokens; the top-k are recomputed, the rest reused from the cache.

Every selector scores tokens as `base + reuse_weight * s3`, adds the spatial bonus B, and takes the top k.
What each costs per partial unit call, beyond a `topk` over N tokens:

- `toca` (DiffSparse eq. 10, from ToCa): base = lambda_1 s1 + lambda_2 s2. s1 (self-attention influence) and s2
  (cross-attention entropy) come from attention maps. They are computed only on steps where the block's attention
  unit runs on all tokens anyway and a later step will select tokens; there the attention runs as explicit
  softmax(QK^T)V in chunks instead of fused SDPA (same MACs, more memory traffic). Partial steps reuse them.
- `norm`: base = L2 norm of the unit's input token (O(N D)).
- `similarity`: base = 1 - cosine(input now, input when the token was last computed) (O(N D), and one more
  `(B, N, D)` tensor per unit kept in memory).
- `random`: uniform noise from a seeded generator (O(N)).

s3 is the number of steps since the token was last computed (O(N)); the bonus B adds lambda_4 to a token that is
the maximum of its k x k tile of the token grid (one max-pool over N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SELECTORS = ("toca", "norm", "similarity", "random")
INFLUENCE = "influence"  # s1, from self-attention units
ENTROPY = "entropy"  # s2, from cross-attention units


@dataclass
class SelectorConfig:
    """Which selector and its weights; `None` takes the backbone's default (paper A.5.1) or 0.

    Attributes:
        name: one of `toca`, `norm`, `similarity`, `random`; None: the backbone's default (`toca` for DiT and
            PixArt-alpha, `norm` for FLUX and Wan).
        self_attn_weight: lambda_1, weight of self-attention influence (toca only).
        cross_attn_weight: lambda_2, weight of cross-attention entropy (toca only).
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
    """Scores and picks fresh tokens. `signals` names the attention signals it reads (computed by the runtime)."""

    def __init__(self, config: SelectorConfig, defaults: dict):
        name = config.name or defaults.get("name", "toca")
        if name not in SELECTORS:
            raise ValueError(f"Unknown selector {name!r}; choose one of {SELECTORS}.")
        self.name = name

        def pick(key, fallback):
            value = getattr(config, key)
            return float(value) if value is not None else float(defaults.get(key, fallback))

        is_toca = name == "toca"
        weights = (config.self_attn_weight, config.cross_attn_weight)
        if is_toca and all(w is None for w in weights) and "self_attn_weight" not in defaults:
            raise ValueError(
                "The toca selector ranks tokens by attention maps, which this backbone's attention (joint or rotary) "
                "does not expose: use selector='norm' (its default), 'similarity' or 'random'."
            )
        # The backbone's bonus goes with its default selector (and toca); other selectors get one when asked.
        own_default = name == defaults.get("name", "toca")
        self.self_attn_weight = pick("self_attn_weight", 0.0) if is_toca else 0.0
        self.cross_attn_weight = pick("cross_attn_weight", 0.0) if is_toca else 0.0
        self.reuse_weight = pick("reuse_weight", 0.25 / 3)
        self.bonus = pick("bonus", 0.0) if is_toca or own_default or config.bonus is not None else 0.0
        self.bonus_kernel = int(pick("bonus_kernel", 2))
        self.seed = config.seed
        self.signals = frozenset(
            name for name, w in ((INFLUENCE, self.self_attn_weight), (ENTROPY, self.cross_attn_weight)) if w != 0
        )
        self.needs_inputs = name == "similarity"
        self._generator: torch.Generator | None = None

    def reset(self) -> None:
        """Restart the random stream (a new trajectory draws the same tokens again)."""
        self._generator = None

    def random_state(self) -> tuple[torch.device, torch.Tensor] | None:
        """Where the random stream is (None before its first draw), for `set_random_state`."""
        g = self._generator
        return None if g is None else (g.device, g.get_state())

    def set_random_state(self, state: tuple[torch.device, torch.Tensor] | None) -> None:
        if state is None:
            self._generator = None
        else:
            self._generator = torch.Generator(device=state[0])
            self._generator.set_state(state[1])

    def score(self, x: torch.Tensor, state, unit) -> torch.Tensor:
        """Per-token scores `(B, N)` of unit `unit` whose input is `x` `(B, N, D)` in trajectory `state`."""
        b, n, _ = x.shape
        if self.name == "toca":
            score = torch.zeros(b, n, device=x.device)
            for signal, weight in ((INFLUENCE, self.self_attn_weight), (ENTROPY, self.cross_attn_weight)):
                if weight != 0:
                    score = score + weight * state.signals[(unit.block, signal)]
        elif self.name == "norm":
            score = x.float().norm(dim=-1)
        elif self.name == "similarity":
            score = 1.0 - F.cosine_similarity(x.float(), state.inputs[unit.index].float(), dim=-1)
        else:
            if self._generator is None or self._generator.device != x.device:
                self._generator = torch.Generator(device=x.device).manual_seed(self.seed)
            score = torch.rand(b, n, generator=self._generator, device=x.device)
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


def make_selector(selector: str | SelectorConfig | dict | None, defaults: dict) -> TokenSelector:
    """A `TokenSelector` from a name, a `SelectorConfig`, a dict of its fields, or None (the backbone's default)."""
    if selector is None:
        selector = SelectorConfig()
    elif isinstance(selector, str):
        selector = SelectorConfig(name=selector)
    elif isinstance(selector, dict):
        selector = SelectorConfig(**selector)
    return TokenSelector(selector, defaults)
