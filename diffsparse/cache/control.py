"""Internal controls of an applied token cache, for the learner and the sampling loop (not the public API)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from diffsparse.cache.hooks import token_cache_controller
from diffsparse.schedule import Schedule


def _required(model: torch.nn.Module):
    controller = token_cache_controller(model)
    if controller is None:
        raise RuntimeError("No token cache is applied to this model.")
    return controller


def set_soft_choice(model: torch.nn.Module, schedule: Schedule, choice: torch.Tensor | None) -> None:
    """Give the applied token cache a new schedule; with `choice` (T, U, |S|), the straight-through one-hot of its
    levels, units run in training mode: all tokens computed, blended with the cache so the loss reaches `choice`.
    `choice=None` goes back to the inference path."""
    _required(model).set_schedule(schedule, choice)


@contextmanager
def token_cache_paused(model: torch.nn.Module):
    """Inside the block the model runs dense (its original forward), e.g. for a teacher rollout; the cache
    is left as it was."""
    controller = _required(model)
    controller.paused = True
    try:
        yield model
    finally:
        controller.paused = False


def trajectory_replay(model: torch.nn.Module):
    """For recomputing a denoising step later (gradient checkpointing); None without a token cache.

    Returns a context-manager factory: inside `with replay():` the token cache is as it is now (schedule, mode and
    trajectory state), so the step sees the cache it first saw; on exit the live state is put back.
    """
    controller = token_cache_controller(model)
    if controller is None:
        return None
    restore = controller.snapshot()

    @contextmanager
    def replay():
        live = controller.snapshot()
        restore()
        try:
            yield
        finally:
            live()

    return replay


def suspend_trajectory(model: torch.nn.Module):
    """Set the model's unfinished trajectory aside (a sampling loop paused between steps): returns a function that
    puts it back, as often as needed, to resume the loop from there; None without a token cache."""
    controller = token_cache_controller(model)
    return None if controller is None else controller.suspend()
