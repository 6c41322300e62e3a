"""Conditions to learn schedules on: class ids or caption embeddings, each with the seed of its initial noise.

No images are needed: the teacher is the dense model itself. An item is a dict of the transformer's conditioning
keywords (`class_labels`; or `encoder_hidden_states` and the model's other text keywords) plus `seed`.

Training and validation draw their noise from disjoint seed ranges, so a schedule is judged on noise it never saw
(the evaluation harness uses seeds from 0; training starts at `TRAIN_SEED_OFFSET`). Captions are split too: the
first `train_size` for training, the next `val_size` for validation.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from diffsparse.models.captions import forward_conditions, load_captions

TRAIN_SEED_OFFSET = 1_000_000
VAL_SEED_OFFSET = 2_000_000


class ClassConditions(Dataset):
    """Item i: class id i mod num_classes, noise seed offset + i."""

    def __init__(self, size: int, num_classes: int, seed_offset: int):
        self.size, self.num_classes, self.seed_offset = size, num_classes, seed_offset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return {"class_labels": i % self.num_classes, "seed": self.seed_offset + i}


class CaptionConditions(Dataset):
    """Item i: the transformer keywords of caption `first + i` (its embedding; PixArt's attention mask, FLUX's
    pooled embedding), noise seed offset + i."""

    def __init__(self, embeddings: dict, first: int, size: int, seed_offset: int):
        self.conditions = {k: v[first : first + size] for k, v in forward_conditions(embeddings).items()}
        self.size = len(self.conditions["encoder_hidden_states"])
        self.seed_offset = seed_offset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.conditions.items()}, "seed": self.seed_offset + i}


class ConditionDataModule(L.LightningDataModule):
    """Training and validation conditions: `num_classes` classes, or the captions in a `diffsparse.captions` file.

    In order, not shuffled: under data parallelism each process then takes every n-th condition, and n processes
    with batch b see exactly the batches of one process with batch n x b (so they learn the same schedule).
    """

    def __init__(
        self,
        num_classes: int = 10,
        train_size: int = 64,
        val_size: int = 16,
        batch_size: int = 8,
        captions: str | None = None,
    ):
        super().__init__()
        if train_size < 1:
            raise ValueError(
                f"data.train_size={train_size}: the costs are learned on the training conditions, and with none the "
                "exported schedule would be the untrained start; set data.train_size >= 1."
            )
        if val_size < 1:
            raise ValueError(
                f"data.val_size={val_size}: validation chooses the exported schedule (the checkpoint with the lowest "
                "validation score), and with no validation conditions there is none to choose; set data.val_size >= 1."
            )
        if batch_size < 1:
            raise ValueError(
                f"data.batch_size={batch_size}: a batch needs at least one condition; set data.batch_size >= 1."
            )
        self.num_classes, self.train_size, self.val_size, self.batch_size = (
            num_classes, train_size, val_size, batch_size
        )  # fmt: skip
        self.captions = captions
        self.embeddings = None
        if captions is not None:
            self.embeddings, _ = load_captions(captions)
            available = len(self.embeddings["prompt_embeds"])
            if train_size + val_size > available:
                raise ValueError(
                    f"{captions} holds {available} captions; training and validation need {train_size} + "
                    f"{val_size} different ones (lower data.train_size / data.val_size or add captions)."
                )

    def _dataset(self, first: int, size: int, seed_offset: int) -> Dataset:
        if self.embeddings is None:
            return ClassConditions(size, self.num_classes, seed_offset)
        return CaptionConditions(self.embeddings, first, size, seed_offset)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(0, self.train_size, TRAIN_SEED_OFFSET), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        data = self._dataset(self.train_size, self.val_size, VAL_SEED_OFFSET)
        return DataLoader(data, batch_size=self.batch_size)


def split_batch(batch: dict) -> tuple[dict, torch.Tensor]:
    """(the transformer's conditioning keywords, the noise seeds) of a batch."""
    conditions = {k: v for k, v in batch.items() if k != "seed"}
    return conditions, batch["seed"]
