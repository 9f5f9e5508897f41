"""Benchmark the grouped petops kernels against per-task loops of plain torch ops.

For 1/8/64/256 segments (random lengths 16-128, one distinct task each) and bert-base shapes,
each PET site is timed three ways: the grouped op (one launch for all tasks), a per-task
Python loop of plain torch ops, and the shared GEMM of that site (``x @ W.T`` over all tokens);
the PET-op cost is reported as a share of the GEMM. Sites: LoRA r=16 on one H x H projection
(``lora_r16``) and on query+value at the fused QKV GEMM (``lora_qv_r16_qkv``, PEFT's default
for BERT); a bottleneck adapter r=64 against the attention-output (H x H) and the FFN-output
(4H -> H) GEMMs it follows; BitFit's bias+GELU (FFN up) and bias+residual+LayerNorm (FFN
down); Diff-Pruning 1% and MaskBERT 5% on an H x H weight (MaskBERT as the engine keeps it at
that density, a bit mask through ``seg_masked_mm``, and as an index set with the weight's
values through ``seg_spmm``: ``mask_5pct_index``). On CUDA the per-task loop is also spread
round-robin over N streams (PetS's multi-stream option). Prints CSV; writes CSV + PNG to --out.

Two clocks on CUDA: ``ms`` brackets one eager call with events, so it includes the host's
dispatch time whenever that exceeds the GPU work (small batches); ``gpu_ms`` replays the call
captured in a CUDA graph (``--graph-iters`` calls per replay), which leaves only device time,
the cost the op adds once the stream is kept busy (the engine enqueues whole layers ahead).
``share_of_gemm`` compares ``gpu_ms`` on CUDA. LoRA and adapter sites also get a
``memory_floor`` row: ``y += x`` over the same tokens moves the bytes every unfused
implementation must move (read x, read and write y), so no separate kernel can beat it.
Adapter sites are also timed as whole output sites (bias, adapter, residual, LayerNorm):
``shared_epilogue`` is the plain LayerNorm epilogue every task runs, ``unfused_site`` the
four-launch path and ``fused_site`` ``adapter_residual_layernorm``; ``*_over_epilogue`` rows
are their cost beyond the plain epilogue, the adapter's true share of the site. The CSV and
plot go to a dated run folder under ``--out`` (``clients/bench/results.py``).

    python -m clients.bench.bench_ops                             # CUDA if present, else CPU
    python -m clients.bench.bench_ops --device cpu --segments 1,8 --out /tmp/runs
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import petops
from clients.bench.results import add_out_argument, pyplot, start_run
from petops import ops
from petops.reference import pack_mask_words, pack_sliced_ell, spmm_slices

FIELDS = [
    "device",
    "dtype",
    "backend",
    "segments",
    "tokens",
    "site",
    "variant",
    "ms",
    "gpu_ms",
    "share_of_gemm",
    "loop_over_grouped",
]


def timeit(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on the current stream, else wall clock)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_time(fn: Callable[[], object], iters: int, repeats: int) -> float | None:
    """Median device milliseconds per call of ``fn`` replayed from a CUDA graph, or None when
    ``fn`` cannot be captured (it synchronises with the host)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: allocator and lazy init settle
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def on_streams(fns: list[Callable[[], object]], streams: list[torch.cuda.Stream]) -> None:
    """Run per-task closures round-robin over ``streams``, joined back to the current stream."""
    cur = torch.cuda.current_stream()
    for s in streams:
        s.wait_stream(cur)
    for i, fn in enumerate(fns):
        with torch.cuda.stream(streams[i % len(streams)]):
            fn()
    for s in streams:
        cur.wait_stream(s)


class Batch:
    """Packed tokens of S segments (one distinct task per segment) plus grouped metadata."""

    def __init__(self, n_seg: int, lens: tuple[int, int], hidden: int, dev, dtype, g):
        lengths = torch.randint(lens[0], lens[1] + 1, (n_seg,), generator=g)
        self.indptr_cpu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        self.rows = [
            slice(int(a), int(b))
            for a, b in zip(self.indptr_cpu[:-1], self.indptr_cpu[1:], strict=True)
        ]
        self.tokens = int(self.indptr_cpu[-1])
        self.indptr = self.indptr_cpu.to(dev, torch.int32)
        self.seg = torch.arange(n_seg, device=dev, dtype=torch.int32)
        self.x = torch.randn(self.tokens, hidden, device=dev, dtype=dtype, generator=None)


