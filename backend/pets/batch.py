"""The batch contract: one packed, padding-free mixed-task batch.

The scheduler decides which sequences run together; :func:`build_batch` lays them out; every
op consumes this one layout and nothing else invents its own.

Layout (``B`` sequences, ``T`` tokens in all, ``S`` segments):

* sequences are ordered by task slot, so each task's tokens form one contiguous **segment**;
  tasks whose PET type computes the linear layers in full (a MaskBERT bit mask: ``X (W*M).T``
  in one product) come last, after every other task, and the shared GEMMs run over the first
  ``shared_rows`` tokens only;
* ``input_ids``/``positions`` are flat ``[T]``; ``cu_seqlens`` ``[B + 1]`` bounds sequences;
* ``token_types`` ``[T]`` (segment A = 0, B = 1 of sentence pairs) only when some sequence
  has a nonzero type; None means every token is type 0;
* ``seg_indptr`` ``[S + 1]`` bounds segments; ``seg_task`` ``[S]`` names each segment's task;
* ``order[j]`` is the caller's index of the j-th sequence, so results go back in request order.

Small index arrays are kept on the host (``*_cpu``) too: PET modules build their per-batch
item lists from them with vectorised host code and never synchronise with the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [T] int64, device
    positions: torch.Tensor  # [T] int64, device
    cu_seqlens: torch.Tensor  # [B + 1] int32, device
    max_seqlen: int
    seq_task_cpu: torch.Tensor  # [B] int64, host: task slot per sequence (sorted)
    seg_indptr: torch.Tensor  # [S + 1] int32, device
    seg_indptr_cpu: torch.Tensor  # [S + 1] int32, host
    seg_task_cpu: torch.Tensor  # [S] int64, host
    seq_segment_cpu: torch.Tensor  # [B] int64, host: segment of each sequence
    cu_seqlens_cpu: torch.Tensor  # [B + 1] int64, host
    order: np.ndarray  # [B] int64: caller index of each batch row
    shared_rows: int  # the first tokens, which take the shared GEMMs (all but the tail's)
    valid_lens: torch.Tensor | None = None  # [B] int64, device: set on the padded path only
    valid_lens_cpu: torch.Tensor | None = None  # [B] int64, host: the same
    token_types: torch.Tensor | None = None  # [T] int64, device: None = all type 0

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.order.shape[0])

    @property
    def num_segments(self) -> int:
        return int(self.seg_task_cpu.shape[0])


def has_token_types(types: Sequence[np.ndarray | None] | None) -> bool:
    """Whether any sequence has a nonzero token type (else the batch stages none)."""
    return types is not None and any(t is not None and np.any(t) for t in types)


def flat_token_types(
    ids: Sequence[np.ndarray], types: Sequence[np.ndarray | None], order: np.ndarray
) -> np.ndarray:
    """The token types of the sequences in batch ``order``, flat ``[T]`` int64 (a sequence
    without types is all 0)."""
    return np.concatenate(
        [
            np.zeros(len(ids[i]), np.int64) if (t := types[i]) is None else np.asarray(t, np.int64)
            for i in order
        ]
    )


def pad_rows(real: np.ndarray, valid: np.ndarray, pad_to: int) -> np.ndarray:
    """Sequences stored back to back, each padded with 0 to ``pad_to``.

    Args:
        real: ``[sum(valid)]`` the sequences' values, one after another.
        valid: ``[B]`` int64 their lengths (each <= ``pad_to``).
        pad_to: the padded length.

    Returns:
        ``[B * pad_to]`` of ``real``'s dtype: sequence ``b`` at ``b * pad_to`` (``real``
        itself when every sequence is ``pad_to`` long).
    """
    if real.shape[0] == len(valid) * pad_to:  # every sequence full: already in place
        return real
    if len(valid) == 1:  # one request, the common padded batch: skip the index arithmetic
        flat = np.zeros(pad_to, dtype=real.dtype)
        flat[: real.shape[0]] = real
        return flat
    starts = np.cumsum(valid) - valid  # of each sequence in `real`
    dest = np.repeat(np.arange(len(valid)) * pad_to - starts, valid) + np.arange(real.shape[0])
    flat = np.zeros(len(valid) * pad_to, dtype=real.dtype)
    flat[dest] = real
    return flat


def build_batch(
    ids: Sequence[np.ndarray],
    task_slots: Sequence[int] | np.ndarray,
    device: torch.device,
    pad_to: int = 0,
    upload: Callable[[torch.Tensor], torch.Tensor] | None = None,
    types: Sequence[np.ndarray | None] | None = None,
    owns_linear: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Batch:
    """Pack sequences into a :class:`Batch`, grouped by task.

    Args:
        ids: ``B`` 1-D int arrays of token ids (any lengths >= 1).
        task_slots: ``[B]`` task slot of each sequence.
        device: where the device-side tensors go.
        pad_to: 0 for the padding-free layout; else every sequence is padded with token 0
            to this length (PetS's padded batches: pads cost compute in every shared and
            shadow op but are masked out of attention and pooling, so outputs are unchanged).
        upload: host tensor -> device tensor for the device-side arrays; default
            ``tensor.to(device, non_blocking=True)``. The engine passes its
            :class:`~pets.staging.Stager` so the batch crosses in one copy.
        types: per sequence, its token type ids (same length as its ids) or None (all 0).
            Staged right after ``input_ids`` (staged array 1), so a reused layout can
            replace both.
        owns_linear: task slots ``[n]`` -> bool ``[n]``: which tasks compute the linear
            layers in full (``SlotTable.owns_linear``). Their sequences go last and the
            batch's ``shared_rows`` stops before them. Give it whenever such tasks may be in
            the batch: the encoder refuses a batch that holds them elsewhere.
    """
    if upload is None:

        def upload(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

    slots = np.asarray(task_slots, dtype=np.int64)
    own = owns_linear(slots) if owns_linear is not None and len(slots) else None
    if own is not None and own.any():  # by (owns the linears, slot): theirs last
        order = np.lexsort((slots, own))
    else:
        own = None
        order = np.argsort(slots, kind="stable")
    valid = np.fromiter((len(ids[i]) for i in order), dtype=np.int64, count=len(order))
    if pad_to and len(valid) and valid.max() > pad_to:
        raise ValueError(f"pad_to={pad_to} is shorter than a sequence of {valid.max()} tokens")
    real = (
        np.concatenate([np.asarray(ids[i], dtype=np.int64) for i in order])
        if len(order)
        else np.zeros(0, dtype=np.int64)
    )
    if pad_to:
        lengths, flat = np.full_like(valid, pad_to), pad_rows(real, valid, pad_to)
    else:
        lengths, flat = valid, real
    cu = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    positions = np.arange(cu[-1], dtype=np.int64) - np.repeat(cu[:-1], lengths)

    sorted_slots = slots[order]
    starts = (
        np.flatnonzero(np.r_[True, sorted_slots[1:] != sorted_slots[:-1]])
        if len(order)
        else np.zeros(0, dtype=np.int64)
    )
    seg_task = sorted_slots[starts]
    seg_indptr = np.r_[cu[starts], cu[-1]].astype(np.int32)
    seq_segment = (
        np.cumsum(np.r_[True, sorted_slots[1:] != sorted_slots[:-1]]) - 1
        if len(order)
        else np.zeros(0, dtype=np.int64)
    )

    seg_indptr_cpu = torch.from_numpy(seg_indptr)
    input_ids = upload(torch.from_numpy(flat))  # staged first: the engine restages it
    token_types = None
    if types is not None and has_token_types(types):
        real_t = flat_token_types(ids, types, order)
        flat_t = pad_rows(real_t, valid, pad_to) if pad_to else real_t
        token_types = upload(torch.from_numpy(flat_t))  # staged second
    # the padded layout's valid lengths next (the engine restages them for another length)
    valid_cpu = torch.from_numpy(valid) if pad_to else None
    valid_lens = upload(valid_cpu) if valid_cpu is not None else None
    return Batch(
        input_ids=input_ids,
        positions=upload(torch.from_numpy(positions)),
        cu_seqlens=upload(torch.from_numpy(cu.astype(np.int32))),
        max_seqlen=int(lengths.max()) if len(lengths) else 0,
        seq_task_cpu=torch.from_numpy(sorted_slots),
        seg_indptr=upload(seg_indptr_cpu),
        seg_indptr_cpu=seg_indptr_cpu,
        seg_task_cpu=torch.from_numpy(seg_task.astype(np.int64)),
        seq_segment_cpu=torch.from_numpy(seq_segment.astype(np.int64)),
        cu_seqlens_cpu=torch.from_numpy(cu),
        order=order,
        shared_rows=int(cu[-1]) if own is None else int(cu[int(np.count_nonzero(~own))]),
        valid_lens=valid_lens,
        valid_lens_cpu=valid_cpu,
        token_types=token_types,
    )
