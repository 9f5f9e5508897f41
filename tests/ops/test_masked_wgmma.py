"""The Triton candidate for MaskBERT's masked product (``petops.masked_wgmma``).

* Against the op's reference on the seg_masked_mm samples (ragged and empty segments, tasks
  without a mask, partial mask words, deep K), on the CPU through Triton's interpreter: run in
  a child process, since ``TRITON_INTERPRET`` must be set before the kernel is defined.
* Every tiling compiles for sm_90 to wgmma instructions with no spilled registers (ahead of
  time, no GPU needed): the reason the candidate exists is the Hopper matrix unit.
* On a GPU, the compiled kernel against the reference.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton", reason="the Triton candidate needs the triton package")

from op_samples import HAS_CUDA, SAMPLES, TOL
from triton_interpret import assert_hopper_code, run_interpreted

from petops import masked_wgmma
from petops import reference as ref

# the interpreter runs a program at a time: 256-segment samples take 5-17 s each, so one
# stands for them; the other tilings run on the small samples
INTERPRETED_MANY = "many-identical-n48-k64"
OTHER_TILINGS = (
    masked_wgmma.MaskedConfig(block_m=128, num_warps=8),
    masked_wgmma.MaskedConfig(block_k=32, num_stages=4),
)


def _cases() -> list[tuple[str, torch.dtype, tuple, masked_wgmma.MaskedConfig]]:
    out = []
    for dtype in (torch.float32, torch.float16):
        for name, args in SAMPLES["seg_masked_mm"]("cpu", dtype):
            if name.startswith("many") and name != INTERPRETED_MANY:
                continue
            out.append((name, dtype, args, masked_wgmma.CONFIGS[0]))
            if dtype == torch.float32 and not name.startswith("many"):
                out += [(name, dtype, args, cfg) for cfg in OTHER_TILINGS]
    return out


def _check(args: tuple, dtype: torch.dtype, config: masked_wgmma.MaskedConfig) -> dict:
    """The candidate's and the reference's results on fresh copies of ``y``."""
    want, got = args[0].clone(), args[0].clone()
    ref.seg_masked_mm(want, *args[1:])
    masked_wgmma.seg_masked_mm(got, *args[1:], config=config)
    rtol, atol = TOL[dtype]
    return {
        "close": bool(torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol)),
        "max_err": float((got.float() - want.float()).abs().max()),
        "changed": bool((got != args[0]).any()),  # the product did add something
    }


def _interpret_all() -> None:
    """Child process: one JSON line per case."""
    for name, dtype, args, cfg in _cases():
        print(json.dumps({"case": f"{name}-{dtype}-{cfg}"} | _check(args, dtype, cfg)))


def test_matches_the_reference_in_the_interpreter() -> None:
    rows = run_interpreted(__file__)
    assert len(rows) == len(_cases())
    bad = [r for r in rows if not r["close"]]
    assert not bad, bad
    # every sample has tasks with masks over its tokens: each run must change y
    assert all(r["changed"] for r in rows), [r["case"] for r in rows if not r["changed"]]


@pytest.mark.parametrize("config", masked_wgmma.CONFIGS, ids=str)
def test_every_tiling_compiles_to_wgmma_without_spills(config: masked_wgmma.MaskedConfig) -> None:
    assert_hopper_code(masked_wgmma.compile_for(config, arch=90), config)


def test_a_bad_tiling_is_refused_with_the_value() -> None:
    args = next(iter(SAMPLES["seg_masked_mm"]("cpu", torch.float32)))[1]
    with pytest.raises(ValueError, match="block_k=48; expected a multiple of 32"):
        masked_wgmma.seg_masked_mm(*args, config=masked_wgmma.MaskedConfig(block_k=48))


# On a GPU every tiling is a separate Triton compile (a second or two each): the default
# tiling runs every sample in every dtype, the others one 16-bit pass each (the benchmark
# checks each tiling again on its own points before timing it).
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="requires cuda")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_matches_the_reference_on_the_gpu(dtype: torch.dtype) -> None:
    for name, args in SAMPLES["seg_masked_mm"]("cuda", dtype):
        out = _check(args, dtype, masked_wgmma.CONFIGS[0])
        assert out["close"] and out["changed"], (name, out)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="requires cuda")
@pytest.mark.parametrize("config", masked_wgmma.CONFIGS[1:], ids=str)
def test_every_tiling_matches_the_reference_on_the_gpu(config: masked_wgmma.MaskedConfig) -> None:
    for name, args in SAMPLES["seg_masked_mm"]("cuda", torch.float16):
        out = _check(args, torch.float16, config)
        assert out["close"] and out["changed"], (name, out)


if __name__ == "__main__":
    _interpret_all()