def lora_like(b: Batch, rank: int, hidden: int, dev, dtype, adapter: bool):
    """(grouped, loop closures) for y += up(act(down(x) + b_d)) + b_u (adapter) or LoRA."""
    n = len(b.rows)
    a = torch.randn(n, rank, hidden, device=dev, dtype=dtype) * hidden**-0.5
    bm = torch.randn(n, hidden, rank, device=dev, dtype=dtype) * rank**-0.5
    bd = torch.randn(n, rank, device=dev, dtype=dtype) if adapter else None
    bu = torch.randn(n, hidden, device=dev, dtype=dtype) if adapter else None
    y = torch.zeros(b.tokens, hidden, device=dev, dtype=dtype)
    floor = lambda: y.add_(b.x)  # noqa: E731  the bytes any unfused y += f(x) must move
    # Metadata is built once per batch (the engine reuses it across layers), not timed.
    ar = torch.arange(n, device=dev, dtype=torch.int64)
    rank_t = torch.full((n,), rank, device=dev, dtype=torch.int32)
    zeros = torch.zeros(n, device=dev, dtype=torch.int32)
    a_off, b_off, out_dim = ar * rank * hidden, ar * hidden * rank, torch.full_like(zeros, hidden)
    scale = torch.ones(n, device=dev)
    bd_off, bu_off = (ar * rank, ar * hidden) if adapter else (None, None)
    a_flat, bm_flat = a.view(-1), bm.view(-1)
    bd_flat, bu_flat = (bd.view(-1), bu.view(-1)) if adapter else (None, None)
    act = 1 if adapter else 0

    def grouped() -> None:
        tmp = ops.sgmv_shrink(
            b.x, a_flat, b.indptr, b.seg, a_off, rank_t, bd_flat, bd_off, act, rank
        )
        ops.sgmv_expand(
            y,
            tmp,
            bm_flat,
            b.indptr,
            b.seg,
            b_off,
            rank_t,
            zeros,
            zeros,
            out_dim,
            scale,
            bu_flat,
            bu_off,
        )

    def task(i: int) -> Callable[[], None]:
        r = b.rows[i]

        def run() -> None:
            h = b.x[r] @ a[i].T
            if adapter:
                h = F.gelu(h + bd[i])
                y[r] += h @ bm[i].T + bu[i]
            else:
                y[r] += h @ bm[i].T

        return run

    if not adapter:
        return grouped, [task(i) for i in range(n)], None, floor, {}
    # The whole output site (bias, adapter, residual, LayerNorm): the plain epilogue every
    # task pays, the unfused engine path, and the fused op on one pool of the same weights.
    res = torch.randn(b.tokens, hidden, device=dev, dtype=dtype)
    bias = torch.randn(1, hidden, device=dev, dtype=dtype)
    gamma, beta = torch.ones(1, hidden, device=dev, dtype=dtype), bias.clone()
    zs = torch.zeros(n, device=dev, dtype=torch.int32)
    pool = torch.cat([a_flat, bd_flat, bm_flat, bu_flat])
    starts = torch.tensor([0, a_flat.numel(), a_flat.numel() + bd_flat.numel()], device=dev)
    starts = torch.cat([starts, starts[-1:] + bm_flat.numel()])
    seg_w_off = torch.stack([a_off, bd_off, b_off, bu_off], 1) + starts[None, :]
    seg_act = torch.full_like(zs, act)

    def epilogue() -> torch.Tensor:
        return ops.bias_residual_layernorm(y, res, bias, gamma, beta, b.indptr, zs, zs, 1e-12)

    def unfused() -> torch.Tensor:
        h = ops.bias_act(y, bias, b.indptr, zs, None, None, 0)
        tmp = ops.sgmv_shrink(h, a_flat, b.indptr, b.seg, a_off, rank_t, bd_flat, bd_off, act, rank)
        ops.sgmv_expand(
            h, tmp, bm_flat, b.indptr, b.seg, b_off, rank_t, zeros, zeros, out_dim, scale,
            bu_flat, bu_off,
        )  # fmt: skip
        return ops.bias_residual_layernorm(h, res, None, gamma, beta, b.indptr, None, zs, 1e-12)

    def fused() -> torch.Tensor:
        return ops.adapter_residual_layernorm(
            y, res, bias, zs, pool, seg_w_off, rank_t, seg_act, gamma, beta, b.indptr, zs,
            rank, 1e-12,
        )  # fmt: skip

    sites = {"unfused_site": unfused, "fused_site": fused}
    return grouped, [task(i) for i in range(n)], epilogue, floor, sites


