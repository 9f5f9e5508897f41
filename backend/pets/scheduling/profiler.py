"""Build a :class:`~pets.scheduling.cost_model.CostTable` from measurements.

``measure(kind, batch_size, seq_len) -> seconds`` is supplied by the engine:
``kind`` is ``"alpha"`` (shared ops, padded), ``"alpha_packed"`` (shared ops of a packed
batch; ``batch_size`` = total tokens, ``seq_len`` ignored) or a pet type (beta: PET ops
of one segment of that type).

Entries are measured round-robin across kinds, each kind in a coarse-to-fine order
(bit-reversed index), so a time budget cut leaves every kind partly measured. Entries not
measured (budget exhausted or ``measure`` raised) are filled from the analytic model,
scaled by the median measured/analytic ratio of their kind, and marked ``False`` in
``CostTable.measured``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pets.errors import ConfigError
from pets.scheduling.analytic import AnalyticModel, FArray
from pets.scheduling.base import PET_TYPES
from pets.scheduling.cost_model import CostTable

Measure = Callable[[str, int, int], float]


@dataclass(frozen=True)
class ProfileGrid:
    """Grid points: batch sizes (queries), lengths (tokens), packed sizes (tokens)."""

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    seq_lens: tuple[int, ...] = (8, 16, 32, 64, 128)
    total_tokens: tuple[int, ...] = (64, 256, 1024, 4096, 16384, 32768)
    beta_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    pet_types: tuple[str, ...] = tuple(t for t in PET_TYPES if t != "none")


def _bitrev_order(n: int) -> list[int]:
    bits = max(1, (n - 1).bit_length())
    return sorted(range(n), key=lambda k: int(f"{k:0{bits}b}"[::-1], 2))


Entry = tuple[str, int, int, tuple[int, ...]]


def _entries(grid: ProfileGrid) -> list[Entry]:
    """(kind, batch_size, seq_len, index in its array), round-robin across kinds."""
    per_kind: list[list[Entry]] = []
    alpha: list[Entry] = [
        ("alpha", b, s, (i, j))
        for i, b in enumerate(grid.batch_sizes)
        for j, s in enumerate(grid.seq_lens)
    ]
    per_kind.append(alpha)
    per_kind.append([("alpha_packed", t, 0, (i,)) for i, t in enumerate(grid.total_tokens)])
    for p in grid.pet_types:
        per_kind.append(
            [
                (p, b, s, (i, j))
                for i, b in enumerate(grid.beta_batch_sizes)
                for j, s in enumerate(grid.seq_lens)
            ]
        )
    ordered = [[k[i] for i in _bitrev_order(len(k))] for k in per_kind if k]
    out: list[Entry] = []
    for r in range(max((len(k) for k in ordered), default=0)):
        out.extend(k[r] for k in ordered if r < len(k))
    return out


class _Progress:
    """tqdm bar if installed, else a line on stderr every ~10%."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done, self.bar = total, enabled, 0, None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="profiling", unit="pt")
            except ImportError:
                self.bar = None

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
            print(f"profiling {self.done}/{self.total} ({label})", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _scale(ratios: list[float]) -> float | None:
    return float(np.median(ratios)) if ratios else None


def profile(
    measure: Measure,
    grid: ProfileGrid | None = None,
    progress: bool = True,
    time_budget_s: float | None = None,
    *,
    analytic: AnalyticModel | None = None,
    device: str = "unknown",
    dtype: str = "float32",
    backbone_fingerprint: str = "",
    meta: dict[str, Any] | None = None,
) -> CostTable:
    """Measure the grid (within ``time_budget_s`` seconds if given) into a CostTable."""
    grid = grid or ProfileGrid()
    base = analytic or AnalyticModel.for_device(device)
    entries = _entries(grid)
    shapes: dict[str, tuple[int, ...]] = {
        "alpha": (len(grid.batch_sizes), len(grid.seq_lens)),
        "alpha_packed": (len(grid.total_tokens),),
    }
    shapes.update({p: (len(grid.beta_batch_sizes), len(grid.seq_lens)) for p in grid.pet_types})
    values = {k: np.full(s, np.nan) for k, s in shapes.items()}
    bar = _Progress(len(entries), progress)
    start = time.perf_counter()
    slowest = 0.0
    failures: list[str] = []
    first_error: Exception | None = None
    stopped_at: int | None = None
    try:
        for n, (kind, b, s, idx) in enumerate(entries):
            elapsed = time.perf_counter() - start
            if time_budget_s is not None and elapsed + slowest > time_budget_s:
                stopped_at = n
                break
            t0 = time.perf_counter()
            try:
                values[kind][idx] = float(measure(kind, b, s))
            except Exception as e:  # e.g. out of memory at a large batch: fill analytically
                failures.append(f"{kind}(b={b}, s={s}): {type(e).__name__}: {e}")
                first_error = first_error or e
            slowest = max(slowest, time.perf_counter() - t0)
            bar.step(f"{kind} b={b} s={s}")
    finally:
        bar.close()
    attempted = len(entries) if stopped_at is None else stopped_at
    if attempted and len(failures) == attempted and first_error is not None:
        raise first_error
    table = _fill(values, grid, base)
    table.device, table.dtype, table.backbone_fingerprint = device, dtype, backbone_fingerprint
    table.meta = {
        **table.meta,
        **(meta or {}),
        "elapsed_s": time.perf_counter() - start,
        "entries": len(entries),
        "attempted": attempted,
        "measured_fraction": table.measured_fraction(),
        "failures": failures[:20],
        "time_budget_s": time_budget_s,
    }
    return table


def _fill(values: dict[str, FArray], grid: ProfileGrid, base: AnalyticModel) -> CostTable:
    b = np.asarray(grid.batch_sizes, dtype=np.float64)[:, None]
    bb = np.asarray(grid.beta_batch_sizes, dtype=np.float64)[:, None]
    s = np.asarray(grid.seq_lens, dtype=np.float64)[None, :]
    model: dict[str, FArray] = {
        "alpha": base.alpha(b, s),
        "alpha_packed": base.alpha_packed(list(grid.total_tokens)),
    }
    model.update({p: base.beta(p, bb, s) for p in grid.pet_types})

    def ratios(kinds: list[str]) -> list[float]:
        out: list[float] = []
        for k in kinds:
            m = ~np.isnan(values[k]) & (model[k] > 0)
            out.extend((values[k][m] / model[k][m]).tolist())
        return out

    a_scale = _scale(ratios(["alpha", "alpha_packed"])) or 1.0
    b_all = _scale(ratios(list(grid.pet_types))) or 1.0
    filled: dict[str, FArray] = {}
    scales: dict[str, float] = {"alpha": a_scale}
    for k, v in values.items():
        sc = a_scale if k.startswith("alpha") else (_scale(ratios([k])) or b_all)
        scales[k] = sc
        filled[k] = np.where(np.isnan(v), model[k] * sc, v)
    measured = {
        (
            "alpha" if k == "alpha" else "alpha_packed" if k == "alpha_packed" else f"beta/{k}"
        ): ~np.isnan(v)
        for k, v in values.items()
    }
    return CostTable(
        batch_sizes=grid.batch_sizes,
        seq_lens=grid.seq_lens,
        alpha_values=filled["alpha"],
        total_tokens=grid.total_tokens,
        alpha_packed_values=filled["alpha_packed"],
        beta_batch_sizes=grid.beta_batch_sizes,
        beta_values={p: filled[p] for p in grid.pet_types},
        measured=measured,
        fallback=base.calibrated(a_scale * base.alpha_scale, b_all * base.beta_scale),
        meta={"fill_scales": scales},
    )


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 1,2,4,8"
        ) from e
    if not vals or any(v < 1 for v in vals) or list(vals) != sorted(set(vals)):
        raise argparse.ArgumentTypeError(f"{text!r}: need increasing positive integers")
    return vals


