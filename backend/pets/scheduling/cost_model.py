"""Cost model of one engine forward: profiled tables (JSON) with an analytic fallback.

Quantities (all in **seconds**; PetS mixed ms and accumulated-ms, we do not):

* ``alpha(b, s)``: shared-op time of ``b`` queries padded to ``s`` tokens (padded path);
* ``alpha_packed(T)``: shared-op time of a packed batch of ``T`` total tokens;
* ``beta(type, b, s)``: PET-op time of one task segment of ``b`` queries of ``type`` at
  length ``s`` (shadow ops + per-task epilogue).

A batch costs ``alpha(B, L) + Σ_segments beta(type, n, L)`` on the padded path and
``alpha_packed(T) + Σ_segments beta(type, n, T_seg/n)`` on the packed path
(:func:`batch_cost`).

**Interpolation** (:class:`CostTable`): bilinear on the (batch, length) grid. Outside the
grid, values are extrapolated *linearly* from the two outermost grid points of each axis
(beyond the last point and before the first), i.e. the bilinear formula with weights
outside ``[0, 1]``; an axis with a single point is constant along it. Results are clamped
at 0 s. ``alpha_packed`` is 1-D linear with the same extrapolation. No caps: PetS returned
``1e10`` past batch 128 (alpha) or 32 (beta); size limits here are explicit scheduler
options instead.

**Fallback**: a pet type absent from the table, or an empty packed grid, is costed by the
table's :class:`~pets.scheduling.analytic.AnalyticModel` (``fallback``); with no table at
all, :func:`load_cost_model` returns the analytic model itself.

**JSON** (``format_version`` 1)::

    {"format_version": 1, "units": "seconds", "device": str, "dtype": str,
     "backbone_fingerprint": str,
     "grid": {"batch_sizes": [int], "seq_lens": [int], "total_tokens": [int],
              "beta_batch_sizes": [int], "pet_types": [str]},
     "values": {"alpha": [[float]] (batch × len), "alpha_packed": [float],
                "beta": {type: [[float]] (beta_batch × len)}},
     "measured": same shapes as "values", booleans (False = filled analytically),
     "fallback": {AnalyticModel fields}, "meta": {...}}
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pets.errors import ConfigError
from pets.scheduling.analytic import AnalyticModel, FArray
from pets.scheduling.base import Query

FORMAT_VERSION = 1


class CostModel(Protocol):
    """What schedulers need; vectorised (array arguments broadcast), seconds."""

    def alpha(self, batch: ArrayLike, seq_len: ArrayLike) -> FArray: ...
    def alpha_packed(self, total_tokens: ArrayLike) -> FArray: ...
    def beta(self, pet_type: str, batch: ArrayLike, seq_len: ArrayLike) -> FArray: ...


def _axis(grid: FArray, x: FArray) -> tuple[NDArray[np.intp], NDArray[np.intp], FArray]:
    """Segment ``[i0, i1]`` of ``grid`` to interpolate ``x`` on, and weight ``t`` of ``i1``.

    ``t`` lies in [0, 1] inside the grid and outside it beyond the ends (extrapolation).
    """
    n = grid.shape[0]
    if n == 1:
        zero = np.zeros(x.shape, dtype=np.intp)
        return zero, zero, np.zeros(x.shape, dtype=np.float64)
    k = np.clip(np.searchsorted(grid, x, side="right"), 1, n - 1)
    i0 = k - 1
    t = (x - grid[i0]) / (grid[k] - grid[i0])
    return i0, k, t


def interp1d(grid: FArray, values: FArray, x: ArrayLike) -> FArray:
    """Linear interpolation of ``values`` [n] on ``grid`` [n], linear extrapolation, >= 0."""
    xa = np.asarray(x, dtype=np.float64)
    i0, i1, t = _axis(grid, xa)
    out = (1.0 - t) * values[i0] + t * values[i1]
    return np.asarray(np.maximum(out, 0.0), dtype=np.float64)


def interp2d(grid_b: FArray, grid_s: FArray, values: FArray, b: ArrayLike, s: ArrayLike) -> FArray:
    """Bilinear interpolation of ``values`` [nb, ns]; linear extrapolation; clamped >= 0."""
    ba, sa = np.broadcast_arrays(np.asarray(b, dtype=np.float64), np.asarray(s, dtype=np.float64))
    b0, b1, tb = _axis(grid_b, ba)
    s0, s1, ts = _axis(grid_s, sa)
    out = (
        (1.0 - tb) * (1.0 - ts) * values[b0, s0]
        + (1.0 - tb) * ts * values[b0, s1]
        + tb * (1.0 - ts) * values[b1, s0]
        + tb * ts * values[b1, s1]
    )
    return np.asarray(np.maximum(out, 0.0), dtype=np.float64)


def _grid(values: Sequence[int], what: str) -> FArray:
    g = np.asarray(values, dtype=np.float64)
    if g.ndim != 1 or (g.size and np.any(np.diff(g) <= 0)):
        raise ConfigError(
            f"cost table grid {what}={list(values)!r} must be strictly "
            "increasing; regenerate the table with `pets profile`"
        )
    return g


@dataclass
class CostTable:
    """Profiled alpha/beta tables (seconds) with bilinear interpolation (module docstring).

    Shapes: ``alpha`` [len(batch_sizes), len(seq_lens)], ``alpha_packed``
    [len(total_tokens)], ``beta[type]`` [len(beta_batch_sizes), len(seq_lens)];
    ``measured`` holds boolean arrays of the same shapes under the keys ``"alpha"``,
    ``"alpha_packed"`` and ``"beta/<type>"``.
    """

    batch_sizes: tuple[int, ...]
    seq_lens: tuple[int, ...]
    alpha_values: FArray
    total_tokens: tuple[int, ...] = ()
    alpha_packed_values: FArray = field(default_factory=lambda: np.zeros(0))
    beta_batch_sizes: tuple[int, ...] = ()
    beta_values: dict[str, FArray] = field(default_factory=dict)
    measured: dict[str, NDArray[np.bool_]] = field(default_factory=dict)
    device: str = "unknown"
    dtype: str = "float32"
    backbone_fingerprint: str = ""
    fallback: AnalyticModel = field(default_factory=AnalyticModel)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.beta_batch_sizes:
            self.beta_batch_sizes = tuple(self.batch_sizes)
        self._gb = _grid(self.batch_sizes, "batch_sizes")
        self._gs = _grid(self.seq_lens, "seq_lens")
        self._gt = _grid(self.total_tokens, "total_tokens")
        self._gbb = _grid(self.beta_batch_sizes, "beta_batch_sizes")
        self.alpha_values = np.asarray(self.alpha_values, dtype=np.float64)
        self.alpha_packed_values = np.asarray(self.alpha_packed_values, dtype=np.float64)
        self.beta_values = {k: np.asarray(v, dtype=np.float64) for k, v in self.beta_values.items()}
        shape = (len(self.batch_sizes), len(self.seq_lens))
        bshape = (len(self.beta_batch_sizes), len(self.seq_lens))
        checks = [
            ("alpha", self.alpha_values.shape, shape),
            ("alpha_packed", self.alpha_packed_values.shape, (len(self.total_tokens),)),
        ]
        checks += [(f"beta/{k}", v.shape, bshape) for k, v in self.beta_values.items()]
        for name, got, want in checks:
            if got != want:
                raise ConfigError(
                    f"cost table {name} has shape {got}, expected {want} from "
                    "its grid; regenerate the table with `pets profile`"
                )
        if not self.batch_sizes or not self.seq_lens:
            raise ConfigError(
                "cost table needs at least one batch size and one seq len; "
                "regenerate the table with `pets profile`"
            )

    @property
    def pet_types(self) -> tuple[str, ...]:
        return tuple(self.beta_values)

    def alpha(self, batch: ArrayLike, seq_len: ArrayLike) -> FArray:
        return interp2d(self._gb, self._gs, self.alpha_values, batch, seq_len)

    def alpha_packed(self, total_tokens: ArrayLike) -> FArray:
        if not self.total_tokens:
            return self.fallback.alpha_packed(total_tokens)
        return interp1d(self._gt, self.alpha_packed_values, total_tokens)

    def beta(self, pet_type: str, batch: ArrayLike, seq_len: ArrayLike) -> FArray:
        v = self.beta_values.get(pet_type)
        if v is None:
            return self.fallback.beta(pet_type, batch, seq_len)
        return interp2d(self._gbb, self._gs, v, batch, seq_len)

    def measured_fraction(self) -> float:
        """Share of table entries that were measured (not filled analytically)."""
        total = sum(m.size for m in self.measured.values())
        return float(sum(int(m.sum()) for m in self.measured.values()) / total) if total else 0.0

    # -- JSON ----------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        def ms(key: str, shape: tuple[int, ...]) -> Any:
            m = self.measured.get(key)
            return (m if m is not None else np.zeros(shape, dtype=bool)).tolist()

        return {
            "format_version": FORMAT_VERSION,
            "units": "seconds",
            "device": self.device,
            "dtype": self.dtype,
            "backbone_fingerprint": self.backbone_fingerprint,
            "grid": {
                "batch_sizes": list(self.batch_sizes),
                "seq_lens": list(self.seq_lens),
                "total_tokens": list(self.total_tokens),
                "beta_batch_sizes": list(self.beta_batch_sizes),
                "pet_types": list(self.beta_values),
            },
            "values": {
                "alpha": self.alpha_values.tolist(),
                "alpha_packed": self.alpha_packed_values.tolist(),
                "beta": {k: v.tolist() for k, v in self.beta_values.items()},
            },
            "measured": {
                "alpha": ms("alpha", self.alpha_values.shape),
                "alpha_packed": ms("alpha_packed", self.alpha_packed_values.shape),
                "beta": {k: ms(f"beta/{k}", v.shape) for k, v in self.beta_values.items()},
            },
            "fallback": self.fallback.to_dict(),
            "meta": self.meta,
        }

    @classmethod
    def from_json_dict(cls, d: dict[str, Any], source: str = "<dict>") -> CostTable:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ConfigError(
                f"cost table {source} has format_version={version!r}, this "
                f"build reads {FORMAT_VERSION}; regenerate it with `pets profile`"
            )
        try:
            g, v, m = d["grid"], d["values"], d.get("measured", {})
            measured = {
                "alpha": np.asarray(m.get("alpha", False), dtype=bool),
                "alpha_packed": np.asarray(m.get("alpha_packed", False), dtype=bool),
            }
            measured.update(
                {f"beta/{k}": np.asarray(x, dtype=bool) for k, x in m.get("beta", {}).items()}
            )
            return cls(
                batch_sizes=tuple(g["batch_sizes"]),
                seq_lens=tuple(g["seq_lens"]),
                alpha_values=np.asarray(v["alpha"], dtype=np.float64),
                total_tokens=tuple(g.get("total_tokens", ())),
                alpha_packed_values=np.asarray(v.get("alpha_packed", []), dtype=np.float64),
                beta_batch_sizes=tuple(g.get("beta_batch_sizes", ())),
                beta_values={
                    k: np.asarray(x, dtype=np.float64) for k, x in v.get("beta", {}).items()
                },
                measured=measured,
                device=str(d.get("device", "unknown")),
                dtype=str(d.get("dtype", "float32")),
                backbone_fingerprint=str(d.get("backbone_fingerprint", "")),
                fallback=AnalyticModel.from_dict(d.get("fallback", {})),
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"cost table {source} is malformed ({type(e).__name__}: {e}); "
                "regenerate it with `pets profile`"
            ) from e

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write JSON atomically (temp file + rename)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_json_dict(), f, indent=1)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CostTable:
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(
                f"cannot read cost table {str(path)!r} ({e}); check the path "
                "or regenerate it with `pets profile`"
            ) from e
        return cls.from_json_dict(d, source=repr(str(path)))


class CostLattice:
    """Integer-lattice memo of a :class:`CostModel` for the schedulers' dynamic programs.

    The DPs only ask for integer batch sizes and lengths, many times per ``execute``;
    interpolating a :class:`CostTable` each time costs more than the DP itself. This
    evaluates ``alpha`` / ``beta(type)`` once on the lattice ``[0, S] x [0, L]`` and then
    answers by gathering, so it returns exactly what the wrapped model returns. The lattice
    grows (to the next power of two) when a larger size or length is asked for; arguments
    that are not non-negative integers, or would need more than ``max_cells`` cells per
    kind, go to the wrapped model. ``alpha_packed`` always does.
    """

    def __init__(self, model: CostModel, max_cells: int = 1 << 21) -> None:
        self.model = model
        self.max_cells = max_cells
        self._grids: dict[str | None, FArray] = {}  # None: alpha; a pet type: its beta
        self._stack: FArray | None = None  # [K, S, L] beta lattices of _stack_kinds
        self._stack_kinds: list[str] = []

    @staticmethod
    def _index(batch: ArrayLike, seq_len: ArrayLike) -> tuple[Any, Any, int, int] | None:
        """Integer indices of the arguments and the lattice extent they need, or None."""
        b = np.asarray(batch)
        s = np.asarray(seq_len)
        if b.size == 0 or s.size == 0:
            return None
        bi = b.astype(np.intp)
        si = s.astype(np.intp)
        if (b.dtype.kind == "f" and (bi != b).any()) or (s.dtype.kind == "f" and (si != s).any()):
            return None  # not on the lattice
        if int(bi.min()) < 0 or int(si.min()) < 0:
            return None
        return bi, si, int(bi.max()) + 1, int(si.max()) + 1

    def _grid(self, kind: str | None, nb: int, ns: int) -> FArray | None:
        """The lattice of ``kind`` covering ``[0, nb) x [0, ns)``, grown if needed."""
        grid = self._grids.get(kind)
        if grid is not None and nb <= grid.shape[0] and ns <= grid.shape[1]:
            return grid
        have = grid.shape if grid is not None else (0, 0)
        rows = max(64, 1 << (max(nb, have[0]) - 1).bit_length())
        cols = max(128, 1 << (max(ns, have[1]) - 1).bit_length())
        if rows * cols > self.max_cells:
            return None
        sizes = np.arange(rows, dtype=np.float64)[:, None]
        lens = np.arange(cols, dtype=np.float64)[None, :]
        values = (
            self.model.alpha(sizes, lens) if kind is None else self.model.beta(kind, sizes, lens)
        )
        grid = np.ascontiguousarray(np.broadcast_to(np.asarray(values, np.float64), (rows, cols)))
        self._grids[kind] = grid
        return grid

    def _gather(self, kind: str | None, batch: ArrayLike, seq_len: ArrayLike) -> FArray | None:
        ix = self._index(batch, seq_len)
        grid = None if ix is None else self._grid(kind, ix[2], ix[3])
        if ix is None or grid is None:
            return None
        return np.asarray(grid[ix[0], ix[1]], dtype=np.float64)

    def beta_many(
        self, pet_types: Sequence[str], which: ArrayLike, batch: ArrayLike, seq_len: ArrayLike
    ) -> FArray | None:
        """:func:`beta_by_type` as ONE gather from the stacked per-type lattices, or None
        when an argument is off the lattice (the caller then asks per type)."""
        ix = self._index(batch, seq_len)
        if ix is None:
            return None
        if any(self._grid(t, ix[2], ix[3]) is None for t in pet_types):
            return None
        # One stack over every type seen so far (bounded by the number of PET types), in a
        # fixed order; rebuilt when a type is new or a lattice has grown.
        kinds = [k for k in self._grids if k is not None]
        rows = max(self._grids[k].shape[0] for k in kinds)
        cols = max(self._grids[k].shape[1] for k in kinds)
        if (
            self._stack is None
            or self._stack_kinds != kinds
            or self._stack.shape[1:] != (rows, cols)
        ):
            grids = [self._grid(k, rows, cols) for k in kinds]  # same extent for all
            if any(g is None for g in grids):
                return None
            self._stack = np.stack(grids)  # type: ignore[arg-type]
            self._stack_kinds = kinds
        pos = np.array([kinds.index(t) for t in pet_types], dtype=np.intp)
        return np.asarray(self._stack[pos[np.asarray(which)], ix[0], ix[1]], dtype=np.float64)

    def alpha(self, batch: ArrayLike, seq_len: ArrayLike) -> FArray:
        out = self._gather(None, batch, seq_len)
        return self.model.alpha(batch, seq_len) if out is None else out

    def alpha_packed(self, total_tokens: ArrayLike) -> FArray:
        return self.model.alpha_packed(total_tokens)

    def beta(self, pet_type: str, batch: ArrayLike, seq_len: ArrayLike) -> FArray:
        out = self._gather(pet_type, batch, seq_len)
        return self.model.beta(pet_type, batch, seq_len) if out is None else out


def beta_by_type(
    model: CostModel,
    pet_types: Sequence[str],
    which: ArrayLike,
    batch: ArrayLike,
    seq_len: ArrayLike,
) -> FArray:
    """``beta(pet_types[which], batch, seq_len)`` elementwise, for mixed types at once.

    ``which``, ``batch`` and ``seq_len`` broadcast together; ``which`` indexes
    ``pet_types``. One call per distinct type, each on the elements of that type (a
    :class:`CostLattice` makes each call a gather).
    """
    if isinstance(model, CostLattice):
        got = model.beta_many(pet_types, which, batch, seq_len)
        if got is not None:
            return got
    w, b, s = np.broadcast_arrays(
        np.asarray(which),
        np.asarray(batch, dtype=np.float64),
        np.asarray(seq_len, dtype=np.float64),
    )
    out = np.empty(w.shape, dtype=np.float64)
    for k in np.unique(w).tolist():
        sel = w == k
        out[sel] = model.beta(pet_types[k], b[sel], s[sel])
    return out


def load_cost_model(
    path: str | os.PathLike[str] | None, fallback: AnalyticModel | None = None
) -> CostModel:
    """The table at ``path`` if given and present, else the analytic ``fallback``."""
    if path is not None and Path(path).exists():
        return CostTable.load(path)
    return fallback if fallback is not None else AnalyticModel()


def compatibility_warnings(
    table: CostTable, device: str, dtype: str, backbone_fingerprint: str
) -> list[str]:
    """Human-readable mismatches between a table and the engine it is used for."""
    out = []
    for what, have, want in (
        ("device", table.device, device),
        ("dtype", table.dtype, dtype),
        ("backbone", table.backbone_fingerprint, backbone_fingerprint),
    ):
        if want and have != want:
            out.append(
                f"cost table was profiled for {what} {have!r}, engine uses {want!r}; "
                "re-run `pets profile` for accurate scheduling"
            )
    return out


def batch_cost(model: CostModel, queries: Sequence[Query], padded_length: int) -> float:
    """Seconds to run ``queries`` as one forward (padded if ``padded_length`` > 0).

    Segments are the batch's per-task groups; a padded segment is costed at the batch's
    ``padded_length`` (the engine pads every row to it), a packed one at its mean length.
    """
    segs: dict[int, list[Query]] = {}
    for q in queries:
        segs.setdefault(q.task_slot, []).append(q)
    if padded_length > 0:
        total = float(model.alpha(len(queries), padded_length))
        for g in segs.values():
            total += float(model.beta(g[0].pet_type, len(g), padded_length))
        return total
    total = float(model.alpha_packed(sum(q.length for q in queries)))
    for g in segs.values():
        total += float(model.beta(g[0].pet_type, len(g), sum(q.length for q in g) / len(g)))
    return total
