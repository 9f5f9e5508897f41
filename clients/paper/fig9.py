"""PetS Fig. 9: where a forward's time goes, PET (shadow) operators vs the shared ones.

For every PET type (``--pet-types``, default all) and configuration (the artifact's
``breakdown``: 8 tasks with ``bs=1 x 64`` and ``bs=2 x 32`` tokens; plus 64 tasks x 64
tokens), a batch of that type's tasks is profiled with ``torch.profiler`` over ``--iters``
forwards. The harness wraps the encoder's own steps in ``record_function`` ranges (on the
engine instance only; nothing in the engine changes) and charges each kernel's device time
(CUDA) or each operator's own CPU time (CPU) to the innermost range that launched it:

* ``gemm``: the shared GEMM of a site (``_linear`` less its shadow ops);
* ``attention``: the shared attention;
* ``epilogue``: bias / activation / LayerNorm with per-task rows, embeddings, heads (BitFit
  and IA3 live here: their task work is a per-segment row of these fused ops);
* ``pet``: the shadow ops, per site (LoRA / adapters / Diff-Pruning / MaskBERT products; an
  adapter site whose whole output runs as one fused op is charged here in full);
* ``prepare``: the batch's host-to-device uploads; ``other``: kernels of no range.

Writes ``fig9.csv`` (category totals), ``fig9_sites.csv`` (PET time per site) and
``fig9.png`` (stacked bars, one panel per configuration) (``clients/bench/results.py``).

    python -m clients.paper fig9
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from clients.bench.results import Run, pyplot, start_run
from clients.paper.common import (
    Loaded,
    add_common,
    annotate,
    describe,
    load_engine,
    parse_types,
    pets_batch,
    random_ids,
    torch_dtype,
)
from pets.encoder import SharedEncoder

CATEGORIES = ("gemm", "attention", "epilogue", "pet", "prepare", "other")
COLORS = dict(zip(CATEGORIES, ("C0", "C1", "C2", "C3", "C4", "C7"), strict=True))
PAPER = (
    "Fig. 9 (8 tasks, bs1x64 and bs2x32, 1 stream): PET operators take only a small "
    "portion of the execution time (artifact README; the paper's percentages were not found)"
)


@contextlib.contextmanager
def instrumented(enc: SharedEncoder) -> Iterator[None]:
    """Wrap ``enc``'s steps in ``pets/<category>[/<site>]`` profiler ranges (instance
    attributes, removed on exit)."""
    site = {"now": ""}
    patched: list[tuple[Any, str]] = []

    def wrap(obj: Any, attr: str, label: Any) -> None:
        orig = getattr(obj, attr)

        def call(*a: Any, **kw: Any) -> Any:
            with record_function(label(*a) if callable(label) else label):
                return orig(*a, **kw)

        setattr(obj, attr, call)
        patched.append((obj, attr))

    def linear_label(s: str, *_: Any) -> str:
        site["now"] = s
        return f"pets/gemm/{s}"

    def output_label(s: str, *_: Any) -> str:
        site["now"] = f"{s}_out"
        return "pets/epilogue"

    wrap(enc, "prepare", "pets/prepare")
    wrap(enc, "_embed", "pets/epilogue")
    wrap(enc, "_layer", "pets/epilogue")
    wrap(enc, "_linear", linear_label)
    wrap(enc, "_output", output_label)
    wrap(enc, "_attention", "pets/attention")
    wrap(enc, "_shadow", lambda *_: f"pets/pet/{site['now']}")
    wrap(enc.heads, "compute", "pets/epilogue")
    for method in enc.registry.methods.values():
        wrap(method, "fused_output", lambda _p, s, *_: f"pets/pet/{s}_out")
    try:
        yield
    finally:
        for obj, attr in patched:
            delattr(obj, attr)


def _range(ev: Any) -> str:
    """The innermost ``pets/`` range at or above ``ev``; ``other`` if none."""
    while ev is not None:
        if ev.name.startswith("pets/"):
            return str(ev.name)
        ev = ev.cpu_parent
    return "other"


def device_total(events: Any) -> float:
    """Device microseconds of the kernels, copies and fills among profiler ``events``.

    Each ``pets/`` range also appears on the device timeline as a span of its own (a
    ``gpu_user_annotation`` from first to last kernel, gaps included); the ranges nest, so
    counting those spans would charge the same kernels several times over to ``other``.
    """
    return sum(
        ev.device_time
        for ev in events
        if ev.device_type == torch.autograd.DeviceType.CUDA and not ev.name.startswith("pets/")
    )


def breakdown(loaded: Loaded, batch: Any, iters: int, warmup: int) -> dict[str, float]:
    """Microseconds per forward charged to each ``pets/...`` range (and ``total``)."""
    enc, cuda = loaded.engine.encoder, loaded.device.type == "cuda"
    for _ in range(warmup):
        enc.forward(batch)
    if cuda:
        torch.cuda.synchronize(loaded.device)
    acts = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with instrumented(enc), profile(activities=acts) as prof:
        for _ in range(iters):
            enc.forward(batch)
        if cuda:
            torch.cuda.synchronize(loaded.device)
    charged: dict[str, float] = defaultdict(float)
    total = device_total(prof.events()) if cuda else 0.0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CPU:
            cost = sum(k.duration for k in ev.kernels) if cuda else ev.self_cpu_time_total
            if cost:
                charged[_range(ev)] += cost
    if not cuda:
        total = sum(charged.values())
    charged["other"] += max(0.0, total - sum(charged.values()))
    out = {k: v / iters for k, v in charged.items()}
    out["total"] = total / iters
    return out


def add_args(ap: argparse.ArgumentParser) -> None:
    add_common(ap)
    ap.add_argument("--pet-types", default="all", help="paper, all (default), or a list")
    ap.add_argument(
        "--configs",
        default=None,
        help="TASKSxBSxSEQ list (default 8x1x64,8x2x32,64x1x64)",
    )


def run(args: argparse.Namespace, out: Run) -> dict[str, Any]:
    spec = args.configs or ("2x1x16,4x1x8" if args.quick else "8x1x64,8x2x32,64x1x64")
    try:
        configs = [tuple(int(v) for v in c.split("x")) for c in spec.split(",") if c]
        assert configs and all(len(c) == 3 and min(c) >= 1 for c in configs)
    except (ValueError, AssertionError):
        raise SystemExit(f"--configs {spec!r}: expected TASKSxBSxSEQ,... e.g. 8x1x64") from None
    types = parse_types(args.pet_types)
    loaded = load_engine(args.model, args.device, args.dtype)
    device, dtype = loaded.device, torch_dtype(args.dtype, loaded.device)
    n_max = max(c[0] for c in configs)
    by_type = {t: [loaded.add(t, seed=args.seed + k) for k in range(n_max)] for t in types}
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, Any]] = []
    sites: list[dict[str, Any]] = []
    for n, bs, seq in configs:
        label = f"{n} tasks, bs{bs}x{seq}"
        for t in types:
            owner = [by_type[t][k] for k in range(n) for _ in range(bs)]
            ids = random_ids(rng, len(owner), seq, loaded.engine.spec.vocab)
            us = breakdown(loaded, pets_batch(loaded, ids, owner), args.iters, args.warmup)
            cat: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
            for rng_name, v in us.items():
                if rng_name == "total":
                    continue
                parts = rng_name.split("/")
                cat[parts[1] if len(parts) > 1 else "other"] += v
                if len(parts) == 3 and parts[1] == "pet":
                    sites.append(
                        {
                            "config": label,
                            "pet_type": t,
                            "site": parts[2],
                            "us_per_forward": round(v, 2),
                        }
                    )
            total = us["total"] or 1.0
            rows.append(
                {
                    "config": label,
                    "tasks": n,
                    "bs": bs,
                    "seq_len": seq,
                    "pet_type": t,
                    "total_us": round(us["total"], 2),
                    **{f"{c}_us": round(cat[c], 2) for c in CATEGORIES},
                    **{f"{c}_share": round(cat[c] / total, 4) for c in CATEGORIES},
                }
            )
            print(
                f"fig9 {label} {t}: pet {100 * cat['pet'] / total:.1f}% of {us['total']:.0f} us",
                flush=True,
            )
    out.write_csv("fig9.csv", rows)
    out.write_csv("fig9_sites.csv", sites, ["config", "pet_type", "site", "us_per_forward"])
    first = [r for r in rows if r["config"] == rows[0]["config"]]
    ours = f"{first[0]['config']}: PET share " + ", ".join(
        f"{r['pet_type']} {100 * r['pet_share']:.1f}%" for r in first
    )
    _plot(rows, types, out, describe(args, device, dtype), ours)
    loaded.close()
    return {"rows": rows, "claim": ours}


def _plot(
    rows: list[dict[str, Any]], types: tuple[str, ...], out: Run, title: str, ours: str
) -> None:
    plt = pyplot()
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(
        1,
        len(configs),
        figsize=(0.8 * len(types) * len(configs) + 2, 4.0),
        sharey=True,
        squeeze=False,
    )
    for ax, c in zip(axes[0], configs, strict=True):
        bottom = np.zeros(len(types))
        for cat in CATEGORIES:
            ys = np.array(
                [
                    next(r[f"{cat}_share"] for r in rows if r["config"] == c and r["pet_type"] == t)
                    for t in types
                ]
            )
            ax.bar(
                range(len(types)),
                100 * ys,
                0.7,
                bottom=100 * bottom,
                label=cat,
                color=COLORS[cat],
            )
            bottom += ys
        ax.set_xticks(range(len(types)), types, rotation=30, fontsize=7)
        ax.set_title(c, fontsize=9)
    axes[0][0].set_ylabel("% of forward time")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"Fig. 9: time breakdown, PET (shadow) vs shared ops; {title}", fontsize=9)
    annotate(fig, PAPER, ours)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out.path("fig9.png"), dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_args(ap)
    args = ap.parse_args(argv)
    with start_run("fig9", args.out, params=vars(args)) as out:
        out.update(claim=run(args, out)["claim"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
