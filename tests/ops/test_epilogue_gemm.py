"""The shared GEMM with per-segment bias, activation and IA3 scale (``petops.epilogue_gemm``).

* Against ``bias_act(x @ w.T, ...)`` of the reference for every activation, with and without
  scales, over ragged, empty and many segments and widths that are not tile multiples, on the
  CPU through Triton's interpreter (a child process: tests/ops/triton_interpret.py). Each case
  also checks that the epilogue did something: the result is not the bare product's.
* Every tiling compiles for sm_90 to wgmma with no spills (ahead of time, no GPU).
* On a GPU, the compiled kernel against the reference.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton", reason="the Triton candidate needs the triton package")

from op_samples import HAS_CUDA, TOL, _indptr, _to
from triton_interpret import assert_hopper_code, run_interpreted

from petops import epilogue_gemm
from petops import reference as ref

ACTS = (ref.ACT_NONE, ref.ACT_GELU, ref.ACT_RELU, ref.ACT_SILU, ref.ACT_GELU_TANH)
# (segment lengths, N, K): one token; one segment; empty segments; a partial K step and a
# partial column tile; 40 segments over several row tiles
LAYOUTS = (
    ([1], 64, 64),
    ([37], 72, 64),
    ([5, 0, 60, 0, 5], 96, 80),
    ([3, 130, 17], 200, 100),
    ([4, 9, 1, 7] * 10, 64, 128),
)


def _case(i: int, device: str, dtype: torch.dtype) -> tuple:
    lengths, n, k = LAYOUTS[i % len(LAYOUTS)]
    g = torch.Generator().manual_seed(i)
    s = len(lengths)
    bias, scale = torch.randn(3, n, generator=g), torch.rand(2, n, generator=g) + 0.5
    with_scale = i % 2 == 0
    args = (
        torch.randn(sum(lengths), k, generator=g),
        torch.randn(n, k, generator=g) * k**-0.5,
        bias,
        _indptr(lengths),
        torch.randint(0, 3, (s,), generator=g, dtype=torch.int32),
        scale if with_scale else None,
        torch.randint(0, 2, (s,), generator=g, dtype=torch.int32) if with_scale else None,
    )
    return _to(args, device, dtype)


def _check(args: tuple, act: int, dtype: torch.dtype, config: epilogue_gemm.GemmConfig) -> dict:
    x, w, *rest = args
    product = (x.float() @ w.float().T).to(dtype)
    want = ref.bias_act(product, *rest, act)
    got = epilogue_gemm.gemm_bias_act(x, w, *rest, act, config=config)
    rtol, atol = TOL[dtype]
    return {
        "close": bool(torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol)),
        "max_err": float((got.float() - want.float()).abs().max()),
        "epilogue": not torch.allclose(got.float(), ref.apply_act(product.float(), act)),
    }


def _cases() -> list[tuple[str, torch.dtype, int, int, epilogue_gemm.GemmConfig]]:
    out = []
    for dtype in (torch.float32, torch.float16):
        for i in range(len(LAYOUTS) * 2):
            act = ACTS[i % len(ACTS)]
            out.append((f"case{i}-act{act}", dtype, i, act, epilogue_gemm.CONFIGS[0]))
    small = epilogue_gemm.CONFIGS[-1]  # 64 x 64 tiles: several column and row tiles
    out += [(f"case{i}-small", torch.float32, i, ref.ACT_GELU, small) for i in range(5)]
    return out


def _interpret_all() -> None:
    """Child process: one JSON line per case."""
    for name, dtype, i, act, cfg in _cases():
        out = _check(_case(i, "cpu", dtype), act, dtype, cfg)
        print(json.dumps({"case": f"{name}-{dtype}-{cfg}"} | out))


def test_matches_the_reference_in_the_interpreter() -> None:
    rows = run_interpreted(__file__)
    assert len(rows) == len(_cases())
    bad = [r for r in rows if not (r["close"] and r["epilogue"])]
    assert not bad, bad


@pytest.mark.parametrize("config", epilogue_gemm.CONFIGS, ids=str)
def test_every_tiling_compiles_to_wgmma_without_spills(config: epilogue_gemm.GemmConfig) -> None:
    assert_hopper_code(epilogue_gemm.compile_for(config, arch=90), config)


def test_bad_arguments_are_refused_with_the_value() -> None:
    x, w, bias, indptr, seg_bias, scale, seg_scale = _case(0, "cpu", torch.float32)
    with pytest.raises(ValueError, match="act=9"):
        epilogue_gemm.gemm_bias_act(x, w, bias, indptr, seg_bias, scale, seg_scale, 9)
    with pytest.raises(ValueError, match="give both or neither"):
        epilogue_gemm.gemm_bias_act(x, w, bias, indptr, seg_bias, scale, None, 0)
    with pytest.raises(ValueError, match=r"w is torch\.float16"):
        epilogue_gemm.gemm_bias_act(x, w.half(), bias, indptr, seg_bias, None, None, 0)


# On a GPU every tiling, activation and dtype is a separate Triton compile: the default
# tiling runs every case in every dtype, the others the GELU-with-scales cases in fp16 (the
# benchmark checks each tiling again on its own points before timing it).
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="requires cuda")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_matches_the_reference_on_the_gpu(dtype: torch.dtype) -> None:
    for i in range(len(LAYOUTS) * 2):
        act = ACTS[i % len(ACTS)]
        out = _check(_case(i, "cuda", dtype), act, dtype, epilogue_gemm.CONFIGS[0])
        assert out["close"] and out["epilogue"], (i, act, out)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="requires cuda")
@pytest.mark.parametrize("config", epilogue_gemm.CONFIGS[1:], ids=str)
def test_every_tiling_matches_the_reference_on_the_gpu(config: epilogue_gemm.GemmConfig) -> None:
    for i in range(0, len(LAYOUTS) * 2, 2):  # even cases carry IA3 scales
        out = _check(_case(i, "cuda", torch.float16), ref.ACT_GELU, torch.float16, config)
        assert out["close"] and out["epilogue"], (i, out)


if __name__ == "__main__":
    _interpret_all()
