"""The batch contract (``pets.batch.build_batch``) checked directly, with exact arrays.

Every op and every PET module reads this one layout, so its fields are pinned here by hand:
sequences grouped by task slot into contiguous segments, ``order`` back to the caller's
indices, and PetS's padded variant. CPU only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pets.batch import build_batch, pad_rows

CPU = torch.device("cpu")


def _ids(*seqs: list[int]) -> list[np.ndarray]:
    return [np.asarray(s, dtype=np.int64) for s in seqs]


def _assert_tensor(actual: torch.Tensor, expected: list[int], dtype: torch.dtype) -> None:
    assert actual.dtype == dtype, f"dtype {actual.dtype}, expected {dtype}"
    assert actual.tolist() == expected


# Five sequences of tasks 3, 1, 3, 2, 1 (caller order), of lengths 2, 3, 1, 4, 2.
INTERLEAVED = _ids([11, 12], [21, 22, 23], [31], [41, 42, 43, 44], [51, 52])
INTERLEAVED_SLOTS = [3, 1, 3, 2, 1]


def test_empty_batch() -> None:
    b = build_batch([], [], CPU)
    assert (b.num_seqs, b.num_tokens, b.num_segments, b.max_seqlen) == (0, 0, 0, 0)
    _assert_tensor(b.input_ids, [], torch.int64)
    _assert_tensor(b.positions, [], torch.int64)
    _assert_tensor(b.cu_seqlens, [0], torch.int32)
    _assert_tensor(b.cu_seqlens_cpu, [0], torch.int64)
    _assert_tensor(b.seg_indptr, [0], torch.int32)
    _assert_tensor(b.seg_indptr_cpu, [0], torch.int32)
    _assert_tensor(b.seg_task_cpu, [], torch.int64)
    _assert_tensor(b.seq_task_cpu, [], torch.int64)
    _assert_tensor(b.seq_segment_cpu, [], torch.int64)
    assert b.order.tolist() == []
    assert b.valid_lens is None


def test_one_sequence() -> None:
    b = build_batch(_ids([101, 7592, 102]), [5], CPU)
    assert (b.num_seqs, b.num_tokens, b.num_segments, b.max_seqlen) == (1, 3, 1, 3)
    _assert_tensor(b.input_ids, [101, 7592, 102], torch.int64)
    _assert_tensor(b.positions, [0, 1, 2], torch.int64)
    _assert_tensor(b.cu_seqlens, [0, 3], torch.int32)
    _assert_tensor(b.seg_indptr, [0, 3], torch.int32)
    _assert_tensor(b.seg_task_cpu, [5], torch.int64)
    _assert_tensor(b.seq_task_cpu, [5], torch.int64)
    _assert_tensor(b.seq_segment_cpu, [0], torch.int64)
    assert b.order.tolist() == [0]
    assert b.valid_lens is None


def test_interleaved_tasks_form_contiguous_segments_in_slot_order() -> None:
    b = build_batch(INTERLEAVED, INTERLEAVED_SLOTS, CPU)
    # Slot 1 (callers 1, 4), then slot 2 (caller 3), then slot 3 (callers 0, 2).
    assert b.order.tolist() == [1, 4, 3, 0, 2]
    assert b.order.dtype == np.int64
    _assert_tensor(b.seq_task_cpu, [1, 1, 2, 3, 3], torch.int64)
    _assert_tensor(b.input_ids, [21, 22, 23, 51, 52, 41, 42, 43, 44, 11, 12, 31], torch.int64)
    _assert_tensor(b.positions, [0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 0], torch.int64)
    _assert_tensor(b.cu_seqlens, [0, 3, 5, 9, 11, 12], torch.int32)
    _assert_tensor(b.cu_seqlens_cpu, [0, 3, 5, 9, 11, 12], torch.int64)
    _assert_tensor(b.seg_indptr, [0, 5, 9, 12], torch.int32)
    _assert_tensor(b.seg_indptr_cpu, [0, 5, 9, 12], torch.int32)
    _assert_tensor(b.seg_task_cpu, [1, 2, 3], torch.int64)
    _assert_tensor(b.seq_segment_cpu, [0, 0, 1, 2, 2], torch.int64)
    assert (b.num_seqs, b.num_tokens, b.num_segments, b.max_seqlen) == (5, 12, 3, 4)
    assert b.valid_lens is None


def test_order_maps_rows_back_to_callers() -> None:
    b = build_batch(INTERLEAVED, np.asarray(INTERLEAVED_SLOTS), CPU)
    cu = b.cu_seqlens_cpu.tolist()
    for row, caller in enumerate(b.order.tolist()):
        assert b.input_ids[cu[row] : cu[row + 1]].tolist() == INTERLEAVED[caller].tolist()
        assert int(b.seq_task_cpu[row]) == INTERLEAVED_SLOTS[caller]


def test_order_within_a_task_is_stable() -> None:
    # 30 sequences of slots 2, 1, 0, 2, 1, 0, ...: an unstable sort reorders 24 of them.
    slots = [2, 1, 0] * 10
    ids = [np.asarray([100 + i], dtype=np.int64) for i in range(30)]
    b = build_batch(ids, slots, CPU)
    expected = [*range(2, 30, 3), *range(1, 30, 3), *range(0, 30, 3)]
    assert b.order.tolist() == expected
    _assert_tensor(b.input_ids, [100 + i for i in expected], torch.int64)
    _assert_tensor(b.seg_task_cpu, [0, 1, 2], torch.int64)
    _assert_tensor(b.seg_indptr, [0, 10, 20, 30], torch.int32)


def test_pad_to_zero_pads_each_sequence() -> None:
    b = build_batch(INTERLEAVED, INTERLEAVED_SLOTS, CPU, pad_to=4)
    assert b.order.tolist() == [1, 4, 3, 0, 2]
    # Each row is 4 tokens: the sequence, then token 0.
    _assert_tensor(
        b.input_ids,
        [21, 22, 23, 0, 51, 52, 0, 0, 41, 42, 43, 44, 11, 12, 0, 0, 31, 0, 0, 0],
        torch.int64,
    )
    _assert_tensor(b.positions, [0, 1, 2, 3] * 5, torch.int64)
    _assert_tensor(b.cu_seqlens, [0, 4, 8, 12, 16, 20], torch.int32)
    _assert_tensor(b.seg_indptr, [0, 8, 12, 20], torch.int32)
    _assert_tensor(b.seg_task_cpu, [1, 2, 3], torch.int64)
    _assert_tensor(b.seq_segment_cpu, [0, 0, 1, 2, 2], torch.int64)
    assert b.valid_lens is not None
    _assert_tensor(b.valid_lens, [3, 2, 4, 2, 1], torch.int64)
    assert (b.num_seqs, b.num_tokens, b.num_segments, b.max_seqlen) == (5, 20, 3, 4)


def test_pad_to_longer_than_every_sequence() -> None:
    b = build_batch(_ids([7, 8], [9]), [0, 0], CPU, pad_to=6)
    _assert_tensor(b.input_ids, [7, 8, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0], torch.int64)
    _assert_tensor(b.cu_seqlens, [0, 6, 12], torch.int32)
    _assert_tensor(b.seg_indptr, [0, 12], torch.int32)
    assert b.valid_lens is not None
    _assert_tensor(b.valid_lens, [2, 1], torch.int64)
    assert b.max_seqlen == 6


def test_pad_to_shorter_than_a_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^pad_to=3 is shorter than a sequence of 4 tokens$"):
        build_batch(INTERLEAVED, INTERLEAVED_SLOTS, CPU, pad_to=3)


@pytest.mark.parametrize("lengths", [[5], [16], [1], [3, 16, 7], [16, 16], [2, 9, 16, 1]], ids=str)
def test_pad_rows_places_each_sequence_at_its_slot(lengths: list[int]) -> None:
    """pad_rows (the reused padded batch's token ids) against a per-sequence copy, on the
    general path and the shortcuts for one sequence and for sequences without pads."""
    pad_to = 16
    rng = np.random.default_rng(len(lengths))
    seqs = [rng.integers(1, 1000, size=n) for n in lengths]
    want = np.zeros(len(seqs) * pad_to, dtype=np.int64)
    for b, seq in enumerate(seqs):
        want[b * pad_to : b * pad_to + len(seq)] = seq
    got = pad_rows(np.concatenate(seqs), np.array(lengths, dtype=np.int64), pad_to)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
