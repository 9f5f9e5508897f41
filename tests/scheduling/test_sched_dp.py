"""Each DP against brute force over its search space (see ``pets.scheduling.dp``).

* intra-task: ``min Σ beta(type, |G|, max_len G)`` s.t. caps, over ordered splits of the
  length-sorted queries (any table), and over ALL set partitions (monotone tables);
* inter-task: ``min Σ alpha(Σ size, max_len) [+ Σ beta(type_m, size_m, max_len)]`` s.t.
  caps, over ordered splits of the length-sorted items;
* alpha-only (unit items, no beta): also over ALL set partitions (monotone alpha).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sched_helpers import TYPES, ordered_splits, random_queries, random_table, set_partitions

from pets.scheduling import policies
from pets.scheduling.cost_model import CostTable
from pets.scheduling.dp import (
    backtrack,
    inter_task_runs,
    intra_task_costs,
    intra_task_runs,
    solve,
)
from pets.scheduling.policies import AlphaOnlyScheduler, BetaOnlyScheduler

CAPS = [(None, None), (3, None), (None, 24), (4, 30)]


def ok(
    size: int, length: float, n_items: int, max_size: int | None, max_tokens: int | None
) -> bool:
    if n_items == 1:
        return True
    return (max_size is None or size <= max_size) and (
        max_tokens is None or size * length <= max_tokens
    )


def beta_obj(t: CostTable, typ: str, groups: list[list[int]], caps: tuple) -> float:
    if not all(ok(len(g), max(g), len(g), *caps) for g in groups):
        return math.inf
    return sum(float(t.beta(typ, len(g), max(g))) for g in groups)


def inter_obj(t: CostTable, sizes, lengths, types, runs, caps) -> float:
    total = 0.0
    for j, i in runs:
        size, length = int(sum(sizes[j:i])), lengths[i - 1]
        if not ok(size, length, i - j, *caps):
            return math.inf
        total += float(t.alpha(size, length))
        if types is not None:
            total += sum(float(t.beta(types[m], sizes[m], length)) for m in range(j, i))
    return total


@pytest.mark.parametrize("caps", CAPS)
@pytest.mark.parametrize("monotone", [True, False])
def test_intra_task_dp_is_optimal(caps, monotone):
    rng = np.random.default_rng(hash((caps, monotone)) % 2**32)
    for trial in range(25):
        table = random_table(rng, monotone)
        typ = TYPES[trial % len(TYPES)]
        n = int(rng.integers(1, 8))
        lens = sorted(int(x) for x in rng.integers(1, 17, n))
        runs = intra_task_runs(table, typ, np.array(lens, dtype=float), *caps)
        got = beta_obj(table, typ, [lens[j:i] for j, i in runs], caps)
        best_split = min(
            beta_obj(table, typ, [lens[j:i] for j, i in r], caps) for r in ordered_splits(n)
        )
        assert math.isfinite(got)
        assert got == pytest.approx(best_split, rel=1e-12)
        if monotone:
            best_part = min(beta_obj(table, typ, p, caps) for p in set_partitions(lens))
            assert got == pytest.approx(best_part, rel=1e-12)


@pytest.mark.parametrize("caps", CAPS)
def test_batched_intra_task_dp_matches_brute_force(caps):
    """The tensor DP (many tasks at once, padded rows) solves each task's problem."""
    rng = np.random.default_rng(7)
    for _ in range(15):
        table = random_table(rng, monotone=False)
        g = int(rng.integers(1, 6))
        counts = rng.integers(1, 8, g)
        n = int(counts.max())
        types = [TYPES[int(rng.integers(4))] for _ in range(g)]
        rows = [sorted(int(x) for x in rng.integers(1, 17, c)) for c in counts]
        lengths = np.array([r + [r[-1]] * (n - len(r)) for r in rows], dtype=float)
        _, arg = solve(intra_task_costs(table, types, lengths, counts, *caps))
        for k, r in enumerate(rows):
            got = beta_obj(table, types[k], [r[j:i] for j, i in backtrack(arg[k], len(r))], caps)
            best = min(
                beta_obj(table, types[k], [r[j:i] for j, i in s], caps)
                for s in ordered_splits(len(r))
            )
            assert got == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("caps", CAPS)