def add_profile_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the profiler's options (grid, budget, output) to ``parser``."""
    d = ProfileGrid()
    j = ",".join
    g = parser.add_argument_group("cost-model profiling")
    g.add_argument(
        "-o",
        "--output",
        default="cost_table.json",
        help="where to write the JSON cost table (default: %(default)s)",
    )
    for flag, values, what in (
        ("--batch-sizes", d.batch_sizes, "alpha batch sizes"),
        ("--seq-lens", d.seq_lens, "sequence lengths"),
        ("--total-tokens", d.total_tokens, "packed total tokens"),
        ("--beta-batch-sizes", d.beta_batch_sizes, "beta batch sizes"),
    ):
        g.add_argument(
            flag, type=_int_list, default=values, help=f"{what} (default {j(map(str, values))})"
        )
    g.add_argument(
        "--pet-types",
        default=j(d.pet_types),
        help="comma-separated PET types to profile (default %(default)s)",
    )
    g.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop measuring after this long; the rest is filled analytically",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def profile_cli(
    args: argparse.Namespace,
    measure: Measure,
    *,
    device: str = "unknown",
    dtype: str = "float32",
    backbone_fingerprint: str = "",
    analytic: AnalyticModel | None = None,
) -> int:
    """Run :func:`profile` with options from :func:`add_profile_arguments`; 0 on success."""
    types = tuple(t.strip() for t in str(args.pet_types).split(",") if t.strip())
    bad = [t for t in types if t not in PET_TYPES]
    if bad:
        print(
            f"error: unknown --pet-types {', '.join(bad)}; valid: {', '.join(PET_TYPES)}",
            file=sys.stderr,
        )
        return 2
    grid = ProfileGrid(
        tuple(args.batch_sizes),
        tuple(args.seq_lens),
        tuple(args.total_tokens),
        tuple(args.beta_batch_sizes),
        types,
    )
    try:
        table = profile(
            measure,
            grid,
            progress=not args.no_progress,
            time_budget_s=args.time_budget,
            analytic=analytic,
            device=device,
            dtype=dtype,
            backbone_fingerprint=backbone_fingerprint,
        )
        table.save(args.output)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = table.meta
    print(
        f"wrote {args.output}: {m['attempted']}/{m['entries']} entries attempted, "
        f"{100 * m['measured_fraction']:.0f}% measured, {len(m['failures'])} failed, "
        f"{m['elapsed_s']:.1f} s"
    )
    return 0
