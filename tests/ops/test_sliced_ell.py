"""The sliced-ELL layout of ``seg_spmm``: ``pack_sliced_ell`` against the layout's definition.

The op tests (test_ops.py) feed the kernels matrices built entry by entry in op_samples; here
the packer the engine uses at registration is checked against the same definition: every
non-zero lands once, in its row's lane of its slice, slices as wide as their longest row, and
the rest is padding (index ``K``, value 0).
"""

from __future__ import annotations

import pytest
import torch

from petops.reference import SPMM_SLICE, pack_sliced_ell, sliced_entries, spmm_slices


def unpack(sp: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, n: int, k: int):
    """Dense ``[n, k]`` from the layout by its definition (loops), and the padding count."""
    dense, padding = torch.zeros(n, k), 0
    for o in range(n):
        s, lane = divmod(o, SPMM_SLICE)
        for p in range(int(sp[s]) + lane, int(sp[s + 1]), SPMM_SLICE):
            if int(idx[p]) == k:
                padding += 1
                assert float(vals[p]) == 0.0
                continue
            assert dense[o, int(idx[p])] == 0, "a non-zero stored twice"
            dense[o, int(idx[p])] = vals[p]
    return dense, padding


@pytest.mark.parametrize(("n", "k", "density"), [(48, 40, 0.1), (64, 70, 0.03), (5, 9, 0.5)])
def test_pack_sliced_ell_holds_every_nonzero_once(n: int, k: int, density: float) -> None:
    g = torch.Generator().manual_seed(n * k)
    mask = torch.rand(n, k, generator=g) < density
    mask[1] = False  # an empty row
    want = torch.where(mask, torch.randn(n, k, generator=g), torch.zeros(()))
    rows, cols = mask.nonzero().unbind(1)
    perm = torch.randperm(rows.numel(), generator=g)  # any order in, same layout out
    sp, idx, vals = pack_sliced_ell(rows[perm], cols[perm], want[rows, cols][perm], n, k)
    assert vals is not None
    assert sp.dtype == torch.int64 and idx.dtype == torch.int16
    assert sp.numel() == spmm_slices(n) + 1 and int(sp[0]) == 0 and int(sp[-1]) == idx.numel()
    counts = torch.zeros(spmm_slices(n) * SPMM_SLICE, dtype=torch.int64)
    counts[:n] = mask.sum(1)
    width = counts.view(-1, SPMM_SLICE).amax(1)
    assert torch.equal(sp.diff(), width * SPMM_SLICE)  # each slice as wide as its longest row
    got, padding = unpack(sp, idx, vals, n, k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert padding + rows.numel() <= idx.numel()
    assert int((idx == k).sum()) == idx.numel() - rows.numel()  # the rest is padding
    assert int(vals[idx == k].abs().sum()) == 0
    assert idx.numel() == int(sliced_entries(mask.sum(1)))  # the size read before packing
    args = (rows[perm], cols[perm], want[rows, cols][perm], n, k)
    sp2, idx2, _ = pack_sliced_ell(*args, n_entries=idx.numel())
    assert torch.equal(sp2, sp) and torch.equal(idx2, idx)  # the same layout, given the size


def test_pack_sliced_ell_index_set_and_empty() -> None:
    """Without values (a MaskBERT index set) only indices come back; no non-zeros at all is
    a matrix of empty slices."""
    rows = torch.tensor([0, 33, 33])
    cols = torch.tensor([2, 0, 5])
    sp, idx, vals = pack_sliced_ell(rows, cols, None, 40, 6)
    assert vals is None
    assert sp.tolist() == [0, 32, 96]
    assert idx[0] == 2 and (idx[1:32] == 6).all()  # slice 0: row 0's entry, the rest padding
    assert sorted(idx[32:96][idx[32:96] < 6].tolist()) == [0, 5]
    assert idx[32 + 1] in (0, 5) and idx[64 + 1] in (0, 5)  # row 33 = lane 1 of slice 1
    none = torch.zeros(0, dtype=torch.long)
    sp, idx, _ = pack_sliced_ell(none, none, None, 70, 8)
    assert sp.tolist() == [0, 0, 0, 0] and idx.numel() == 0


def test_pack_sliced_ell_refuses_inputs_past_int16() -> None:
    one = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"up to 32767 columns \(int16 indices\), got K=32768"):
        pack_sliced_ell(one, one, None, 4, 1 << 15)
