"""Conditions to learn schedules on: class ids with the seed of each one's initial noise. No images are needed.

Training and validation conditions draw their noise from disjoint seed ranges, so a schedule is judged on noise
it never saw (the evaluation harness uses seeds from 0; training starts at `TRAIN_SEED_OFFSET`).
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

TRAIN_SEED_OFFSET = 1_000_000
VAL_SEED_OFFSET = 2_000_000


class Conditions(Dataset):
    """Item i: (class id i mod num_classes, noise seed offset + i)."""

    def __init__(self, size: int, num_classes: int, seed_offset: int):
        self.size, self.num_classes, self.seed_offset = size, num_classes, seed_offset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[int, int]:
        return i % self.num_classes, self.seed_offset + i


class ConditionDataModule(L.LightningDataModule):
    """Class-conditional training and validation conditions (captions with precomputed text embeddings would
    slot in as a second dataset class)."""

    def __init__(self, num_classes: int, train_size: int = 64, val_size: int = 16, batch_size: int = 8):
        super().__init__()
        self.num_classes, self.train_size, self.val_size, self.batch_size = (
            num_classes, train_size, val_size, batch_size
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        # In order, not shuffled: under data parallelism each process then takes every n-th condition, and n
        # processes with batch b see exactly the batches of one process with batch n x b (the same schedule).
        return DataLoader(Conditions(self.train_size, self.num_classes, TRAIN_SEED_OFFSET), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(Conditions(self.val_size, self.num_classes, VAL_SEED_OFFSET), batch_size=self.batch_size)
