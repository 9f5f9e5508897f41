"""petops tests: reference vs loop oracle, compiled kernels vs reference, opcheck, wrappers.

Every check draws from the same ``op_samples.SAMPLES[op](device, dtype)`` generators. Compiled
checks skip (with the reason) only when ``build/out/libpetops.so`` is not built; CUDA variants
skip with "requires cuda".
"""

from __future__ import annotations

import op_oracle
import pytest
import torch
from op_samples import DEVICES, DTYPES, INPLACE, SAMPLES, TOL

import petops
from petops import ops
from petops import reference as ref

OPS = tuple(SAMPLES)

requires_compiled = pytest.mark.skipif(
    not petops.compiled_available(), reason=f"petops library not built: {petops.backend_name()}"
)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Per-dtype tolerances: 16-bit results may differ by an ulp or two of the rounding."""
    rtol, atol = TOL[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _clone(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _run(fn, op: str, args: tuple) -> torch.Tensor:
    """Call ``fn`` on a private copy of ``args``; return its output (or mutated ``y``)."""
    args = _clone(args)
    out = fn(*args)
    return args[0] if op in INPLACE else out


def _need_kernel(device: str) -> None:
    if device not in petops.compiled_devices():
        pytest.skip(f"libpetops.so has no {device} kernels ({petops.backend_name()})")


# ---- the spec: vectorised reference vs dumb loops ----


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("op", OPS)
def test_reference_matches_loop_oracle(op: str, dtype: torch.dtype) -> None:
    for name, args in SAMPLES[op]("cpu", dtype):
        expected = _run(getattr(op_oracle, op), op, args)
        assert_close(_run(getattr(ref, op), op, args), expected, f"{op}[{name}]")


# ---- compiled kernels vs reference ----


@requires_compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_compiled_matches_reference(op: str, dtype: torch.dtype, device: str) -> None:
    _need_kernel(device)
    compiled = getattr(torch.ops.petops, op).default
    for name, args in SAMPLES[op](device, dtype):
        expected = _run(getattr(ref, op), op, args)
        assert_close(_run(compiled, op, args), expected, f"{op}[{name}] on {device}")


@requires_compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op: str, device: str) -> None:
    _need_kernel(device)
    for dtype in DTYPES:
        samples = list(SAMPLES[op](device, dtype))
        # every layout in float32; a few in 16-bit (opcheck is slow: it traces per sample)
        for _, args in samples if dtype == torch.float32 else samples[::4]:
            torch.library.opcheck(getattr(torch.ops.petops, op).default, _clone(args))


@requires_compiled
@pytest.mark.parametrize("device", DEVICES)
def test_current_stream_is_used(device: str) -> None:
    """Kernels enqueue on the caller's stream: work on a side stream is ordered correctly."""
    _need_kernel(device)
    if device != "cuda":
        pytest.skip("streams are CUDA-only")
    name, args = next(iter(SAMPLES["sgmv_shrink"]("cuda", torch.float16)))
    expected = _run(ref.sgmv_shrink, "sgmv_shrink", args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = torch.ops.petops.sgmv_shrink.default(*args)
        out = out * 1  # consumer on the same stream
    torch.cuda.current_stream().wait_stream(side)
    assert_close(out, expected, f"sgmv_shrink[{name}] on a side stream")


# ---- wrappers ----


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_wrappers_match_reference(op: str, device: str) -> None:
    """petops.ops runs the compiled kernel where the library has one for the device, else the
    reference; either way it computes the reference's result."""
    name, args = next(iter(SAMPLES[op](device, torch.float32)))
    expected = _run(getattr(ref, op), op, args)
    assert_close(_run(getattr(ops, op), op, args), expected, f"ops.{op}[{name}] on {device}")


def test_backend_name_says_what_is_loaded() -> None:
    name = petops.backend_name()
    if petops.compiled_available():
        assert name == f"compiled[{','.join(petops.compiled_devices())}]"
    else:
        assert name.startswith("reference (") and str(petops.LIBRARY) in name
    assert ops.backend_description() == name


# ---- input validation in the compiled kernels ----


@requires_compiled
def test_compiled_errors_name_value_and_fix() -> None:
    _, args = next(iter(SAMPLES["bias_act"]("cpu", torch.float32)))
    y, bias, indptr, seg_bias, scale, seg_scale, act = args
    op = torch.ops.petops.bias_act.default
    with pytest.raises(RuntimeError, match="bias must have the dtype of y"):
        op(y, bias.half(), indptr, seg_bias, scale, seg_scale, act)
    with pytest.raises(RuntimeError, match=r"act must be an ACT_\* code"):
        op(y, bias, indptr, seg_bias, scale, seg_scale, 9)
    bad = indptr.clone()
    bad[-1] += 1
    with pytest.raises(RuntimeError, match=r"seg_indptr\[-1\] must equal the token count"):
        op(y, bias, bad, seg_bias, scale, seg_scale, act)
    with pytest.raises(RuntimeError, match=r"seg_bias\[0\]=7 is out of range"):
        op(y, bias, indptr, torch.full_like(seg_bias, 7), scale, seg_scale, act)
    with pytest.raises(RuntimeError, match=r"must be a 2-D tensor .*got shape \[\d+\]"):
        op(y[0], bias, indptr, seg_bias, scale, seg_scale, act)
    _, sargs = next(iter(SAMPLES["sgmv_shrink"]("cpu", torch.float32)))
    with pytest.raises(RuntimeError, match=r"item_rank\[0\]=.* out of range"):
        torch.ops.petops.sgmv_shrink.default(*sargs[:-1], 0)
    _, margs = next(iter(SAMPLES["seg_masked_mm"]("cpu", torch.float32)))
    y, x, indptr, item_seg, item_off, mask, w, alpha = margs
    op = torch.ops.petops.seg_masked_mm.default
    with pytest.raises(RuntimeError, match=r"mask must be an int32 pool .*view\(torch.int32\)"):
        op(y, x, indptr, item_seg, item_off, mask.long(), w, alpha)
    with pytest.raises(RuntimeError, match=r"dense_w must be \[N, K\]"):
        op(y, x, indptr, item_seg, item_off, mask, w.t(), alpha)
    with pytest.raises(RuntimeError, match=r"item_mask_off\[0\]=.* overruns|needs N \* ceil"):
        op(y, x, indptr, item_seg, torch.full_like(item_off, mask.numel()), mask, w, alpha)
    with pytest.raises(RuntimeError, match=r"pass -1 for an item without a mask"):
        op(y, x, indptr, item_seg, torch.full_like(item_off, -2), mask, w, alpha)
    _, spargs = next(iter(SAMPLES["seg_spmm"]("cpu", torch.float32)))
    y, x, indptr, item_seg, item_off, slice_ptr, indices, values = spargs
    op = torch.ops.petops.seg_spmm.default
    with pytest.raises(RuntimeError, match=r"indices must be an int16 tensor .*pack_sliced_ell"):
        op(y, x, indptr, item_seg, item_off, slice_ptr, indices.int(), values)
    ragged = slice_ptr.clone()
    ragged[int(item_off[0]) + 1] += 1  # the item's first slice no longer a multiple of 32
    with pytest.raises(RuntimeError, match=r"slice 0 spans .*multiple of 32 entries"):
        op(y, x, indptr, item_seg, item_off, ragged, indices, values)
    wild = indices.clone()
    wild[int(slice_ptr[int(item_off[0])])] = x.shape[1] + 1
    with pytest.raises(RuntimeError, match=r"out of range; expected an input column in .* padding"):
        op(y, x, indptr, item_seg, item_off, slice_ptr, wild, values)
    wide = torch.zeros(x.shape[0], 1 << 15)
    with pytest.raises(RuntimeError, match=r"input width K=32768 exceeds 32767"):
        op(y, wide, indptr, item_seg, item_off, slice_ptr, indices, values)
