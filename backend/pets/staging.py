"""One host-to-device copy per forward: the batch's index arrays, packed.

A forward needs a few dozen small host-built arrays on the device (token ids, ``cu_seqlens``,
segment tables, each PET type's item lists, head rows). Copying each one costs a launch and,
from pageable memory, a synchronisation. :class:`Stager` packs them into one pinned host
buffer and copies that into one persistent device buffer with a single ``cudaMemcpyAsync``;
every array is then a view into the device buffer.

The views' addresses depend only on the sequence of (dtype, shape) staged, and the device
buffer is persistent, so a CUDA graph captured over a forward stays valid for every later
batch that stages the same sequence: :attr:`Stager.layout` is part of the graph key
(:mod:`pets.graphs`). Growing a buffer changes its address: :attr:`Stager.epoch` counts that,
and graphs captured in an older epoch are dropped.

On the CPU, :meth:`Stager.put` returns the host tensor itself (no copy at all).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

_ALIGN = 16  # bytes: every view starts 16-byte aligned (vectorised kernel loads)


class Stager:
    """Packs host tensors into one pinned buffer and ships them with one copy.

    Usage per forward: :meth:`begin`, any number of :meth:`put`, then :meth:`flush` before
    the first kernel reads a view. The previous forward must be finished with the views
    (the engine synchronises on its outputs before it stages the next batch).

    Args:
        device: where the views live; on a CPU device staging is the identity.
        capacity: initial size of both buffers in bytes (they grow by doubling).
    """

    def __init__(
        self, device: torch.device, capacity: int = 1 << 20, enabled: bool | None = None
    ) -> None:
        self.device = device
        self.enabled = device.type == "cuda" if enabled is None else enabled  # tests: CPU on
        self.epoch = 0  # bumped whenever the device buffer moves
        self.layout: list[tuple[torch.dtype, tuple[int, ...]]] = []
        self._used = 0
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._image: np.ndarray | None = None  # a restored snapshot's bytes (flush writes)
        self._host = torch.empty(0, dtype=torch.uint8)
        self._host_np = self._host.numpy()
        self._dev = torch.empty(0, dtype=torch.uint8)
        if self.enabled:
            self._allocate(capacity)

    @property
    def device_buffer(self) -> torch.Tensor:
        """The device buffer every view points into (graph keys compare against it)."""
        return self._dev

    @property
    def nbytes(self) -> int:
        """Bytes of the device buffer (reported with the graph memory)."""
        return int(self._dev.numel())

    def _allocate(self, capacity: int) -> None:
        pinned = self.device.type == "cuda"
        self._host = torch.empty(capacity, dtype=torch.uint8, pin_memory=pinned)
        self._host_np = self._host.numpy()
        self._dev = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        self.epoch += 1

    def begin(self) -> None:
        """Start a forward's staging: forget the previous layout."""
        self.layout = []
        self._used = 0
        self._pending = []
        self._image = None

    def snapshot(self) -> StageSnapshot:
        """What was staged since :meth:`begin` (before :meth:`flush`), to stage it again."""
        return StageSnapshot(list(self.layout), self._used, list(self._pending))

    def with_image(self, snap: StageSnapshot) -> StageSnapshot:
        """``snap`` with a copy of the bytes its :meth:`flush` just wrote, when they are few
        (:data:`IMAGE_MAX_BYTES`): restoring it then writes them back in one copy instead of
        one per array. Call right after that flush."""
        if not self.enabled or snap.used > IMAGE_MAX_BYTES:
            return snap
        return dataclasses.replace(snap, image=self._host_np[: snap.used].copy())

    def restore(self, snap: StageSnapshot, replace: dict[int, torch.Tensor]) -> None:
        """Stage ``snap`` again, its ``i``-th array's values replaced by ``replace[i]`` (same
        dtype and shape): the views handed out for ``snap`` stay valid."""
        self.layout = list(snap.layout)
        self._used = snap.used
        self._image = snap.image
        self._pending = [] if snap.image is not None else list(snap.pending)
        for i, t in replace.items():
            start, old = snap.pending[i]
            if t.dtype != old.dtype or t.shape != old.shape:
                raise ValueError(
                    f"restaged array {i} is {t.dtype} {tuple(t.shape)}, the snapshot's "
                    f"{old.dtype} {tuple(old.shape)}; a snapshot only takes new values"
                )
            if snap.image is None:
                self._pending[i] = (start, t.contiguous())
            else:
                self._pending.append((start, t.contiguous()))

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """A device view holding ``t``'s values (valid after :meth:`flush`).

        Args:
            t: a host tensor of any shape and dtype (made contiguous here).
        Returns:
            ``t`` itself on a CPU stager, else a view of the same shape and dtype into the
            device buffer.
        """
        if not self.enabled:
            return t
        t = t.contiguous()
        start = self._claim(t)
        self._pending.append((start, t))
        return _view(self._dev, start, t)

    def reserve(self, like: torch.Tensor) -> torch.Tensor:
        """A device view shaped like ``like`` that :meth:`flush` does not fill: the caller
        copies a device tensor into it after the flush."""
        if not self.enabled:
            return like
        return _view(self._dev, self._claim(like), like)

    def _claim(self, like: torch.Tensor) -> int:
        """Record ``like``'s dtype and shape in the layout; returns its aligned offset."""
        self.layout.append((like.dtype, tuple(like.shape)))
        start = self._used
        self._used = start + (like.numel() * like.element_size() + _ALIGN - 1) // _ALIGN * _ALIGN
        return start

    def flush(self) -> None:
        """Copy everything staged since :meth:`begin` to the device (one async copy).

        If the batch outgrew the buffers, they are reallocated first (the epoch changes) and
        the views handed out are rebuilt by the caller: :meth:`flush` returns normally only
        when every view handed out in this forward is valid.
        """
        if not self.enabled:
            return
        if self._used > self._dev.numel():
            raise StagingOverflow(self._used)
        image, self._image = self._image, None
        if not self._pending and image is None:
            return
        host = self._host_np
        if image is not None:  # a restored snapshot's bytes, before its replaced arrays
            host[: image.shape[0]] = image
        for start, t in self._pending:
            n = t.numel() * t.element_size()
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret as int16
                t = t.view(torch.int16)
            host[start : start + n] = t.numpy().reshape(-1).view(np.uint8)
        self._dev[: self._used].copy_(self._host[: self._used], non_blocking=True)
        self._pending = []

    def grow(self, need: int) -> None:
        """Reallocate both buffers to hold at least ``need`` bytes."""
        cap = max(self._dev.numel(), 1)
        while cap < need:
            cap *= 2
        self._allocate(cap)


