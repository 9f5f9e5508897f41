"""Host-side per-task-slot metadata tables that grow with the number of task slots."""

from __future__ import annotations

import numpy as np
import torch


class SlotMeta:
    """A CPU tensor ``[capacity, *shape]`` indexed by task slot, filled with ``fill``."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, fill: float | int = 0) -> None:
        self.shape, self.dtype, self.fill = shape, dtype, fill
        self.data = torch.full((16, *shape), fill, dtype=dtype)
        self._np = self.data.numpy()  # the same memory, for the numpy planning path

    def _cover(self, slot: int) -> None:
        while slot >= self.data.shape[0]:
            grown = torch.full((self.data.shape[0] * 2, *self.shape), self.fill, dtype=self.dtype)
            grown[: self.data.shape[0]] = self.data
            self.data = grown
            self._np = grown.numpy()

    def __setitem__(self, slot: int, value: torch.Tensor | float | int) -> None:
        self._cover(slot)
        self.data[slot] = value

    def reset(self, slot: int) -> None:
        if slot < self.data.shape[0]:
            self.data[slot] = self.fill

    def __getitem__(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows of ``slots`` (a CPU index tensor); slots never set read as ``fill``.

        Read for every batch: the common case, slots within the table, costs one index.
        """
        try:
            return self.data[slots]
        except IndexError:  # a slot past every slot ever set (never a registered task's)
            self._cover(int(slots.max()))
            return self.data[slots]

    def rows(self, slots: np.ndarray) -> np.ndarray:
        """:meth:`__getitem__` in numpy (a copy ``[len(slots), *shape]``): what a plan built
        with numpy reads, at a fraction of a torch op's fixed cost on small arrays."""
        try:
            return self._np[slots]
        except IndexError:  # a slot past every slot ever set (never a registered task's)
            self._cover(int(slots.max()))
            return self._np[slots]
