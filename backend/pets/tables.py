"""Pooled per-task parameter storage on the serving device.

Two containers hold every task's weights, so that one kernel launch can serve all tasks:

* :class:`SlotGroup`: fixed-width rows (biases, LayerNorm gamma/beta, IA3 scales), one row
  per slot in each of several ``[L, P, N]`` tables. Slot 0 holds the backbone's own values,
  so a task that does not change, say, its biases simply points at slot 0 and costs nothing.
* :class:`FlatPool`: a 1-D tensor with a first-fit allocator for variable-sized blobs (LoRA
  and adapter matrices of any rank, sparse values and indices of any density).

Both grow by doubling and reuse freed space; ``FlatPool.compact`` returns freed space to the
device allocator (the caller re-bases offsets from the returned map). Growing a pool needs
the old and the new tensor at once; when the device cannot hold both, the old contents are
staged through host memory (:func:`grow_tensor`), so the peak is the new size alone and a
full device is not declared full while a third of it is still free.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import torch


def grow_into(
    get: Callable[[], torch.Tensor],
    put: Callable[[torch.Tensor], None],
    shapes: list[tuple[int, ...]],
) -> None:
    """Replace the tensor behind ``get``/``put`` by a zero tensor of the first of ``shapes``
    (largest first) that fits, holding the old values in its leading corner.

    Tries each size beside the old tensor first; if none fits, parks the old tensor on the
    host (``put`` drops the device reference), frees it and tries again, so only the new
    tensor has to fit. If nothing fits, the old tensor goes back and OutOfMemoryError rises.
    """
    old = get()
    device, dtype = old.device, old.dtype
    corner = tuple(slice(0, n) for n in old.shape)

    def attempt() -> torch.Tensor | None:
        for shape in shapes:
            try:
                return torch.zeros(shape, device=device, dtype=dtype)
            except torch.OutOfMemoryError:
                continue
        return None

    grown = attempt()
    if grown is None:
        put(old.cpu())
        del old
        torch.cuda.empty_cache()
        old = get()
        grown = attempt()
        if grown is None:
            put(old.to(device))
            raise torch.OutOfMemoryError(
                f"cannot grow a {tuple(old.shape)} {dtype} task pool to any of {shapes} on "
                f"{device}; remove tasks or set MEMORY_BUDGET_MB (size it with `pets capacity`)"
            )
    grown[corner].copy_(old)  # host -> device straight into place: no second device copy
    put(grown)


class SlotGroup:
    """Several ``[L, P, N]`` tables sharing one slot index (slot 0 = backbone values).

    Args:
        shared: name -> ``[L, N]`` backbone rows that fill slot 0.
        device, dtype: storage placement.
    """

    def __init__(
        self,
        shared: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        capacity: int = 8,
    ) -> None:
        self.names = list(shared)
        self.tables: dict[str, torch.Tensor] = {}
        for name, rows in shared.items():
            t = torch.zeros(rows.shape[0], capacity, rows.shape[1], device=device, dtype=dtype)
            t[:, 0] = rows.to(device=device, dtype=dtype)
            self.tables[name] = t
        self._free = list(range(capacity - 1, 0, -1))  # pop() gives the lowest slot
        self.used = 1

    @property
    def capacity(self) -> int:
        return next(iter(self.tables.values())).shape[1]

    def row_bytes(self) -> int:
        """Bytes one slot occupies across all tables."""
        return sum(t.shape[0] * t.shape[2] * t.element_size() for t in self.tables.values())

    def shared(self, name: str) -> torch.Tensor:
        """``[L, N]`` backbone rows of table ``name``."""
        return self.tables[name][:, 0]

    def alloc(self, rows: dict[str, torch.Tensor]) -> int:
        """Store one task's rows (name -> ``[L, N]``; missing names copy slot 0)."""
        unknown = set(rows) - set(self.names)
        if unknown:
            raise KeyError(f"unknown tables {sorted(unknown)}; this group holds {self.names}")
        if not self._free:
            self._grow()
        slot = self._free.pop()
        for name, t in self.tables.items():
            src = rows.get(name)
            t[:, slot] = t[:, 0] if src is None else src.to(device=t.device, dtype=t.dtype)
        self.used += 1
        return slot

    def free(self, slot: int) -> None:
        if slot <= 0:
            return  # slot 0 is the backbone's
        self._free.append(slot)
        self._free.sort(reverse=True)
        self.used -= 1

    def _grow(self) -> None:
        old = self.capacity
        sizes = [old * 2, old + max(1, old // 4)]
        for name in self.names:  # the first table picks the size; the rest must match it
            layers, _, width = self.tables[name].shape

            def get(n: str = name) -> torch.Tensor:
                return self.tables[n]

            def put(t: torch.Tensor, n: str = name) -> None:
                self.tables[n] = t

            grow_into(get, put, [(layers, p, width) for p in sizes])
            sizes = [self.tables[name].shape[1]]
        new = sizes[0]
        self._free = list(range(new - 1, old - 1, -1)) + self._free


@dataclass(frozen=True)
class Allocation:
    offset: int
    size: int


class FlatPool:
    """A growable 1-D tensor with first-fit allocation of contiguous ranges."""

    def __init__(self, device: torch.device, dtype: torch.dtype, capacity: int = 1 << 16) -> None:
        self.data = torch.zeros(capacity, device=device, dtype=dtype)
        self._free: list[tuple[int, int]] = [(0, capacity)]  # sorted (offset, size)
        self.used = 0

    @property
    def capacity(self) -> int:
        return self.data.numel()

    def _set_data(self, t: torch.Tensor) -> None:
        self.data = t

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def put(self, values: torch.Tensor) -> Allocation:
        """Copy ``values`` (any shape, flattened row-major) into the pool."""
        flat = values.reshape(-1)
        n = flat.numel()
        alloc = self._alloc(n)
        if n:
            self.data[alloc.offset : alloc.offset + n] = flat.to(self.data.device, self.data.dtype)
        return alloc

    def write_at(self, offset: int, values: torch.Tensor, min_capacity: int) -> None:
        """Write at a caller-chosen offset (a pool that mirrors another pool's layout)."""
        flat = values.reshape(-1)
        need = max(min_capacity, offset + flat.numel())
        if need > self.capacity:
            grow_into(lambda: self.data, self._set_data, [(need,)])
        self.data[offset : offset + flat.numel()] = flat.to(self.data.device, self.data.dtype)

    def release(self, alloc: Allocation) -> None:
        if alloc.size == 0:
            return
        bisect.insort(self._free, (alloc.offset, alloc.size))
        self.used -= alloc.size
        merged: list[tuple[int, int]] = []
        for off, size in self._free:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((off, size))
        self._free = merged

    def compact(self, live: list[Allocation]) -> dict[int, int]:
        """Move ``live`` allocations to the front and shrink the tensor.

        Returns:
            old offset -> new offset for every live allocation.
        """
        remap: dict[int, int] = {}
        total = sum(a.size for a in live)
        new = torch.zeros(max(total, 1), device=self.data.device, dtype=self.data.dtype)
        pos = 0
        for a in sorted(live, key=lambda a: a.offset):
            new[pos : pos + a.size] = self.data[a.offset : a.offset + a.size]
            remap[a.offset] = pos
            pos += a.size
        self.data = new
        self._free = [(pos, new.numel() - pos)] if new.numel() > pos else []
        self.used = total
        return remap

    def _alloc(self, n: int) -> Allocation:
        if n == 0:
            return Allocation(0, 0)
        for i, (off, size) in enumerate(self._free):
            if size >= n:
                if size == n:
                    del self._free[i]
                else:
                    self._free[i] = (off + n, size - n)
                self.used += n
                return Allocation(off, n)
        self._grow(n)
        return self._alloc(n)

    def _grow(self, need: int) -> None:
        old = self.capacity
        grow_into(
            lambda: self.data,
            self._set_data,
            [(max(old * 2, old + need),), (old + max(need, old // 4),), (old + need,)],
        )
        added = self.capacity - old
        if self._free and self._free[-1][0] + self._free[-1][1] == old:
            off, size = self._free[-1]
            self._free[-1] = (off, size + added)
        else:
            self._free.append((old, added))
