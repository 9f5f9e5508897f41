"""adapter_residual_layernorm: the fused adapter output site against its unfused composition.

The op must equal ``bias_act`` -> ``sgmv_shrink`` (one call per activation: its act is a
scalar) -> ``sgmv_expand`` (one full-width item per adapter segment) ->
``bias_residual_layernorm``, with the same intermediate roundings, on the generated samples
(``op_samples``) and on shapes that reach every branch of the CUDA kernels: the tensor-core
kernels (fp16/bf16, hidden N a multiple of 64 up to 1024, max_rank <= 64: on sm_90 a cluster
of four blocks per 32-token tile for small calls, else one block per tile) and the generic one
(fp32, ragged N, N > 1024, max_rank > 64). Rank-0 segments get the plain LayerNorm epilogue
and segments with an adapter must not. Malformed calls raise messages that name the value and
the fix; data-dependent checks (ranks, pool offsets) run on CPU only.
"""

from __future__ import annotations

import pytest
import torch
from op_samples import DEVICES, DTYPES, HAS_CUDA, MAX_RANK, SAMPLES, TOL, _i64, _to, adapter_args

import petops
from petops import reference as ref

OP = "adapter_residual_layernorm"
UNFUSED = ("bias_act", "sgmv_shrink", "sgmv_expand", "bias_residual_layernorm")
ACTS = (ref.ACT_RELU, ref.ACT_GELU, ref.ACT_SILU, ref.ACT_GELU_TANH)

pytestmark = pytest.mark.skipif(
    not petops.compiled_available(), reason=f"petops library not built: {petops.backend_name()}"
)


