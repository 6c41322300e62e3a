"""`random`: uniform noise from a seeded generator (O(N) per partial unit call); restarts with each trajectory."""

from __future__ import annotations

import torch

from diffsparse.cache.selectors.base import SelectorConfig, TokenSelector, register_selector


@register_selector
class RandomSelector(TokenSelector):
    name = "random"
    side_effects = True  # every score draws from the stream
    reads_tokens = False  # only the input's shape

    def __init__(self, config: SelectorConfig, defaults: dict):
        super().__init__(config, defaults)
        self.seed = config.seed
        self._generator: torch.Generator | None = None

    def base_score(self, x: torch.Tensor, state, unit) -> torch.Tensor:
        b, n, _ = x.shape
        if self._generator is None or self._generator.device != x.device:
            self._generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return torch.rand(b, n, generator=self._generator, device=x.device)

    def reset(self) -> None:
        self._generator = None

    def random_state(self) -> tuple[torch.device, torch.Tensor] | None:
        g = self._generator
        return None if g is None else (g.device, g.get_state())

    def set_random_state(self, state: tuple[torch.device, torch.Tensor] | None) -> None:
        if state is None:
            self._generator = None
        else:
            self._generator = torch.Generator(device=state[0])
            self._generator.set_state(state[1])
