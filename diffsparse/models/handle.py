"""The model handle: one loaded model to sample, learn schedules on and evaluate, whatever its backbone."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffsparse.accounting.macs import mac_table
from diffsparse.accounting.times import TimeTable
from diffsparse.backbones import backbone_for, forward_kwargs
from diffsparse.cache.costs import measure_time_table
from diffsparse.models.sampling import make_scheduler


@dataclass
class ModelHandle:
    """A loaded model to sample and learn schedules on: the transformer (eval mode, frozen), its training noise
    schedule and, for latent models, the VAE that decodes its samples.

    Made by `diffsparse.load_model` (by name, folder or config). Class-conditional models (DiT) guide with
    the null class (`num_classes`, from the model's config). Text-conditional ones (PixArt) guide with the empty
    prompt's embedding, `null_conditions` (the transformer's keywords, batch 1; see `diffsparse.models.captions`).
    """

    transformer: torch.nn.Module
    noise_schedule: dict
    vae: torch.nn.Module | None = None
    null_conditions: dict | None = None
    shape: tuple[int, ...] | None = None  # latents of one sample, when the config does not say (FLUX, Wan)
    pipeline: object | None = None  # the stock pipeline it came from, if any (`infer.py` samples with it)
    pipeline_options: dict = field(default_factory=dict)  # its call's height / width / num_frames, if chosen

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional model, from its config (0 for text-conditional ones). The null class
        of classifier-free guidance is this number (diffusers adds one embedding row past them)."""
        return int(self.transformer.config.get("num_embeds_ada_norm") or 0) if not self.text_conditioned else 0

    @property
    def text_conditioned(self) -> bool:
        return backbone_for(self.transformer).text_conditioned

    def scheduler(self, name: str = "ddim"):
        return make_scheduler(name, self.noise_schedule)

    def probe_inputs(self, size: int | None = None, pairs: int = 1) -> dict:
        """Forward keywords for `pairs` images at one step: CFG pairs (the conditions, then the null ones) at
        timestep 500, zero inputs of the model's sample size (or `size` x `size`) on the model's device. MACs are
        counted on one pair; time tables are measured on the batch the user runs."""
        shape = self.sample_shape if size is None else (*self.sample_shape[:-2], size, size)
        param = next(self.transformer.parameters())
        x = torch.zeros(2 * pairs, *shape, dtype=param.dtype, device=param.device)
        if not self.text_conditioned:
            labels = torch.tensor([0] * pairs + [self.num_classes] * pairs, device=param.device)
            return forward_kwargs(
                self.transformer, x, torch.tensor(500, device=param.device), {"class_labels": labels}
            )
        if self.null_conditions is None:
            raise ValueError("A text-conditional model needs null_conditions (its caption embeddings' empty prompt).")
        text = {
            k: v.expand(2 * pairs, *v.shape[1:]).to(param.device, param.dtype if v.is_floating_point() else v.dtype)
            for k, v in self.null_conditions.items()
        }
        return forward_kwargs(self.transformer, x, torch.tensor(500, device=param.device), text)

    def time_table(self, pairs: int = 20, selector=None):
        """Seconds per unit and action of one step for `pairs` CFG pairs, measured now on the model's device and
        dtype (`cache.costs.measure_time_table`): what a time budget counts."""
        return measure_time_table(self.transformer, self.probe_inputs(pairs=pairs), selector=selector)

    def budget_table(self, unit: str = "macs", path=None, selector=None, pairs: int = 20, macs=None):
        """The table a budget is a fraction of: the MAC table (`macs`, if already probed), or (`unit="time"`) the
        time per action loaded from `path` (checked against the model's units) or measured now for `pairs` CFG
        pairs (`time_table`). A ValueError for a loaded table of another model."""
        macs = macs if macs is not None else self.mac_table()
        if unit == "macs":
            return macs
        if path is None:
            return self.time_table(pairs=pairs, selector=selector)
        table = TimeTable.load(path)
        if table.units != macs.units:
            raise ValueError(f"The time table {path} was measured on another model (its units differ).")
        return table

    def mac_table(self, size: int | None = None):
        """MACs per unit and level for one image: a CFG pair (its condition and the null one) at one step."""
        return mac_table(self.transformer, **self.probe_inputs(size))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples in image space, [-1, 1]: latents through the VAE, pixels as they are."""
        if self.vae is None:
            return x
        cfg = self.vae.config
        if cfg.get("latents_mean") is not None:  # Wan's VAE: per-channel normalised latents
            view = (1, -1) + (1,) * (x.ndim - 2)
            mean = torch.tensor(cfg.latents_mean, dtype=x.dtype, device=x.device).view(view)
            std = torch.tensor(cfg.latents_std, dtype=x.dtype, device=x.device).view(view)
            return self.vae.decode(x * std + mean).sample
        return self.vae.decode(x / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)).sample

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self.shape is not None:
            return tuple(self.shape)
        c = self.transformer.config
        return (c.in_channels, c.sample_size, c.sample_size)
