"""The two PetS dynamic programs, vectorised with numpy.

Both are 1-D *ordered partition* DPs: items sorted by length ascending are cut into
contiguous runs; a run's padded length is its last (longest) item. With ``cost[j, i]`` the
cost of the run of items ``[j, i)`` (0-based, half-open)::

    T[0] = 0,   T[i] = min_{0 <= j < i} T[j] + cost[j, i],   answer T[n]

:func:`solve` runs this for ``G`` independent instances at once from a full cost tensor
(many small tasks in the intra-task stage), O(G·n²); :func:`solve_sorted` runs one
instance row by row from per-length cost rows (large instances, no n² memory).
Infeasible runs (size caps) have cost ``+inf`` (or lie outside the row band); a run of a
single item is always feasible, so every item is scheduled.

Optimisation problems (the tests check each against brute force):

* **intra-task** (:func:`intra_task_costs`, :func:`intra_task_runs`): for one task with
  queries sorted by length, minimise ``Σ_runs beta(type, |run|, max_len(run))`` over
  ordered splits with ``|run| <= max_size`` and ``|run|·max_len <= max_tokens``. When ``beta`` is
  non-decreasing in length this is also optimal over *all set partitions* of the task's
  queries: give the groups of any partition, sorted by their longest query, the same sizes
  as contiguous sorted blocks; no block's longest query gets longer (so caps still hold).
* **inter-task** (:func:`inter_task_runs`): for items (mini-batches) sorted by
  ``(length, task, size)``, minimise ``Σ_runs alpha(Σ size, max_len)`` (plus
  ``Σ_items beta(type, size, max_len)`` when ``merge_beta``) over ordered splits with
  ``Σ size <= max_size`` and ``Σ size·max_len <= max_tokens``. With unit-size items and no
  beta term (alpha-only) and ``alpha`` non-decreasing in length it is optimal over all set
  partitions of the queries by the same argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from pets.scheduling.analytic import FArray
from pets.scheduling.cost_model import CostModel, beta_by_type

IArray = NDArray[np.intp]
INF = np.inf
DENSE_MAX_N = 128
"""Up to this many items :func:`solve_sorted` gathers the full cost matrix first (beyond,
building it costs more than the row-by-row loop saves)."""


def solve(cost: FArray) -> tuple[FArray, IArray]:
    """Solve ``G`` partition DPs. ``cost``: [G, n+1, n+1], ``cost[g, j, i]`` for run [j, i).

    Returns ``best`` [G, n+1] (optimal cost of the first ``i`` items) and ``arg``
    [G, n+1] (start ``j`` of the last run in that optimum).
    """
    g, n1, _ = cost.shape
    ct = np.ascontiguousarray(cost.transpose(0, 2, 1))  # ct[g, i, j]
    best = np.zeros((g, n1), dtype=np.float64)
    arg = np.zeros((g, n1), dtype=np.intp)
    if g == 1:  # fast path: 1-D slices, no fancy indexing
        _solve_rows(ct[0], best[0], arg[0])
        return best, arg
    rows = np.arange(g)
    for i in range(1, n1):
        v = best[:, :i] + ct[:, i, :i]
        k = v.argmin(axis=1)
        arg[:, i] = k
        best[:, i] = v[rows, k]
    return best, arg


def _solve_rows(ct: FArray, best: FArray, arg: IArray) -> None:
    """One DP from its transposed cost matrix ``ct[i, j]`` (run [j, i)), filling ``best`` and
    ``arg`` [n+1] in place: one add and one argmin per row."""
    for i in range(1, ct.shape[0]):
        v = best[:i] + ct[i, :i]
        k = int(v.argmin())
        arg[i] = k
        best[i] = v[k]


def backtrack(arg: IArray | Sequence[int], n: int) -> list[tuple[int, int]]:
    """Runs ``[(j, i), ...]`` in order for the first ``n`` items of one DP's ``arg`` row."""
    runs: list[tuple[int, int]] = []
    i = n
    while i > 0:
        j = int(arg[i])
        runs.append((j, i))
        i = j
    runs.reverse()
    return runs


