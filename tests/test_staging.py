"""The Stager packs a forward's host arrays into one buffer (CPU stand-in for the device)."""

from __future__ import annotations

import pytest
import torch

from pets.staging import IMAGE_MAX_BYTES, Stager, StagingOverflow


def _stager(capacity: int = 256) -> Stager:
    return Stager(torch.device("cpu"), capacity=capacity, enabled=True)


def test_views_hold_the_values_after_flush_and_are_aligned() -> None:
    st = _stager()
    st.begin()
    a = torch.arange(5, dtype=torch.int32)
    b = torch.tensor([[1.5, -2.0], [3.25, 4.0]])
    c = torch.tensor([True, False, True])
    va, vb, vc = st.put(a), st.put(b), st.put(c)
    st.flush()
    assert torch.equal(va, a) and torch.equal(vb, b) and torch.equal(vc, c)
    base = st.device_buffer.data_ptr()
    assert [(v.data_ptr() - base) % 16 for v in (va, vb, vc)] == [0, 0, 0]
    assert st.layout == [(torch.int32, (5,)), (torch.float32, (2, 2)), (torch.bool, (3,))]


def test_the_same_layout_gives_the_same_addresses() -> None:
    st = _stager()
    ptrs = []
    for seed in range(2):
        st.begin()
        views = [st.put(torch.full((4,), seed)), st.put(torch.zeros(3, 2, dtype=torch.int64))]
        st.flush()
        ptrs.append([v.data_ptr() for v in views])
    assert ptrs[0] == ptrs[1]


def test_restore_restages_new_values_at_the_old_views() -> None:
    st = _stager()
    st.begin()
    ids = st.put(torch.tensor([1, 2, 3]))
    rows = st.put(torch.tensor([7, 8], dtype=torch.int32))
    snap = st.snapshot()
    st.flush()
    st.begin()
    st.put(torch.ones(40))  # another batch overwrites the buffer
    st.flush()
    st.restore(snap, {0: torch.tensor([4, 5, 6])})
    st.flush()
    assert ids.tolist() == [4, 5, 6] and rows.tolist() == [7, 8]
    with pytest.raises(ValueError, match="only takes new values"):
        st.restore(snap, {0: torch.tensor([1, 2])})


def test_a_snapshot_with_its_image_restores_in_one_copy() -> None:
    """The image holds the bytes the first flush wrote; restoring writes them back, then the
    replaced arrays on top (an unreplaced array keeps its first values, even though another
    batch overwrote the buffer in between)."""
    st = _stager()
    st.begin()
    ids = st.put(torch.tensor([1, 2, 3]))
    rows = st.put(torch.tensor([7, 8], dtype=torch.int32))
    lens = st.put(torch.tensor([3]))
    snap = st.snapshot()
    st.flush()
    snap = st.with_image(snap)
    assert snap.image is not None and snap.image.shape[0] == snap.used
    st.begin()
    st.put(torch.full((40,), 9.0))  # another batch overwrites the buffer
    st.flush()
    st.restore(snap, {0: torch.tensor([4, 5, 6]), 2: torch.tensor([2])})
    st.flush()
    assert ids.tolist() == [4, 5, 6] and rows.tolist() == [7, 8] and lens.tolist() == [2]
    big = _stager(capacity=1 << 20)
    big.begin()
    big.put(torch.zeros(IMAGE_MAX_BYTES // 4 + 1))
    many = big.snapshot()
    big.flush()
    assert big.with_image(many).image is None  # a big stage keeps no image


def test_overflow_is_reported_then_grown() -> None:
    st = _stager(capacity=32)
    st.begin()
    st.put(torch.zeros(16))  # 64 bytes
    with pytest.raises(StagingOverflow) as err:
        st.flush()
    epoch = st.epoch
    st.grow(err.value.need)
    assert st.nbytes >= 64 and st.epoch == epoch + 1
    st.begin()
    v = st.put(torch.arange(16.0))
    st.flush()
    assert torch.equal(v, torch.arange(16.0))


def test_a_cpu_stager_is_the_identity() -> None:
    st = Stager(torch.device("cpu"))
    t = torch.arange(3)
    st.begin()
    assert st.put(t) is t and st.layout == []
    st.flush()