def lora_qv(b: Batch, rank: int, hidden: int, dev, dtype):
    """LoRA on query and value (PEFT's default for BERT) at the fused QKV site ``[T, 3H]``:
    one shrink item per segment over the stacked ``[A_q; A_v]`` (rank ``2r``), two expand items
    writing the q and v column blocks."""
    n = len(b.rows)
    a = torch.randn(n, 2 * rank, hidden, device=dev, dtype=dtype) * hidden**-0.5
    bm = torch.randn(n, 2, hidden, rank, device=dev, dtype=dtype) * rank**-0.5
    y = torch.zeros(b.tokens, 3 * hidden, device=dev, dtype=dtype)
    ar = torch.arange(n, device=dev, dtype=torch.int64)
    i32 = dict(device=dev, dtype=torch.int32)
    rank2 = torch.full((n,), 2 * rank, **i32)
    seg2 = torch.cat([b.seg, b.seg])
    b_off = torch.cat([ar * 2 + 0, ar * 2 + 1]) * hidden * rank
    e_rank = torch.full((2 * n,), rank, **i32)
    in_off = torch.cat([torch.zeros(n, **i32), torch.full((n,), rank, **i32)])
    out_off = torch.cat([torch.zeros(n, **i32), torch.full((n,), 2 * hidden, **i32)])
    out_dim, scale = torch.full((2 * n,), hidden, **i32), torch.ones(2 * n, device=dev)
    a_flat, bm_flat, a_off = a.view(-1), bm.view(-1), ar * 2 * rank * hidden

    def grouped() -> None:
        tmp = ops.sgmv_shrink(b.x, a_flat, b.indptr, b.seg, a_off, rank2, None, None, 0, 2 * rank)
        ops.sgmv_expand(
            y,
            tmp,
            bm_flat,
            b.indptr,
            seg2,
            b_off,
            e_rank,
            in_off,
            out_off,
            out_dim,
            scale,
            None,
            None,
        )

    def task(i: int) -> Callable[[], None]:
        r = b.rows[i]

        def run() -> None:
            h = b.x[r] @ a[i].T
            y[r, :hidden] += h[:, :rank] @ bm[i, 0].T
            y[r, 2 * hidden :] += h[:, rank:] @ bm[i, 1].T

        return run

    return grouped, [task(i) for i in range(n)], None, None, {}


def bitfit_ffn(b: Batch, ffn: int, dev, dtype):
    n = len(b.rows)
    y = torch.randn(b.tokens, ffn, device=dev, dtype=dtype)
    bias = torch.randn(n, ffn, device=dev, dtype=dtype)
    grouped = lambda: ops.bias_act(y, bias, b.indptr, b.seg, None, None, 1)  # noqa: E731
    shared = lambda: F.gelu(y + bias[0])  # noqa: E731
    loop = [(lambda r=r, i=i: F.gelu(y[r] + bias[i])) for i, r in enumerate(b.rows)]
    return grouped, loop, shared, None, {}


def bitfit_ln(b: Batch, hidden: int, dev, dtype):
    n = len(b.rows)
    y, res = (torch.randn(b.tokens, hidden, device=dev, dtype=dtype) for _ in range(2))
    bias, gamma, beta = (torch.randn(n, hidden, device=dev, dtype=dtype) for _ in range(3))

    def grouped():
        return ops.bias_residual_layernorm(y, res, bias, gamma, beta, b.indptr, b.seg, b.seg, 1e-12)

    def shared():
        return F.layer_norm(y + bias[0] + res, (hidden,), gamma[0], beta[0], 1e-12)

    loop = [
        (
            lambda r=r, i=i: F.layer_norm(
                y[r] + bias[i] + res[r], (hidden,), gamma[i], beta[i], 1e-12
            )
        )
        for i, r in enumerate(b.rows)
    ]
    return grouped, loop, shared, None, {}