def _caps(
    size: NDArray[np.int64], length: FArray, max_size: int | None, max_tokens: int | None
) -> NDArray[np.bool_]:
    """Boolean mask of runs that break a cap (``size`` and ``length`` broadcast)."""
    bad = np.zeros(np.broadcast_shapes(size.shape, length.shape), dtype=bool)
    if max_size is not None:
        bad |= size > max_size
    if max_tokens is not None:
        bad |= size * length > max_tokens
    return bad


def intra_task_costs(
    model: CostModel,
    pet_types: Sequence[str],
    lengths: FArray,
    counts: NDArray[np.int64],
    max_size: int | None = None,
    max_tokens: int | None = None,
) -> FArray:
    """Cost tensor [G, n+1, n+1] of the intra-task DP for ``G`` tasks at once.

    ``lengths`` [G, n]: each task's query lengths sorted ascending (row ``g`` valid up to
    ``counts[g]``; padding is ignored), ``pet_types[g]`` the task's type.
    ``cost[g, j, i] = beta(type_g, i - j, lengths[g, i-1])``.
    """
    g, n = lengths.shape
    uniq, lidx = np.unique(lengths, return_inverse=True)
    lidx = lidx.reshape(g, n)
    names, tix = np.unique(np.asarray(pet_types), return_inverse=True)
    ii = np.arange(n + 1)
    run = ii[None, :] - ii[:, None]  # run[j, i] = i - j
    run_c = np.clip(run, 0, n)
    lcol = np.concatenate([lidx[:, :1], lidx], axis=1)  # lcol[g, i] = lidx[g, i-1]
    lend = uniq[lcol]  # [G, n+1] padded length of a run ending at i
    cost = beta_by_type(
        model, names.tolist(), tix[:, None, None], run_c[None, :, :], lend[:, None, :]
    )
    bad = _caps(run[None, :, :], lend[:, None, :], max_size, max_tokens)
    bad &= run[None, :, :] > 1
    bad |= run[None, :, :] <= 0
    cost[bad] = INF
    return np.asarray(cost, dtype=np.float64)


