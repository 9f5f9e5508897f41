"""Host-side per-task-slot metadata tables that grow with the number of task slots."""

from __future__ import annotations

import torch


class SlotMeta:
    """A CPU tensor ``[capacity, *shape]`` indexed by task slot, filled with ``fill``."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, fill: float | int = 0) -> None:
        self.shape, self.dtype, self.fill = shape, dtype, fill
        self.data = torch.full((16, *shape), fill, dtype=dtype)

    def __setitem__(self, slot: int, value: torch.Tensor | float | int) -> None:
        while slot >= self.data.shape[0]:
            grown = torch.full((self.data.shape[0] * 2, *self.shape), self.fill, dtype=self.dtype)
            grown[: self.data.shape[0]] = self.data
            self.data = grown
        self.data[slot] = value

    def reset(self, slot: int) -> None:
        if slot < self.data.shape[0]:
            self.data[slot] = self.fill

    def __getitem__(self, slots: torch.Tensor) -> torch.Tensor:
        return self.data[slots]