def sparse_site(
    b: Batch, hidden: int, density: float, masked: bool, dev, dtype, bitmask: bool = False
):
    """Diff-Pruning (random values) or MaskBERT (minus the weight's values) delta of an H x H
    weight.

    MaskBERT's grouped op is ``seg_spmm`` over the masked-out index set (sliced ELL, with the
    weight's values there, as the engine keeps it), or with ``bitmask`` ``seg_masked_mm``
    over the same set as a bit mask (the engine keeps whichever form is smaller: the bit mask
    above about 2% density in fp16)."""
    n = len(b.rows)
    w = torch.randn(hidden, hidden, device=dev, dtype=dtype) * hidden**-0.5
    masks = torch.rand(n, hidden, hidden, device=dev) < density
    dense = torch.where(masks, -w if masked else torch.randn_like(w) * 0.01, 0).to(dtype)
    parts = []  # one sliced-ELL matrix per task, concatenated into the pools
    for i in range(n):
        r, c = masks[i].nonzero().unbind(1)
        parts.append(pack_sliced_ell(r, c, dense[i][r, c], hidden, hidden))
    base = torch.tensor([0] + [p[1].numel() for p in parts], device=dev).cumsum(0)
    slice_ptr = torch.cat([p[0] + base[i] for i, p in enumerate(parts)])
    indices = torch.cat([p[1] for p in parts])
    values = torch.cat([p[2] for p in parts if p[2] is not None])
    y = torch.zeros(b.tokens, hidden, device=dev, dtype=dtype)
    off = torch.arange(n, device=dev, dtype=torch.long) * (spmm_slices(hidden) + 1)
    words = torch.cat([pack_mask_words(m) for m in masks])
    word_off = torch.arange(n, device=dev, dtype=torch.long) * (words.numel() // max(1, n))

    def grouped() -> None:
        if bitmask:
            ops.seg_masked_mm(y, b.x, b.indptr, b.seg, word_off, words, w, -1.0)
            return
        ops.seg_spmm(y, b.x, b.indptr, b.seg, off, slice_ptr, indices, values)

    def task(i: int) -> Callable[[], None]:
        r = b.rows[i]

        def run() -> None:
            y[r] += b.x[r] @ dense[i].T

        return run

    return grouped, [task(i) for i in range(n)], None, None, {}


def run(args: argparse.Namespace) -> list[dict]:
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    cuda = dev.type == "cuda"

    def t(fn: Callable[[], object], graph: bool = True) -> tuple[float, float | None]:
        eager = timeit(fn, dev, args.warmup, args.repeats)
        gpu = graph_time(fn, args.graph_iters, args.repeats) if cuda and graph else None
        return eager, gpu

    rows: list[dict] = []
    for n_seg in args.segments:
        b = Batch(n_seg, args.lengths, args.hidden, dev, dtype, g)
        w_h = torch.randn(args.hidden, args.hidden, device=dev, dtype=dtype)
        w_qkv = torch.randn(3 * args.hidden, args.hidden, device=dev, dtype=dtype)
        w_up = torch.randn(args.ffn, args.hidden, device=dev, dtype=dtype)
        x_ffn = torch.randn(b.tokens, args.ffn, device=dev, dtype=dtype)
        gemm_h = t(lambda: b.x @ w_h.T)  # noqa: B023
        gemm_qkv = t(lambda: b.x @ w_qkv.T)  # noqa: B023
        gemm_up = t(lambda: b.x @ w_up.T)  # noqa: B023
        gemm_down = t(lambda: x_ffn @ w_up)  # noqa: B023  [T, FFN] @ [FFN, H]
        sites = {
            "lora_r16": (*lora_like(b, 16, args.hidden, dev, dtype, False), gemm_h),
            "lora_qv_r16_qkv": (*lora_qv(b, 16, args.hidden, dev, dtype), gemm_qkv),
            "adapter_r64": (*lora_like(b, 64, args.hidden, dev, dtype, True), gemm_h),
            # the same adapter against the FFN-output site's GEMM (Houlsby/Pfeiffer placement)
            "adapter_r64_ffn_out": (*lora_like(b, 64, args.hidden, dev, dtype, True), gemm_down),
            "bitfit_bias_gelu": (*bitfit_ffn(b, args.ffn, dev, dtype), gemm_up),
            "bitfit_bias_res_ln": (*bitfit_ln(b, args.hidden, dev, dtype), gemm_down),
            "diff_1pct": (*sparse_site(b, args.hidden, 0.01, False, dev, dtype), gemm_h),
            "mask_5pct": (*sparse_site(b, args.hidden, 0.05, True, dev, dtype, True), gemm_h),
            "mask_5pct_index": (*sparse_site(b, args.hidden, 0.05, True, dev, dtype), gemm_h),
        }
        base = {
            "device": dev.type,
            "dtype": args.dtype,
            "backend": petops.backend_name(),
            "segments": n_seg,
            "tokens": b.tokens,
        }

        def add(
            site: str,
            variant: str,
            ms: tuple[float, float | None],
            gemm: tuple[float, float | None],
            grouped: tuple[float, float | None],
        ) -> None:
            # The share uses device time where both sides have it, else eager time.
            share = ms[1] / gemm[1] if ms[1] and gemm[1] else ms[0] / gemm[0]
            rows.append(
                {
                    **base,  # noqa: B023
                    "site": site,
                    "variant": variant,
                    "ms": round(ms[0], 4),
                    "gpu_ms": None if ms[1] is None else round(ms[1], 4),
                    "share_of_gemm": round(share, 4),
                    "loop_over_grouped": round(ms[0] / grouped[0], 3),
                }
            )

        for site, (grouped, loop, shared, floor, whole, gemm) in sites.items():
            g_ms = t(grouped)
            add(site, "shared_gemm", gemm, gemm, g_ms)
            add(site, "grouped", g_ms, gemm, g_ms)
            add(site, "per_task_loop", t(lambda loop=loop: [f() for f in loop]), gemm, g_ms)
            if shared is not None:
                e_ms = t(shared)
                add(site, "shared_epilogue", e_ms, gemm, g_ms)
                for name, fn in whole.items():  # whole output sites, epilogue included
                    w_ms = t(fn)
                    add(site, name, w_ms, gemm, g_ms)
                    # the PET cost of the whole site: what it adds to the plain epilogue
                    extra = tuple(None if a is None or c is None else a - c
                                  for a, c in zip(w_ms, e_ms, strict=True))  # fmt: skip
                    add(site, f"{name}_over_epilogue", extra, gemm, g_ms)  # type: ignore[arg-type]
            if floor is not None:
                add(site, "memory_floor", t(floor), gemm, g_ms)
            if cuda and site in ("lora_r16", "adapter_r64", "diff_1pct"):
                for n_streams in args.streams:
                    streams = [torch.cuda.Stream() for _ in range(n_streams)]
                    ms = t(lambda loop=loop, streams=streams: on_streams(loop, streams), False)
                    add(site, f"loop_{n_streams}_streams", ms, gemm, g_ms)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    sites = list(dict.fromkeys(r["site"] for r in rows))
    fig, axes = plt.subplots(2, (len(sites) + 1) // 2, figsize=(5 * ((len(sites) + 1) // 2), 8))
    for ax, site in zip(axes.flat, sites, strict=False):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["site"] == site):
            pts = [
                (r["segments"], r["ms"])
                for r in rows
                if r["site"] == site and r["variant"] == variant
            ]
            ax.plot(*zip(*pts, strict=True), marker="o", label=variant)
        ax.set(title=site, xscale="log", yscale="log", xlabel="segments (tasks)", ylabel="ms")
        ax.legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(
        f"petops grouped vs per-task loop ({r0['device']}, {r0['dtype']}, {r0['backend']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default=None, help="float16 on CUDA, float32 on CPU")
    p.add_argument("--segments", default=None, help="comma list; default 1,8,64,256 (CPU 1,8,32)")
    p.add_argument("--lengths", default=None, help="min,max tokens per segment (16,128; CPU 4,32)")
    p.add_argument("--hidden", type=int, default=None, help="768 (CPU 256)")
    p.add_argument("--ffn", type=int, default=None, help="3072 (CPU 1024)")
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=None, help="20 (CPU 5)")
    p.add_argument("--graph-iters", type=int, default=20, help="calls per CUDA-graph replay")
    add_out_argument(p)
    a = p.parse_args()
    on_gpu = a.device.startswith("cuda")
    a.dtype = a.dtype or ("float16" if on_gpu else "float32")
    a.segments = [int(s) for s in (a.segments or ("1,8,64,256" if on_gpu else "1,8,32")).split(",")]
    a.lengths = tuple(int(v) for v in (a.lengths or ("16,128" if on_gpu else "4,32")).split(","))
    a.hidden = a.hidden or (768 if on_gpu else 256)
    a.ffn = a.ffn or (3072 if on_gpu else 1024)
    a.repeats = a.repeats or (20 if on_gpu else 5)
    a.streams = [int(s) for s in a.streams.split(",")]
    out = start_run("bench_ops", a.out, params=vars(a))
    out.update(backend=petops.backend_name())
    rows = run(a)
    out.write_csv("bench_ops.csv", rows, FIELDS)
    w = csv.DictWriter(sys.stdout, FIELDS)
    w.writeheader()
    w.writerows(rows)
    plot(rows, out.path("bench_ops.png"))
    out.finish()


if __name__ == "__main__":
    main()