def solve_sorted(
    sizes: NDArray[np.int64],
    lengths: FArray,
    run_cost: FArray,
    uniq: FArray,
    item_cost: FArray | None = None,
    max_size: int | None = None,
    max_tokens: int | None = None,
) -> list[tuple[int, int]]:
    """One partition DP over ``n`` length-sorted items, row by row (no n² matrix).

    ``sizes`` [n] queries per item, ``lengths`` [n] ascending padded lengths, ``uniq`` [U]
    the distinct lengths. ``run_cost`` [U, S+1] (``S = Σ sizes``): cost of a run of total
    size ``k`` padded to ``uniq[u]``. ``item_cost`` [U, n] (optional): extra cost of item
    ``m`` when its run is padded to ``uniq[u]``. Run [j, i) costs
    ``run_cost[u_i, Σ sizes[j:i]] + Σ_{j<=m<i} item_cost[u_i, m]`` with ``u_i`` the index
    of ``lengths[i-1]``. Returns the optimal runs ``[(j, i), ...]``. O(n·w) for a band of
    width ``w`` set by the caps (``w = n`` without caps); instances of at most
    ``DENSE_MAX_N`` items gather an [n+1, n+1] cost matrix first (fewer numpy calls per row).
    """
    n = sizes.shape[0]
    if n == 0:
        return []
    col = np.searchsorted(uniq, lengths)
    csize = np.concatenate([[0], np.cumsum(sizes)])
    lim = np.full(n, np.inf)
    if max_size is not None:
        lim = np.minimum(lim, max_size)
    if max_tokens is not None:
        lim = np.minimum(lim, np.floor(max_tokens / lengths))
    lo = np.searchsorted(csize, csize[1:] - lim, side="left")
    lo = np.minimum(lo, np.arange(n))  # a single item is always feasible
    unit = bool(np.all(sizes == 1))
    n_u = uniq.shape[0]
    # cs[u, k] = Σ_{m<k} item_cost[u, m]; a run [j, i) adds cs[u, i] - cs[u, j].
    cs = np.zeros((n_u, n + 1))
    if item_cost is not None:
        np.cumsum(item_cost, axis=1, out=cs[:, 1:])
    if n <= DENSE_MAX_N:
        # Small instance (the online case): the whole [n+1, n+1] cost matrix in one
        # vectorised gather, then a row loop with one add and one argmin per row.
        ii = np.arange(1, n + 1)[:, None]
        jj = np.arange(n + 1)[None, :]
        u = col[:, None]
        run = np.clip(csize[ii] - csize[jj], 0, run_cost.shape[1] - 1)
        ct = np.full((n + 1, n + 1), INF)
        ct[1:] = run_cost[u, run]
        if item_cost is not None:
            ct[1:] += cs[u, ii] - cs[u, jj]
        ct[1:][(jj < lo[:, None]) | (jj >= ii)] = INF
        best = np.zeros(n + 1)
        arg_d = np.zeros(n + 1, dtype=np.intp)
        _solve_rows(ct, best, arg_d)
        return backtrack(arg_d, n)
    # Large instance: row by row without the n² matrix. Keep bc = best - cs[u] for the
    # current padded length u (changes at most U times as the lengths are sorted) so each
    # row is one add and one argmin.
    best = np.zeros(n + 1)
    bc = np.zeros(n + 1)
    arg = [0] * (n + 1)
    rows = [run_cost[u] for u in range(n_u)]
    los, cols, csz = lo.tolist(), col.tolist(), csize
    cur = -1
    cu: list[float] = []
    r = rows[0]
    for i in range(1, n + 1):
        j0, u = los[i - 1], cols[i - 1]
        if u != cur:
            cur = u
            np.subtract(best[:i], cs[u, :i], out=bc[:i])
            cu = cs[u].tolist()
            r = rows[u]
        v = bc[j0:i] + (r[i - j0 : 0 : -1] if unit else r[csz[i] - csz[j0:i]])
        k = int(v.argmin())
        arg[i] = j0 + k
        vk = v[k]
        bc[i] = vk
        best[i] = vk + cu[i]
    return backtrack(arg, n)


def inter_task_runs(
    model: CostModel,
    sizes: NDArray[np.int64],
    lengths: FArray,
    pet_types: Sequence[str] | None = None,
    max_size: int | None = None,
    max_tokens: int | None = None,
) -> list[tuple[int, int]]:
    """Optimal runs of the inter-task DP over ``n`` items sorted by length.

    ``sizes`` [n] queries per item, ``lengths`` [n] its padded length (ascending). Run
    [j, i) costs ``alpha(Σ_{j<=m<i} sizes[m], lengths[i-1])``, plus
    ``Σ_{j<=m<i} beta(pet_types[m], sizes[m], lengths[i-1])`` if ``pet_types`` is given.
    """
    uniq = np.unique(lengths)
    total = int(sizes.sum())
    run_cost = model.alpha(np.arange(total + 1, dtype=np.float64)[None, :], uniq[:, None])
    item_cost = None
    if pet_types is not None:
        names, which = np.unique(np.asarray(pet_types), return_inverse=True)
        item_cost = beta_by_type(
            model, names.tolist(), which[None, :], sizes.astype(np.float64)[None, :], uniq[:, None]
        )
    return solve_sorted(sizes, lengths, run_cost, uniq, item_cost, max_size, max_tokens)


def intra_task_runs(
    model: CostModel,
    pet_type: str,
    lengths: FArray,
    max_size: int | None = None,
    max_tokens: int | None = None,
) -> list[tuple[int, int]]:
    """Optimal runs of the intra-task DP for ONE task (``lengths`` [n] ascending).

    Same problem as :func:`intra_task_costs` (run [j, i) costs
    ``beta(type, i - j, lengths[i-1])``), solved row by row for large tasks.
    """
    n = lengths.shape[0]
    uniq = np.unique(lengths)
    run_cost = model.beta(pet_type, np.arange(n + 1, dtype=np.float64)[None, :], uniq[:, None])
    return solve_sorted(
        np.ones(n, dtype=np.int64), lengths, run_cost, uniq, None, max_size, max_tokens
    )
