"""Sample generators for the petops tests: one ``sample_inputs_<op>(device, dtype)`` per op.

Each yields ``(name, args)`` with ``args`` in the op's positional order. The cases cross the
segment layouts (one token, one segment, empty segments, 256 segments, a wide input) with the
task-distribution axis (identical / distinct / uniform / skewed, as in punica's tests), mixed
LoRA ranks 1..64, several expand items per segment (q/k/v column blocks) and sparsity 0.1%..10%.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from petops import reference as ref

Sample = tuple[str, tuple]

# Shared by the op test modules: dtypes, devices (CUDA skipped without a GPU) and the per-dtype
# (rtol, atol): 16-bit results may differ from the reference by an ulp or two of a rounding.
HAS_CUDA = torch.cuda.is_available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICES = (
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="requires cuda")]
    ),
)
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 2e-2)}

DISTRIBUTIONS = ("identical", "distinct", "uniform", "skewed")
RANKS = (1, 2, 8, 16, 33, 64)
MAX_RANK = 64
DENSITIES = (0.001, 0.01, 0.05, 0.1)


def _lengths(layout: str, g: torch.Generator) -> list[int]:
    if layout == "one_token":
        return [1]
    if layout == "one_segment":
        return [37]
    if layout == "empty_segments":
        return [0, 5, 0, 0, 17, 3, 0]
    if layout == "many":  # 256 segments, some empty
        return torch.randint(0, 7, (256,), generator=g).tolist()
    raise ValueError(layout)


def _slots(dist: str, n_seg: int, g: torch.Generator) -> tuple[list[int], int]:
    """Task slot of every segment and the number of tasks in the pool."""
    if dist == "identical":
        return [0] * n_seg, 1
    if dist == "distinct":
        return list(range(n_seg)), n_seg
    n_tasks = 6
    if dist == "uniform":
        return torch.randint(0, n_tasks, (n_seg,), generator=g).tolist(), n_tasks
    hot = torch.rand(n_seg, generator=g) < 0.8  # skewed: 80% of segments on task 0
    other = torch.randint(1, n_tasks, (n_seg,), generator=g)
    return torch.where(hot, 0, other).tolist(), n_tasks


def layouts(seed: int) -> Iterator[tuple[str, list[int], list[int], int, torch.Generator]]:
    """(name, segment lengths, segment task slots, number of tasks, generator)."""
    g = torch.Generator().manual_seed(seed)
    for layout in ("one_token", "one_segment", "empty_segments", "many"):
        lengths = _lengths(layout, g)
        for dist in DISTRIBUTIONS if len(lengths) > 1 else ("identical",):
            slots, n_tasks = _slots(dist, len(lengths), g)
            yield f"{layout}-{dist}", lengths, slots, n_tasks, g


def _indptr(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _i32(v: list[int]) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int32)


def _i64(v: list[int]) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int64)


def _to(args: tuple, device: str, dtype: torch.dtype, keep: tuple[int, ...] = ()) -> tuple:
    """Floating tensors to ``dtype`` (except positions in ``keep``), all to ``device``."""
    out = []
    for pos, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            as_is = not a.is_floating_point() or pos in keep
            a = a.to(device=device, dtype=None if as_is else dtype)
        out.append(a)
    return tuple(out)


# Row widths of the epilogue samples: whole 16-byte packs (the CUDA vector kernels; the
# register-resident LayerNorm holds 1, 2 (384 in 16 bits), 4 or 8 (1024 in fp32) packs per
# lane), a ragged width (the scalar kernels) and rows too wide for the register-resident
# LayerNorm (2056: its scalar kernel).
EPILOGUE_WIDTHS = (48, 64, 50, 2056, 384, 1024)


def sample_inputs_bias_act(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    for i, (name, lengths, slots, n_tasks, g) in enumerate(layouts(1)):
        n = EPILOGUE_WIDTHS[i % len(EPILOGUE_WIDTHS)]
        t = sum(lengths)
        y = torch.randn(t, n, generator=g)
        bias = torch.randn(n_tasks, n, generator=g)
        scale = torch.rand(n_tasks, n, generator=g) + 0.5 if i % 2 == 0 else None
        seg_scale = _i32(slots[::-1]) if scale is not None else None
        for act in (i % 5, (i + 4) % 5):  # every activation code over the four layouts
            args = (y, bias, _indptr(lengths), _i32(slots), scale, seg_scale, act)
            yield f"{name}-n{n}-act{act}", _to(args, device, dtype)


def sample_inputs_bias_residual_layernorm(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    for i, (name, lengths, slots, n_tasks, g) in enumerate(layouts(2)):
        n = EPILOGUE_WIDTHS[(i + 1) % len(EPILOGUE_WIDTHS)]
        t = sum(lengths)
        y = torch.randn(t, n, generator=g) * 2 + 1
        residual = torch.randn(t, n, generator=g) if i % 2 == 0 else None
        bias = torch.randn(n_tasks, n, generator=g) if i % 3 != 0 else None
        seg_bias = _i32(slots) if bias is not None else None
        gamma = torch.rand(n_tasks, n, generator=g) + 0.5
        beta = torch.randn(n_tasks, n, generator=g)
        eps = 1e-12 if i % 2 else 1e-5
        args = (y, residual, bias, gamma, beta, _indptr(lengths), seg_bias, _i32(slots), eps)
        yield f"{name}-n{n}", _to(args, device, dtype)


def _pool(sizes: list[int], g: torch.Generator, std: float) -> tuple[torch.Tensor, list[int]]:
    """A flat pool holding one block per size, with gaps so offsets are arbitrary."""
    offs, cur = [], 3
    for s in sizes:
        offs.append(cur)
        cur += s + 5
    return torch.randn(cur, generator=g) * std, offs


def sample_inputs_sgmv_shrink(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    k = 72  # not a multiple of the kernel's K chunk
    for i, (name, lengths, slots, n_tasks, g) in enumerate(layouts(3)):
        ranks = [RANKS[(t + i) % len(RANKS)] for t in range(n_tasks)]
        w, w_off = _pool([r * k for r in ranks], g, k**-0.5)
        b, b_off = _pool(ranks, g, 1.0)
        # every 5th segment runs the backbone only (no item) when tasks are mixed
        segs = [s for s in range(len(lengths)) if n_tasks == 1 or s % 5 != 4]
        item_task = [slots[s] for s in segs]
        with_bias = i % 2 == 1
        args = (
            torch.randn(sum(lengths), k, generator=g),
            w,
            _indptr(lengths),
            _i32(segs),
            _i64([w_off[t] for t in item_task]),
            _i32([ranks[t] for t in item_task]),
            b if with_bias else None,
            _i64([b_off[t] for t in item_task]) if with_bias else None,
            i % 5,
            MAX_RANK,
        )
        yield f"{name}-act{i % 5}", _to(args, device, dtype)


def sample_inputs_sgmv_expand(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    n = 48  # per q/k/v block; a single "adapter up" item spans all 3 * n > 128 columns
    for i, (name, lengths, slots, n_tasks, g) in enumerate(layouts(4)):
        t_tok = sum(lengths)
        ranks = [RANKS[(t + i) % len(RANKS)] for t in range(n_tasks)]
        qkv = [t % 2 == 0 for t in range(n_tasks)]
        blocks = [(3, n) if q else (1, 3 * n) for q in qkv]  # (items, out_dim) per task
        sizes = [nd * r for (cnt, nd), r in zip(blocks, ranks, strict=True) for _ in range(cnt)]
        w, w_off = _pool(sizes, g, 0.2)
        b, b_off = _pool([nd for cnt, nd in blocks for _ in range(cnt)], g, 1.0)
        first = [sum(c for c, _ in blocks[:t]) for t in range(n_tasks)]  # first block of task
        cols: dict[str, list] = {key: [] for key in ("seg", "w", "r", "j0", "c0", "n", "b")}
        for s, task in enumerate(slots):
            cnt, nd = blocks[task]
            for j in range(cnt):
                cols["seg"].append(s)
                cols["w"].append(w_off[first[task] + j])
                cols["b"].append(b_off[first[task] + j])
                cols["r"].append(ranks[task])
                cols["j0"].append(j * ranks[task])
                cols["c0"].append(j * nd)
                cols["n"].append(nd)
        scale = torch.rand(len(cols["seg"]), generator=g) * 2
        with_bias = i % 2 == 0
        args = (
            torch.randn(t_tok, 3 * n, generator=g),
            torch.randn(t_tok, 3 * MAX_RANK, generator=g),
            w,
            _indptr(lengths),
            _i32(cols["seg"]),
            _i64(cols["w"]),
            _i32(cols["r"]),
            _i32(cols["j0"]),
            _i32(cols["c0"]),
            _i32(cols["n"]),
            scale,
            b if with_bias else None,
            _i64(cols["b"]) if with_bias else None,
        )
        yield name, _to(args, device, dtype, keep=(10,))  # item_scale stays float32


# Adapter bottlenecks per task (0: the task has no adapter at this site, plain LayerNorm),
# activations (every ACT_* code) and hidden sizes: multiples of 64 (the CUDA tensor-core
# kernel in 16 bits), of 8 only (136) and ragged (60).
ADAPTER_RANKS = (64, 1, 0, 16, 33, 2, 8)
ADAPTER_ACTS = (ref.ACT_GELU, ref.ACT_RELU, ref.ACT_SILU, ref.ACT_GELU_TANH, ref.ACT_NONE)
ADAPTER_WIDTHS = (64, 60, 136, 128)
# seg_w_off of a rank-0 task: never read (the spec reads the pool only where rank > 0)
UNUSED_W_OFF = (-1, 2**40, -7, 0)


def adapter_pool(
    ranks: list[int], n: int, g: torch.Generator, aligned: bool
) -> tuple[torch.Tensor, list[list[int]]]:
    """Flat pool of each task's down.w [r, N], down.b [r], up.w [N, r], up.b [N], with gaps:
    every offset a multiple of 8 (``aligned``) or arbitrary. Returns (pool, offsets per task)."""
    pieces, offs, cur = [], [], 0
    for r in ranks:
        if r == 0:
            offs.append(list(UNUSED_W_OFF))
            continue
        parts = (
            torch.randn(r * n, generator=g) * n**-0.5,
            torch.randn(r, generator=g) * 0.5,
            torch.randn(n * r, generator=g) * 0.5 * r**-0.5,
            torch.randn(n, generator=g) * 0.5,
        )
        task = []
        for part in parts:
            pad = -cur % 8 if aligned else 3 + cur % 5
            pieces.append(torch.randn(pad, generator=g))
            task.append(cur + pad)
            pieces.append(part)
            cur += pad + part.numel()
        offs.append(task)
    pieces.append(torch.randn(5, generator=g))
    return torch.cat(pieces), offs


def adapter_args(
    lengths: list[int],
    seg_task: list[int],
    task_ranks: list[int],
    task_acts: list[int],
    n: int,
    max_rank: int,
    g: torch.Generator,
    residual: bool = True,
    aligned: bool = False,
    eps: float = 1e-5,
) -> tuple:
    """adapter_residual_layernorm args (float32, CPU): segment s runs task seg_task[s]."""
    t_tok, n_tasks = sum(lengths), len(task_ranks)
    w, offs = adapter_pool(task_ranks, n, g, aligned)
    return (
        torch.randn(t_tok, n, generator=g) * 1.5,
        torch.randn(t_tok, n, generator=g) if residual else None,
        torch.randn(n_tasks, n, generator=g) * 0.5,
        _i32(seg_task),
        w,
        _i64([o for t in seg_task for o in offs[t]]).view(-1, 4),
        _i32([task_ranks[t] for t in seg_task]),
        _i32([task_acts[t] for t in seg_task]),
        torch.rand(n_tasks, n, generator=g) + 0.5,
        torch.randn(n_tasks, n, generator=g) * 0.5,
        _indptr(lengths),
        _i32([(t + 1) % n_tasks for t in seg_task]),  # LayerNorm rows differ from bias rows
        max_rank,
        eps,
    )


def sample_inputs_adapter_residual_layernorm(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    for i, (name, lengths, slots, n_tasks, g) in enumerate(layouts(7)):
        n = ADAPTER_WIDTHS[i % (2 if len(lengths) > 100 else 4)]  # 256 segments: narrow rows
        ranks = [ADAPTER_RANKS[(t + i) % len(ADAPTER_RANKS)] for t in range(n_tasks)]
        acts = [ADAPTER_ACTS[(t + i) % len(ADAPTER_ACTS)] for t in range(n_tasks)]
        args = adapter_args(
            lengths,
            slots,
            ranks,
            acts,
            n,
            MAX_RANK,
            g,
            residual=i % 3 != 2,
            aligned=i % 2 == 0,
            eps=1e-12 if i % 2 else 1e-5,
        )
        used = sorted({ranks[t] for t in slots})
        yield f"{name}-n{n}-r{'.'.join(map(str, used))}", _to(args, device, dtype)


def _sliced_pool(n_tasks: int, n: int, k: int, g: torch.Generator, i: int):
    """Random matrices in seg_spmm's sliced ELL, built entry by entry (not with the packer the
    engine uses): each 32-row slice as wide as its longest row (one task's slices one entry
    wider still: a column of padding), padding index ``k``, and junk indices in the rows past
    ``n`` of the last slice (the ops must ignore them)."""
    slice_ptr, indices, offs = [], [], []
    n_sl = (n + 31) // 32
    for t in range(n_tasks):
        mask = torch.rand(n, k, generator=g) < DENSITIES[(t + i) % len(DENSITIES)]
        offs.append(len(slice_ptr))
        extra = 1 if t == 1 else 0
        for s in range(n_sl):
            slice_ptr.append(len(indices))
            cols = [
                mask[o].nonzero().flatten().tolist() if o < n else [(3 * o) % k]
                for o in range(32 * s, 32 * s + 32)
            ]
            width = max(len(c) for c in cols) + extra
            for j in range(width):
                indices.extend(c[j] if j < len(c) else k for c in cols)
        slice_ptr.append(len(indices))
    return _i64(slice_ptr), torch.tensor(indices, dtype=torch.int16), offs, len(indices)


def sample_inputs_seg_spmm(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    cases = list(layouts(5))
    # wide inputs: fewer tokens per staged tile on CUDA (16-bit / fp32: 16 / 8 tokens at
    # K=1600, 8 / 4 at 3200, 4 / 2 at 8192, where a tile row is less than one 16-byte vector)
    wide = [
        (f"wide_k{k}-one_segment", [19], [0], 1, torch.Generator().manual_seed(k))
        for k in (1600, 3200, 8192)
    ]
    # rows that are not whole 16-byte vectors (16-bit K=70): the CUDA tile is staged element
    # by element instead of in vectors
    odd = [("odd_k70-two_segments", [5, 19], [0, 1], 2, torch.Generator().manual_seed(70))]
    for i, (name, lengths, slots, n_tasks, g) in enumerate([*cases, *wide, *odd]):
        n = 48
        k = int(name.split("-")[0].split("_k")[1]) if "_k" in name.split("-")[0] else 72
        slice_ptr, indices, offs, nnz = _sliced_pool(n_tasks, n, k, g, i)
        t_tok = sum(lengths)
        args = (
            torch.randn(t_tok, n, generator=g),
            torch.randn(t_tok, k, generator=g),
            _indptr(lengths),
            _i32(list(range(len(lengths)))),
            _i64([offs[s] for s in slots]),
            slice_ptr,
            indices,
            torch.randn(nnz + 2, generator=g),
        )
        yield name, _to(args, device, dtype)


# (N, K) of the seg_masked_mm samples: aligned rows; a column tile past 128 (two CUDA column
# tiles); widths that are not multiples of 8 (scalar loads and stores) or of 32 (a partial
# last mask word).
MASKED_SHAPES = ((48, 64), (136, 72), (50, 45))


def sample_inputs_seg_masked_mm(device: str, dtype: torch.dtype) -> Iterator[Sample]:
    long = ("long-uniform", [70, 3, 130, 64], [0, 1, 0, 2], 3, torch.Generator().manual_seed(9))
    cases = [
        (case, MASKED_SHAPES[i % len(MASKED_SHAPES)]) for i, case in enumerate([*layouts(6), long])
    ]
    # few tiles over a deep K: on 16-bit CUDA the K chunks of a tile are split over several
    # blocks whose partials the last one sums (K=2088: 33 chunks, the last chunk and mask word
    # partial; K=4096: 64 chunks, one token)
    deep = [
        (("deep-two_segments", [70, 3], [0, 1], 2, torch.Generator().manual_seed(11)), (136, 2088)),
        (("deep-one_token", [1], [0], 1, torch.Generator().manual_seed(12)), (72, 4096)),
    ]
    for i, ((name, lengths, slots, n_tasks, g), (n, k)) in enumerate([*cases, *deep]):
        pool, offs = [torch.randint(-(2**31), 2**31 - 1, (7,), generator=g, dtype=torch.int32)], []
        for t in range(n_tasks):
            density = (*DENSITIES, 0.5, 1.0)[(t + i) % (len(DENSITIES) + 2)]
            keep = torch.rand(n, k, generator=g) < density
            offs.append(sum(p.numel() for p in pool))
            pool += [ref.pack_mask_words(keep), _i32([-1, 0, 5])]  # gaps: arbitrary offsets
        no_mask = n_tasks > 1 and i % 2 == 1  # the last task has no mask at this site
        item_off = [-1 if no_mask and s == n_tasks - 1 else offs[s] for s in slots]
        args = (
            torch.randn(sum(lengths), n, generator=g),
            torch.randn(sum(lengths), k, generator=g),
            _indptr(lengths),
            _i32(list(range(len(lengths)))),
            _i64(item_off),
            torch.cat(pool),
            torch.randn(n, k, generator=g) * 0.2,
            -1.0 if i % 3 else 0.5,
        )
        yield f"{name}-n{n}-k{k}{'-unmasked_task' if no_mask else ''}", _to(args, device, dtype)


SAMPLES = {
    "bias_act": sample_inputs_bias_act,
    "bias_residual_layernorm": sample_inputs_bias_residual_layernorm,
    "sgmv_shrink": sample_inputs_sgmv_shrink,
    "sgmv_expand": sample_inputs_sgmv_expand,
    "adapter_residual_layernorm": sample_inputs_adapter_residual_layernorm,
    "seg_spmm": sample_inputs_seg_spmm,
    "seg_masked_mm": sample_inputs_seg_masked_mm,
}
# ops that accumulate into their first argument
INPLACE = {"sgmv_expand", "seg_spmm", "seg_masked_mm"}