@dataclass(frozen=True)
class StageSnapshot:
    """A forward's staged arrays (see :meth:`Stager.snapshot`)."""

    layout: list[tuple[torch.dtype, tuple[int, ...]]]
    used: int
    pending: list[tuple[int, torch.Tensor]]  # (offset, host tensor)
    image: np.ndarray | None = None  # [used] uint8: the bytes flushed (Stager.with_image)


IMAGE_MAX_BYTES = 64 << 10
"""Largest stage whose bytes a snapshot keeps: below it the per-array copies cost more than
the one copy of the whole image (a one-request batch stages about a dozen small arrays)."""


class StagingOverflow(RuntimeError):
    """A batch staged more bytes than the buffers hold; grow and prepare again."""

    def __init__(self, need: int) -> None:
        super().__init__(f"staging needs {need} bytes")
        self.need = need


def _view(buf: torch.Tensor, start: int, like: torch.Tensor) -> torch.Tensor:
    """``buf[start:]`` read as ``like``'s dtype and shape (the bytes may not exist yet:
    a view past the end is made from a zero-size slice and checked in :meth:`Stager.flush`)."""
    n = like.numel() * like.element_size()
    if start + n > buf.numel():
        # Placeholder with the right metadata; flush() raises StagingOverflow before use.
        return torch.empty(like.shape, dtype=like.dtype, device=buf.device)
    return buf[start : start + n].view(like.dtype).view(like.shape)
