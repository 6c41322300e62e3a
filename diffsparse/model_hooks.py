"""Named diffusers `ModelHook`s on module instances: add one, find it, drop it leaving the module as it was."""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook


def add_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    """Register `hook` as `name` in `module`'s `HookRegistry` (created if needed)."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)


def find_hook(module: torch.nn.Module, name: str) -> ModelHook | None:
    """The hook registered as `name` on `module` itself, or None."""
    registry = getattr(module, "_diffusers_hook", None)
    return registry.get_hook(name) if registry is not None else None


def drop_hook(module: torch.nn.Module, name: str) -> None:
    """Remove hook `name` from `module`; an emptied registry goes too, so the module is as new."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(name, recurse=False)
    if not registry.hooks:
        del module._diffusers_hook
        # HookRegistry leaves the original bound `forward` as an instance attribute; drop it so the module is as new.
        leftover = module.__dict__.get("forward")
        if getattr(leftover, "__func__", None) is type(module).forward:
            del module.__dict__["forward"]


def hooks_under(module: torch.nn.Module):
    """(module path, hook name, hook) of every diffusers hook on `module` and its submodules."""
    for path, sub in module.named_modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None:
            for name, hook in registry.hooks.items():
                yield path, name, hook
