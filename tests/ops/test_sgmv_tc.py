"""sgmv_shrink / sgmv_expand shapes that reach every branch of the tensor-core kernels.

The CUDA float16/bfloat16 path (cuda/sgmv_tc.cuh) pads ranks to 16/32/64/128, tiles tokens by
64 and output columns by 128, and copies 16-byte groups only when an operand's offset, row
stride and K extent are multiples of 8 elements (else a scalar path). These cases cross ranks
that are not multiples of 16 (and not of 8) with rank 128, segments longer than one token tile,
empty segments, aligned and unaligned pool offsets, and y column blocks that do or don't start
on 8-element boundaries. They run on every built device (the CPU kernels too) against the
reference.
"""

from __future__ import annotations

import pytest
import torch
from op_samples import DEVICES, DTYPES, TOL, _i32, _i64, _indptr, _to

import petops
from petops import reference as ref

LENGTHS = [0, 1, 63, 64, 65, 130, 200, 7, 0, 33]  # 1..4 token tiles of 64, empty segments
RANKS_128 = [1, 5, 16, 17, 24, 40, 100, 127, 128, 72]  # max_rank 128: every rank class
RANKS_48 = [48, 3, 16, 33, 8, 47, 40, 1, 32, 17]  # max_rank 48: RN 16/32/64 under RNMAX 64

pytestmark = pytest.mark.skipif(
    not petops.compiled_available(), reason=f"petops library not built: {petops.backend_name()}"
)


def _need_kernel(device: str) -> None:
    if device not in petops.compiled_devices():
        pytest.skip(f"libpetops.so has no {device} kernels ({petops.backend_name()})")


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    rtol, atol = TOL[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _offsets(sizes: list[int], aligned: bool) -> tuple[int, list[int]]:
    """Offsets of consecutive blocks in a flat pool: multiples of 8 or deliberately odd."""
    offs, cur = [], 8 if aligned else 3
    for s in sizes:
        offs.append(cur)
        cur += s + (8 - s % 8 if aligned else 5)
    return cur, offs


SHRINK_CASES = [  # (k, ranks, max_rank, aligned pool offsets)
    (768, RANKS_128, 128, True),
    (768, RANKS_48, 48, True),
    (72, RANKS_128, 128, False),
    (100, RANKS_48, 48, True),  # K % 8 != 0: scalar copies of x and W
    (256, [16] * len(LENGTHS), 16, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(SHRINK_CASES)))
def test_sgmv_shrink_ranks(case: int, dtype: torch.dtype, device: str) -> None:
    _need_kernel(device)
    k, ranks, max_rank, aligned = SHRINK_CASES[case]
    g = torch.Generator().manual_seed(100 + case)
    n_w, w_off = _offsets([r * k for r in ranks], aligned)
    n_b, b_off = _offsets(ranks, aligned)
    w = torch.randn(n_w, generator=g) * k**-0.5
    bias = torch.randn(n_b, generator=g)
    segs = [s for s in range(len(LENGTHS)) if s != 3]  # segment 3 has no item: rows stay 0
    x = torch.randn(sum(LENGTHS), k, generator=g)
    for with_bias, act in ((False, 0), (True, 1), (True, 3)):
        args = _to(
            (
                x,
                w,
                _indptr(LENGTHS),
                _i32(segs),
                _i64([w_off[s] for s in segs]),
                _i32([ranks[s] for s in segs]),
                bias if with_bias else None,
                _i64([b_off[s] for s in segs]) if with_bias else None,
                act,
                max_rank,
            ),
            device,
            dtype,
        )
        out = torch.ops.petops.sgmv_shrink.default(*args)
        _close(out, ref.sgmv_shrink(*args), f"shrink k={k} bias={with_bias} act={act}")


EXPAND_CASES = [  # (ranks per task, [(out_off, out_dim)] per task, n_cols, aligned)
    ([128, 24, 17, 64, 1], [[(0, 768)], [(0, 256), (256, 256), (512, 256)]], 768, True),
    ([128, 24, 17, 64, 1], [[(0, 768)], [(0, 256), (256, 256), (512, 256)]], 768, False),
    ([40, 100, 8], [[(0, 100), (100, 100), (200, 100)], [(3, 290)]], 300, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(EXPAND_CASES)))
def test_sgmv_expand_ranks(case: int, dtype: torch.dtype, device: str) -> None:
    _need_kernel(device)
    rank_list, layouts, n_cols, aligned = EXPAND_CASES[case]
    g = torch.Generator().manual_seed(200 + case)
    stride = max(rank_list) if not aligned else (max(rank_list) + 7) // 8 * 8
    tmp_cols = 3 * stride + (0 if aligned else 1)
    cols: dict[str, list[int]] = {key: [] for key in ("seg", "r", "j0", "c0", "n", "wsz", "bsz")}
    for s in range(len(LENGTHS)):
        if s == 3:
            continue  # a segment without items: y unchanged
        r = rank_list[s % len(rank_list)]
        for j, (c0, n) in enumerate(layouts[s % len(layouts)]):
            cols["seg"].append(s)
            cols["r"].append(r)
            cols["j0"].append(j * stride if aligned else j * r + 1)
            cols["c0"].append(c0)
            cols["n"].append(n)
            cols["wsz"].append(n * r)
            cols["bsz"].append(n)
    n_w, w_off = _offsets(cols["wsz"], aligned)
    n_b, b_off = _offsets(cols["bsz"], aligned)
    t_tok = sum(LENGTHS)
    w = torch.randn(n_w, generator=g) * 0.3
    bias = torch.randn(n_b, generator=g)
    scale = torch.rand(len(cols["seg"]), generator=g) * 2
    y = torch.randn(t_tok, n_cols, generator=g)
    tmp = torch.randn(t_tok, tmp_cols, generator=g)
    for with_bias in (False, True):
        args = _to(
            (
                y,
                tmp,
                w,
                _indptr(LENGTHS),
                _i32(cols["seg"]),
                _i64(w_off),
                _i32(cols["r"]),
                _i32(cols["j0"]),
                _i32(cols["c0"]),
                _i32(cols["n"]),
                scale,
                bias if with_bias else None,
                _i64(b_off) if with_bias else None,
            ),
            device,
            dtype,
            keep=(10,),
        )
        expected = args[0].clone()
        ref.sgmv_expand(expected, *args[1:])
        actual = args[0].clone()
        torch.ops.petops.sgmv_expand.default(actual, *args[1:])
        _close(actual, expected, f"expand case={case} bias={with_bias}")