@pytest.mark.parametrize("merge_beta", [False, True])
def test_inter_task_dp_is_optimal(caps, merge_beta):
    rng = np.random.default_rng(11 + len(str(caps)) + merge_beta)
    for _ in range(25):
        table = random_table(rng, monotone=bool(rng.integers(2)))
        n = int(rng.integers(1, 9))
        sizes = rng.integers(1, 4, n).astype(np.int64)
        lengths = np.sort(rng.integers(1, 17, n)).astype(float)
        types = [TYPES[int(rng.integers(4))] for _ in range(n)] if merge_beta else None
        runs = inter_task_runs(table, sizes, lengths, types, *caps)
        got = inter_obj(table, sizes, lengths, types, runs, caps)
        best = min(inter_obj(table, sizes, lengths, types, r, caps) for r in ordered_splits(n))
        assert math.isfinite(got)
        assert got == pytest.approx(best, rel=1e-12)
        assert [r[0] for r in runs] == [0] + [r[1] for r in runs[:-1]]  # a cover of [0, n)


@pytest.mark.parametrize("caps", CAPS)
def test_alpha_only_is_optimal_over_all_set_partitions(caps):
    rng = np.random.default_rng(3)
    for _ in range(15):
        table = random_table(rng, monotone=True)
        qs = random_queries(rng, int(rng.integers(1, 9)), n_tasks=3)
        batches = AlphaOnlyScheduler(table, *caps).schedule(qs)
        by = {q.index: q for q in qs}

        def obj(groups, table=table):
            if not all(ok(len(g), max(g), len(g), *caps) for g in groups):
                return math.inf
            return sum(float(table.alpha(len(g), max(g))) for g in groups)

        got = obj([[by[i].length for i in b.indices] for b in batches])
        best = min(obj(p) for p in set_partitions([q.length for q in qs]))
        assert got == pytest.approx(best, rel=1e-12)


def test_beta_only_is_optimal_per_task_over_all_set_partitions():
    rng = np.random.default_rng(5)
    for _ in range(10):
        table = random_table(rng, monotone=True)
        qs = random_queries(rng, 12, n_tasks=3)
        batches = BetaOnlyScheduler(table, max_batch_size=4).schedule(qs)
        by = {q.index: q for q in qs}
        caps = (4, None)
        got = 0.0
        for b in batches:
            tasks = {by[i].task_slot for i in b.indices}
            assert len(tasks) == 1  # beta-only: one task per forward
            got += beta_obj(
                table, by[b.indices[0]].pet_type, [[by[i].length for i in b.indices]], caps
            )
        best = 0.0
        for t in {q.task_slot for q in qs}:
            lens = [q.length for q in qs if q.task_slot == t]
            typ = next(q.pet_type for q in qs if q.task_slot == t)
            best += min(beta_obj(table, typ, p, caps) for p in set_partitions(lens))
        assert got == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("threshold", [0, 1000])
def test_row_and_tensor_intra_task_paths_agree(monkeypatch, threshold):
    """Large tasks take the row DP, small ones the tensor DP: same optimum either way."""
    rng = np.random.default_rng(9)
    table = random_table(rng, monotone=False)
    qs = random_queries(rng, 60, n_tasks=4)
    monkeypatch.setattr(policies, "BATCHED_MAX_N", threshold)
    minis = policies.form_minibatches(qs, table, 5, 40)
    cost = sum(beta_obj(table, m[0].pet_type, [[q.length for q in m]], (5, 40)) for m in minis)
    monkeypatch.setattr(policies, "BATCHED_MAX_N", 1000 - threshold)
    minis2 = policies.form_minibatches(qs, table, 5, 40)
    cost2 = sum(beta_obj(table, m[0].pet_type, [[q.length for q in m]], (5, 40)) for m in minis2)
    assert cost == pytest.approx(cost2, rel=1e-12)
    assert sorted(q.index for m in minis for q in m) == list(range(60))
