"""Which CUDA kernel each op runs: chosen from the dtype, the shapes, the segment count and the
GPU, never from the environment. Every kernel in ``cuda_ops/csrc/cuda`` is reached here by
inputs that make the dispatch choose it, seen in the profiler's kernel names and checked
against the reference. On a GPU before sm_80 the tensor-core rows expect the CUDA-core kernels.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from op_samples import HAS_CUDA, INPLACE, SAMPLES, TOL, _to, adapter_args
from torch.profiler import ProfilerActivity, profile

import petops
from petops import reference as ref

CUDA_SOURCES = Path(__file__).resolve().parents[2] / "cuda_ops" / "csrc" / "cuda"
needs_cuda_kernels = pytest.mark.skipif(
    not (HAS_CUDA and petops.compiled_available()),
    reason=f"requires cuda and the petops library ({petops.backend_name()})",
)
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _width(pos: int, n: int) -> Callable[[tuple], bool]:
    """Picks the sample whose argument ``pos`` has ``n`` columns."""
    return lambda args: args[pos].shape[1] == n


def _first(args: tuple) -> bool:
    return True


# (op, dtype, which op_samples sample, kernel on sm_80+, kernel before sm_80 where different).
# Kernel names as the profiler prints them: at:: element types as c10::Half / c10::BFloat16,
# the tensor-core kernels' as __half / __nv_bfloat16.
SAMPLE_CASES = [
    ("bias_act", F16, _width(0, 64), "bias_act_kernel<c10::Half, true>", None),
    ("bias_act", F32, _width(0, 50), "bias_act_kernel<float, false>", None),
    ("bias_residual_layernorm", F32, _width(0, 48),
     "bias_residual_layernorm_vec_kernel<float, 1>", None),
    ("bias_residual_layernorm", F16, _width(0, 384),
     "bias_residual_layernorm_vec_kernel<c10::Half, 2>", None),
    ("bias_residual_layernorm", F16, _width(0, 1024),
     "bias_residual_layernorm_vec_kernel<c10::Half, 4>", None),
    ("bias_residual_layernorm", F32, _width(0, 1024),
     "bias_residual_layernorm_vec_kernel<float, 8>", None),
    ("bias_residual_layernorm", BF16, _width(0, 50),
     "bias_residual_layernorm_kernel<c10::BFloat16>", None),  # ragged rows
    ("bias_residual_layernorm", F16, _width(0, 2056),
     "bias_residual_layernorm_kernel<c10::Half>", None),  # too wide for registers
    ("sgmv_shrink", F16, _first, "sgmv_shrink_tc_kernel<__half, 64>",
     "sgmv_shrink_kernel<c10::Half>"),
    ("sgmv_shrink", F32, _first, "sgmv_shrink_kernel<float>", None),
    ("sgmv_expand", BF16, _first, "sgmv_expand_tc_kernel<__nv_bfloat16>",
     "sgmv_expand_kernel<c10::BFloat16>"),
    ("sgmv_expand", F32, _first, "sgmv_expand_kernel<float>", None),
    ("seg_spmm", F16, _width(1, 72), "seg_spmm_lanes_kernel<c10::Half, 32, 2>", None),
    ("seg_spmm", BF16, _width(1, 1024), "seg_spmm_lanes_kernel<c10::BFloat16, 32, 1>", None),
    ("seg_spmm", F16, _width(1, 1600), "seg_spmm_lanes_kernel<c10::Half, 16, 1>", None),
    ("seg_spmm", F32, _width(1, 72), "seg_spmm_kernel<float, 16>", None),
    ("seg_spmm", F16, _width(1, 3200), "seg_spmm_kernel<c10::Half, 8>", None),
    ("seg_spmm", F32, _width(1, 3200), "seg_spmm_kernel<float, 4>", None),
    ("seg_spmm", F16, _width(1, 8192), "seg_spmm_kernel<c10::Half, 4>", None),  # element-wise
    ("seg_spmm", F32, _width(1, 8192), "seg_spmm_kernel<float, 2>", None),  # element-wise
    ("seg_masked_mm", F16, _first, "seg_masked_mm_tc_kernel<__half>",
     "seg_masked_mm_kernel<c10::Half>"),
    ("seg_masked_mm", F32, _first, "seg_masked_mm_kernel<float>", None),
]  # fmt: skip


def _adapter(n: int, lengths: list[int], ranks: list[int], max_rank: int = 64) -> tuple:
    """adapter_residual_layernorm args (16-byte aligned pool): segment s runs task
    s % len(ranks)."""
    g = torch.Generator().manual_seed(n + len(lengths))
    seg = [s % len(ranks) for s in range(len(lengths))]
    acts = [ref.ACT_GELU, ref.ACT_RELU, ref.ACT_SILU, ref.ACT_GELU_TANH, ref.ACT_NONE]
    return adapter_args(lengths, seg, ranks, acts[: len(ranks)], n, max_rank, g, aligned=True)


# (case, dtype, args, kernel on sm_90+, on sm_80 where different, before sm_80 where different).
# One 17-token segment is two units by the dispatch's bound, fewer than the resident clusters
# of any sm_90 GPU; 300 segments are more than an H100 or H200 holds (132 SMs, two blocks
# each: at most 66 clusters of four).
ADAPTER_CASES = [
    ("one-segment", F16, lambda: _adapter(768, [17], [64]),
     "adapter_ln_cluster_kernel<__half>", "adapter_ln_tc_kernel<__half>",
     "adapter_ln_rows_kernel<c10::Half>"),
    ("300-segments", BF16, lambda: _adapter(768, [3] * 300, [64, 0, 16, 33, 8]),
     "adapter_ln_tc_kernel<__nv_bfloat16>", None, "adapter_ln_rows_kernel<c10::BFloat16>"),
    ("fp32", F32, lambda: _adapter(768, [17], [64]), "adapter_ln_rows_kernel<float>", None, None),
    ("n60-ragged", F16, lambda: _adapter(60, [17, 5], [8, 3]),
     "adapter_ln_rows_kernel<c10::Half>", None, None),
    ("max_rank96", F16, lambda: _adapter(768, [17], [96], 96),
     "adapter_ln_rows_kernel<c10::Half>", None, None),
]  # fmt: skip


def _clone(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _run(fn: Callable, op: str, args: tuple) -> torch.Tensor:
    """``fn`` on a private copy of ``args``: its output, or ``y`` for the in-place ops."""
    args = _clone(args)
    out = fn(*args)
    return args[0] if op in INPLACE else out


def _petops_kernels(fn: Callable[[], object]) -> list[str]:
    """Names of the petops CUDA kernels that ``fn`` launches."""
    fn()  # the first call's one-time occupancy and attribute queries stay out of the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [name for name in names if "petops::" in name]


def _for_this_gpu(sm90: str, sm80: str | None, older: str | None) -> str:
    major = torch.cuda.get_device_capability()[0]
    if major >= 9:
        return sm90
    sm80 = sm80 or sm90
    return sm80 if major >= 8 else older or sm80


def _check(op: str, args: tuple, kernel: str, what: str) -> None:
    if "cuda" not in petops.compiled_devices(op):
        pytest.skip(f"libpetops.so has no CUDA kernel for {op} ({petops.backend_name()})")
    compiled = getattr(torch.ops.petops, op).default
    ran = _petops_kernels(lambda: _run(compiled, op, args))
    pattern = r"::" + re.escape(kernel) + r"\("
    assert len(ran) == 1 and re.search(pattern, ran[0]), f"{what}: expected {kernel}, ran {ran}"
    out, expected = _run(compiled, op, args), _run(getattr(ref, op), op, args)
    rtol, atol = TOL[expected.dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.parametrize(
    ("op", "dtype", "pick", "kernel", "older"),
    SAMPLE_CASES,
    ids=[re.sub(r"\W+", "-", c[3]).strip("-") for c in SAMPLE_CASES],
)
def test_sample_runs_its_kernel(
    op: str, dtype: torch.dtype, pick: Callable[[tuple], bool], kernel: str, older: str | None
) -> None:
    samples = [(name, args) for name, args in SAMPLES[op]("cuda", dtype) if pick(args)]
    assert samples, f"op_samples has no {op} {dtype} sample for {kernel}"
    name, args = samples[0]
    _check(op, args, _for_this_gpu(kernel, None, older), f"{op}[{name}] {dtype}")


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.parametrize(
    ("case", "dtype", "make", "sm90", "sm80", "older"),
    ADAPTER_CASES,
    ids=[c[0] for c in ADAPTER_CASES],
)
def test_adapter_site_runs_its_kernel(
    case: str,
    dtype: torch.dtype,
    make: Callable[[], tuple],
    sm90: str,
    sm80: str | None,
    older: str | None,
) -> None:
    op = "adapter_residual_layernorm"
    args = _to(make(), "cuda", dtype)
    _check(op, args, _for_this_gpu(sm90, sm80, older), f"{op}[{case}] {dtype}")


def _kernel_name(kernel: str) -> str:
    return kernel.split("<", 1)[0]


def test_every_cuda_kernel_has_a_case() -> None:
    """Every ``__global__`` kernel in the CUDA sources is reached by a case above (this one
    runs on CPU too: a new kernel needs a case that makes the dispatch choose it)."""
    kernel = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(")
    defined = set()
    for path in CUDA_SOURCES.glob("*.cu*"):
        defined |= set(kernel.findall(path.read_text()))
    covered = {_kernel_name(k) for c in SAMPLE_CASES for k in c[3:] if k}
    covered |= {_kernel_name(k) for c in ADAPTER_CASES for k in c[3:] if k}
    assert len(defined) >= 13, f"kernel scan of {CUDA_SOURCES} found only {sorted(defined)}"
    assert defined == covered, (
        f"kernels without a case: {sorted(defined - covered)}; "
        f"cases naming no kernel: {sorted(covered - defined)}"
    )