def _need_kernel(device: str, ops: tuple[str, ...] = (OP,)) -> None:
    missing = [op for op in ops if device not in petops.compiled_devices(op)]
    if missing:
        pytest.skip(f"libpetops.so has no {device} kernel for {missing} ({petops.backend_name()})")


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    rtol, atol = TOL[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


LENGTHS = [0, 1, 31, 32, 33, 64, 130, 7, 0, 65]  # 1..5 token tiles of 32, empty segments


def _case(
    n: int,
    ranks: list[int],
    max_rank: int,
    seed: int,
    lengths: list[int] | None = None,
    residual: bool = True,
    aligned: bool = True,
    eps: float = 1e-5,
) -> tuple:
    """One task per segment: segment s runs rank ranks[s] with activation ACTS[s % 4]."""
    lengths = LENGTHS if lengths is None else lengths
    seg = list(range(len(lengths)))
    acts = [ACTS[s % len(ACTS)] for s in seg]
    g = torch.Generator().manual_seed(seed)
    return adapter_args(lengths, seg, ranks, acts, n, max_rank, g, residual, aligned, eps)


def _shared_case(seed: int) -> tuple:
    """256 one-to-three-token segments over 5 tasks: adapters shared by many segments."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 4, (256,), generator=g).tolist()
    tasks = torch.randint(0, 5, (256,), generator=g).tolist()
    return adapter_args(lengths, tasks, [64, 0, 7, 33, 1], [1, 2, 3, 4, 2], 128, 64, g)


RANKS_64 = [64, 1, 17, 0, 33, 8, 48, 63, 0, 16]  # 1..64 and rank 0 in one call
RANKS_96 = [96, 65, 0, 1, 80, 33, 17, 64, 3, 95]
# (name, thunk): built lazily so collection stays cheap
EDGE_CASES = {
    "n768-ranks1to64-tc": lambda: _case(768, RANKS_64, 64, 1),
    "n768-unaligned-pool": lambda: _case(768, RANKS_64, 64, 2, aligned=False),
    "n768-no-residual": lambda: _case(768, RANKS_64[::-1], 64, 3, residual=False),
    "n1024-max-tc-width": lambda: _case(1024, RANKS_64, 64, 4, eps=1e-12),
    "n136-not-64-multiple": lambda: _case(136, RANKS_64, 64, 5),
    "n60-ragged": lambda: _case(60, RANKS_64, 64, 6, aligned=False),
    "n60-ragged-no-residual": lambda: _case(60, RANKS_64, 64, 7, residual=False),
    "n1040-max_rank96-generic": lambda: _case(1040, RANKS_96, 96, 8),
    "n768-max_rank96-generic": lambda: _case(768, RANKS_96, 96, 9),
    "n768-max_rank_unused": lambda: _case(768, [min(r, 16) for r in RANKS_64], 64, 10),
    "one-token": lambda: _case(768, [64], 64, 11, lengths=[1]),
    "one-segment": lambda: _case(256, [40], 64, 12, lengths=[100]),
    "all-rank0": lambda: _case(256, [0] * 10, 64, 13),
    "all-rank0-max_rank0": lambda: _case(64, [0] * 10, 0, 14),
    "256-segments-shared": lambda: _shared_case(15),
    "256-segments-distinct": lambda: _case(64, [s % 65 for s in range(256)], 64, 16, [1] * 256),
    "t0": lambda: _case(768, [64, 0, 5], 64, 17, lengths=[0, 0, 0]),
    "t0-no-segments": lambda: _case(768, [], 64, 18, lengths=[]),
}


def _unfused(args: tuple, impl) -> torch.Tensor:
    """The op as its four unfused ops; ``impl`` holds them (petops.reference or compiled)."""
    (y, residual, bias, seg_bias, w, seg_w_off, seg_rank, seg_act) = args[:8]
    gamma, beta, seg_indptr, seg_ln, max_rank, eps = args[8:]
    h = impl.bias_act(y, bias, seg_indptr, seg_bias, None, None, ref.ACT_NONE)
    ranks, acts = seg_rank.tolist(), seg_act.tolist()
    items = [s for s, r in enumerate(ranks) if r > 0]
    if items:
        tmp = torch.zeros(y.shape[0], max_rank, dtype=y.dtype, device=y.device)
        for act in sorted({acts[s] for s in items}):  # shrink applies one act per call
            grp = _i64([s for s in items if acts[s] == act]).to(y.device)
            off = seg_w_off[grp]
            # rows of the other segments are exact zeros: the sum is exact in every dtype
            tmp += impl.sgmv_shrink(
                h, w, seg_indptr, grp.int(), off[:, 0], seg_rank[grp], w, off[:, 1], act, max_rank
            )
        it = _i64(items).to(y.device)
        zeros = torch.zeros(len(items), dtype=torch.int32, device=y.device)
        n_cols = torch.full_like(zeros, y.shape[1])
        ones = torch.ones(len(items), device=y.device)
        off = seg_w_off[it]
        impl.sgmv_expand(
            h, tmp, w, seg_indptr, it.int(), off[:, 2], seg_rank[it], zeros, zeros, n_cols, ones,
            w, off[:, 3],
        )  # fmt: skip
    return impl.bias_residual_layernorm(
        h, residual, None, gamma, beta, seg_indptr, None, seg_ln, eps
    )


class _Compiled:
    def __getattr__(self, op: str):
        return getattr(torch.ops.petops, op).default


def _check_site(out: torch.Tensor, args: tuple, what: str) -> None:
    """Rank-0 segments equal the plain LayerNorm epilogue (of the rounded y + bias); every
    non-empty segment with an adapter is changed by it beyond the dtype's tolerance."""
    y, residual, bias, seg_bias = args[:4]
    seg_rank, (gamma, beta, seg_indptr, seg_ln), eps = args[6], args[8:12], args[13]
    h = ref.bias_act(y, bias, seg_indptr, seg_bias, None, None, ref.ACT_NONE)
    plain = ref.bias_residual_layernorm(
        h, residual, None, gamma, beta, seg_indptr, None, seg_ln, eps
    )
    rtol, atol = TOL[out.dtype]
    # per segment: the largest excess of |out - plain| over the tolerance (<= 0: "close")
    excess = ((out.float() - plain.float()).abs() - atol - rtol * plain.float().abs()).amax(1)
    seg = ref.token_segment(seg_indptr, out.shape[0])
    worst = torch.full((seg_rank.numel(),), -1.0, device=out.device)
    worst = worst.scatter_reduce(0, seg, excess, "amax").tolist()
    lengths = (seg_indptr[1:] - seg_indptr[:-1]).tolist()
    for s, (r, length) in enumerate(zip(seg_rank.tolist(), lengths, strict=True)):
        if r == 0:
            assert worst[s] <= 0, f"{what}: rank-0 segment {s} differs from the plain LayerNorm"
        elif length:
            assert worst[s] > 0, f"{what}: segment {s} (rank {r}) is unchanged by its adapter"


def _all_cases(device: str, dtype: torch.dtype):
    yield from SAMPLES[OP](device, dtype)
    for name, make in EDGE_CASES.items():
        yield name, _to(make(), device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_cases_match_reference(case: str, dtype: torch.dtype, device: str) -> None:
    _need_kernel(device)
    args = _to(EDGE_CASES[case](), device, dtype)
    y0 = args[0].clone()
    out = torch.ops.petops.adapter_residual_layernorm.default(*args)
    assert torch.equal(args[0], y0), f"{case}: y was modified"
    expected = ref.adapter_residual_layernorm(*args)
    _close(out, expected, f"{case} {dtype} on {device}")
    _check_site(out, args, f"{case} {dtype} on {device}")


def _repeat(args: tuple, copies: int) -> tuple:
    """The call's segments (and their tokens) repeated ``copies`` times, pools unchanged."""
    y, residual, bias, seg_bias, w, seg_w_off, seg_rank, seg_act = args[:8]
    gamma, beta, seg_indptr, seg_ln, max_rank, eps = args[8:]
    lengths = (seg_indptr[1:] - seg_indptr[:-1]).repeat(copies)
    indptr = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(seg_indptr.dtype)
    rows = (y.repeat(copies, 1), None if residual is None else residual.repeat(copies, 1))
    segs = [t.repeat(copies) for t in (seg_bias, seg_rank, seg_act, seg_ln)]
    return (*rows, bias, segs[0], w, seg_w_off.repeat(copies, 1), segs[1], segs[2], gamma, beta,
            indptr, segs[3], max_rank, eps)  # fmt: skip


# On sm_90 a tensor-core call runs on clusters of four blocks while every 32-token unit gets its
# own resident cluster (at most SMs / 2 clusters), else on one block per unit: the edge cases
# above are small enough for the cluster kernel, and with their segments repeated up to 400 or
# more (400+ units) they run the one-block kernel (test_kernel_choice.py checks which runs).
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="requires cuda")
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_edge_cases_on_many_units_match_reference(dtype: torch.dtype) -> None:
    _need_kernel("cuda")
    for case, make in EDGE_CASES.items():
        args = make()
        copies = -(-400 // max(args[6].numel(), 1))
        args = _to(_repeat(args, copies), "cuda", dtype)
        out = torch.ops.petops.adapter_residual_layernorm.default(*args)
        what = f"{case} x{copies} {dtype}"
        _close(out, ref.adapter_residual_layernorm(*args), what)
        _check_site(out, args, what)


# the reference against itself in float32 and with 16-bit roundings, as the loop-oracle check
COMPOSITION = [("compiled", dt) for dt in DTYPES] + [
    ("reference", dt) for dt in (torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("impl", "dtype"), COMPOSITION, ids=str)
def test_matches_unfused_composition(impl: str, dtype: torch.dtype, device: str) -> None:
    """Fused op == bias_act -> sgmv_shrink -> sgmv_expand -> bias_residual_layernorm, both as
    compiled kernels and as references (the spec agrees with itself)."""
    if impl == "compiled":
        _need_kernel(device, (OP, *UNFUSED))
    ops = _Compiled() if impl == "compiled" else ref
    n_adapter_rows = 0
    for name, args in _all_cases(device, dtype):
        what = f"{impl} {name} {dtype} on {device}"
        out = getattr(ops, OP)(*args)
        _close(out, _unfused(args, ops), f"{what} vs unfused")
        if impl == "compiled":
            _check_site(out, args, what)
        lengths = (args[10][1:] - args[10][:-1]).long()
        n_adapter_rows += int(lengths[args[6] > 0].sum())
    assert n_adapter_rows > 1000  # the cases exercise the adapter, not just the LayerNorm


OPCHECK_CASES = [
    ("n60-ragged-no-residual", torch.float32),
    ("n768-max_rank96-generic", torch.bfloat16),
    ("n768-ranks1to64-tc", torch.float16),
    ("t0", torch.bfloat16),
    ("t0-no-segments", torch.float32),
]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_edge_cases(device: str) -> None:
    _need_kernel(device)
    for case, dtype in OPCHECK_CASES:
        args = _to(EDGE_CASES[case](), device, dtype)
        torch.library.opcheck(torch.ops.petops.adapter_residual_layernorm.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_rank0_segments_ignore_their_offsets(device: str) -> None:
    """seg_w_off is read only where rank > 0: garbage in rank-0 rows changes nothing."""
    _need_kernel(device)
    args = _to(_case(64, [0, 5, 0, 9, 0, 0, 3, 0, 0, 0], MAX_RANK, 20), device, torch.float16)
    bad = args[5].clone()
    bad[args[6] == 0] = torch.tensor([-(2**40), 2**50, -3, 2**62], device=device)
    for fn in (ref.adapter_residual_layernorm, torch.ops.petops.adapter_residual_layernorm.default):
        expected = fn(*args)
        torch.testing.assert_close(fn(*_bad(args, seg_w_off=bad)), expected, rtol=0, atol=0)


# ---- input validation ----


def _bad(args: tuple, **changes) -> tuple:
    names = ("y", "residual", "bias", "seg_bias", "w", "seg_w_off", "seg_rank", "seg_act")
    names += ("gamma", "beta", "seg_indptr", "seg_ln", "max_rank", "eps")
    return tuple(changes.get(k, a) for k, a in zip(names, args, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_shape_and_dtype_errors(device: str) -> None:
    """Checked before any kernel runs, identically on every device."""
    _need_kernel(device)
    op = torch.ops.petops.adapter_residual_layernorm.default
    args = _to(_case(64, RANKS_64, 64, 30), device, torch.float16)
    off, w = args[5], args[4]
    shape_msg = r"seg_w_off must be \[S, 4\] = \[10, 4\] \(down.w, down.b, up.w, up.b offsets\)"
    with pytest.raises(RuntimeError, match=shape_msg + r", got \[10, 3\]"):
        op(*_bad(args, seg_w_off=off[:, :3]))
    with pytest.raises(RuntimeError, match=shape_msg + r", got \[9, 4\]"):
        op(*_bad(args, seg_w_off=off[1:]))
    with pytest.raises(
        RuntimeError, match=r"seg_w_off must be a 2-D tensor \[S, 4\], got shape \[40\]"
    ):
        op(*_bad(args, seg_w_off=off.flatten()))
    with pytest.raises(
        RuntimeError, match=r"seg_w_off must be an int64 \(or int32\) tensor on .*, got Float"
    ):
        op(*_bad(args, seg_w_off=off.float()))
    with pytest.raises(RuntimeError, match=r"w must have the dtype of y \(Half\), got Float; cast"):
        op(*_bad(args, w=w.float()))
    with pytest.raises(RuntimeError, match=r"w must have the dtype of y \(Half\), got BFloat16"):
        op(*_bad(args, w=w.bfloat16()))
    with pytest.raises(RuntimeError, match=r"w must be a 1-D tensor \[pool_elems\]"):
        op(*_bad(args, w=w.view(1, -1)))
    with pytest.raises(RuntimeError, match=r"seg_rank must have 10 entries, got 9"):
        op(*_bad(args, seg_rank=args[6][1:]))
    with pytest.raises(RuntimeError, match=r"seg_act must be an int32 or int64 tensor, got Float"):
        op(*_bad(args, seg_act=args[7].float()))
    with pytest.raises(RuntimeError, match=r"max_rank must be >= 0, got -1"):
        op(*_bad(args, max_rank=-1))


def test_data_errors_cpu() -> None:
    """Ranks, activation codes and pool offsets are read on the host (CPU kernel only)."""
    op = torch.ops.petops.adapter_residual_layernorm.default
    args = _case(64, RANKS_64, 64, 31)  # seg_rank[0] = 64
    rank, off, act, numel = args[6], args[5], args[7], args[4].numel()
    with pytest.raises(
        RuntimeError, match=r"seg_rank\[0\]=64 is out of range; .*max_rank in \[0, 64\)"
    ):
        op(*_bad(args, max_rank=63))
    bad = rank.clone()
    bad[2] = -1
    with pytest.raises(RuntimeError, match=r"seg_rank\[2\]=-1 is out of range"):
        op(*_bad(args, seg_rank=bad))
    bad = act.clone()
    bad[1] = 5
    with pytest.raises(RuntimeError, match=r"seg_act\[1\]=5 is not an ACT_\* code in \[0, 5\)"):
        op(*_bad(args, seg_act=bad))
    over = r"seg_w_off\[{}, {}\]={} with length {} overruns the adapter pool of {} elements"
    for s, p, value, length in ((4, 0, numel - 33 * 64 + 1, 33 * 64), (2, 3, numel - 63, 64),
                                (5, 1, -8, 8)):  # fmt: skip
        bad = off.clone()
        bad[s, p] = value
        with pytest.raises(RuntimeError, match=over.format(s, p, value, length, numel)):
            op(*_bad(args, seg_w_off=bad))
    bad = off.clone()
    bad[3] = -1  # segment 3 has rank 0: its offsets are never read
    op(*_bad(args, seg_w_off=bad))
