"""Batching policies. Each class holds its whole logic; :mod:`.registry` names them.

================  =========================================================================
``fixed``         arrival-order chunks of ``batch_size`` (PetS "Fixed"); the last, short
                  chunk is kept (PetS dropped it)
``beta_only``     intra-task DP only: each task's mini-batches run as separate forwards
``alpha_only``    inter-task DP over single queries: all queries sorted by length, cut by alpha
``coordinated``   PetS CB: intra-task DP into mini-batches, then inter-task DP merging them
``token_budget``  packed path: queries sorted by task, greedy fill to ``max_batch_tokens``
``task_grouped``  one batch of everything grouped by task, split only over the token cap
================  =========================================================================

The DP policies cost with a :class:`~pets.scheduling.cost_model.CostModel` (seconds);
without one they use the analytic bert-base model. Fixes of PetS quirks: one unit
(seconds) for alpha and beta, so ``coordinated`` can (and by default does) add the PET-op
cost of each mini-batch at the macro-batch's padded length when merging
(``merge_beta=True``; ``False`` = PetS's alpha-only merge); no hidden 128/32 caps (explicit
``max_batch_size`` / ``max_minibatch_size`` / ``max_batch_tokens`` instead, a single query
over a cap still gets its own batch); no dropped remainder.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from pets.errors import ConfigError
from pets.scheduling.analytic import AnalyticModel
from pets.scheduling.base import Query, ScheduledBatch, Scheduler, SchedulerContext, make_batch
from pets.scheduling.cost_model import CostLattice, CostModel, CostTable
from pets.scheduling.dp import (
    inter_task_runs,
    intra_task_costs,
    intra_task_runs,
    solve,
)


def _positive(name: str, value: Any, policy: str, optional: bool = True) -> int | None:
    """A positive int option; decimal strings (config.pbtxt values) are accepted."""
    if value is None and optional:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"scheduler {policy!r}: option {name}={value!r} must be a positive "
            "integer" + (" or None" if optional else "") + "; fix the scheduler "
            "options in config.pbtxt"
        )
    return value


def _flag(name: str, value: Any, policy: str) -> bool:
    """A boolean option; accepts bools and the strings true/false/1/0/yes/no."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigError(
        f"scheduler {policy!r}: option {name}={value!r} must be true or false; "
        "fix the scheduler options in config.pbtxt"
    )


def _cost_model(value: Any, policy: str) -> CostModel:
    """None (analytic bert-base), a CostModel, or a path to a JSON cost table."""
    if value is None:
        return AnalyticModel()
    if isinstance(value, (str, os.PathLike)):
        return CostTable.load(value)  # ConfigError naming the path if unreadable
    if not all(hasattr(value, a) for a in ("alpha", "alpha_packed", "beta")):
        raise ConfigError(
            f"scheduler {policy!r}: cost_model={value!r} lacks alpha/"
            "alpha_packed/beta; pass a CostTable, an AnalyticModel or a path "
            "to a JSON cost table"
        )
    return value


BATCHED_MAX_N = 48
"""Tasks with at most this many queries share one batched (tensor) intra-task DP; larger
tasks are solved one by one with the row DP (same optimum, less memory)."""


def form_minibatches(
    queries: Sequence[Query], model: CostModel, max_size: int | None, max_tokens: int | None
) -> list[list[Query]]:
    """Stage 1 (intra-task DP) for all tasks; mini-batches, each sorted by length."""
    n = len(queries)
    cols = np.array([(q.task_slot, q.length, q.index) for q in queries], dtype=np.int64)
    task, length, index = cols[:, 0], cols[:, 1], cols[:, 2]
    order = np.lexsort((index, length, task))  # by task, then length, then index
    qs = [queries[k] for k in order.tolist()]
    st = task[order]
    starts = np.flatnonzero(np.concatenate([[True], st[1:] != st[:-1]]))
    counts = np.diff(np.append(starts, n))
    # Every task is a contiguous block of qs; each DP run [j, i) of the task starting at s0
    # is the mini-batch qs[s0 + j : s0 + i]. Collect all run boundaries, then slice once.
    bounds = [np.array([0, n])]
    small = np.flatnonzero(counts <= BATCHED_MAX_N)
    for g in np.flatnonzero(counts > BATCHED_MAX_N).tolist():
        s0, c = int(starts[g]), int(counts[g])
        lens = length[order[s0 : s0 + c]].astype(np.float64)
        runs = intra_task_runs(model, qs[s0].pet_type, lens, max_size, max_tokens)
        bounds.append(s0 + np.array([j for j, _ in runs]))
    if small.size:
        cs, ss = counts[small], starts[small]
        width = int(cs.max())
        row = np.repeat(np.arange(small.size), cs)
        pos = np.arange(int(cs.sum())) - np.repeat(np.cumsum(cs) - cs, cs)
        src = np.repeat(ss, cs) + pos
        sl = length[order].astype(np.float64)
        lengths = np.repeat(sl[ss + cs - 1][:, None], width, axis=1)  # pad with the max
        lengths[row, pos] = sl[src]
        cost = intra_task_costs(
            model,
            [qs[k].pet_type for k in ss.tolist()],
            lengths,
            cs.astype(np.int64),
            max_size,
            max_tokens,
        )
        _, arg = solve(cost)
        # Backtrack all tasks at once: follow each row's run starts down to 0.
        rows = np.arange(small.size)
        cur = cs.astype(np.intp)
        bounds.append(ss)
        while True:
            cur = arg[rows, cur]
            live = cur > 0
            if not live.any():
                break
            bounds.append(ss[live] + cur[live])
    cuts = np.unique(np.concatenate(bounds)).tolist()
    return [qs[a:b] for a, b in itertools.pairwise(cuts)]


def merge_minibatches(
    minis: Sequence[Sequence[Query]],
    model: CostModel,
    max_size: int | None,
    max_tokens: int | None,
    merge_beta: bool,
) -> list[list[Query]]:
    """Stage 2 (inter-task DP): merge length-sorted mini-batches into macro-batches."""
    order = sorted(minis, key=lambda m: (m[-1].length, m[0].task_slot, len(m)))
    sizes = np.array([len(m) for m in order], dtype=np.int64)
    lengths = np.array([m[-1].length for m in order], dtype=np.float64)
    types = [m[0].pet_type for m in order] if merge_beta else None
    runs = inter_task_runs(model, sizes, lengths, types, max_size, max_tokens)
    return [[q for m in order[j:i] for q in m] for j, i in runs]


class FixedScheduler(Scheduler):
    """Arrival-order chunks of ``batch_size`` queries, each padded to its longest query.

    ``max_batch_tokens`` (optional; padded tokens = rows × longest) splits a chunk further,
    greedily in arrival order, so the engine's per-forward limit holds for every policy.
    """

    name = "fixed"
    options = ("batch_size", "max_batch_tokens")

    def __init__(self, batch_size: int = 32, max_batch_tokens: int | None = None) -> None:
        self.batch_size = _positive("batch_size", batch_size, self.name, optional=False) or 32
        self.max_batch_tokens = _positive("max_batch_tokens", max_batch_tokens, self.name)

    @classmethod
    def from_context(cls, ctx: SchedulerContext) -> FixedScheduler:
        return cls(batch_size=ctx.batch_size or 32, max_batch_tokens=ctx.max_batch_tokens)

    def schedule(self, queries: Sequence[Query]) -> list[ScheduledBatch]:
        bs, cap = self.batch_size, self.max_batch_tokens
        out: list[ScheduledBatch] = []
        for k in range(0, len(queries), bs):
            chunk = queries[k : k + bs]
            if cap is None:
                out.append(make_batch(chunk))
                continue
            cur: list[Query] = []
            longest = 0
            for q in chunk:
                if cur and (len(cur) + 1) * max(longest, q.length) > cap:
                    out.append(make_batch(cur))
                    cur, longest = [], 0
                cur.append(q)
                longest = max(longest, q.length)
            out.append(make_batch(cur))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "batch_size": self.batch_size,
            "max_batch_tokens": self.max_batch_tokens,
        }


class _DPScheduler(Scheduler):
    """Common option handling of the DP policies (the logic stays in each subclass)."""

    def __init__(
        self,
        cost_model: CostModel | None = None,
        max_batch_size: int | None = None,
        max_batch_tokens: int | None = None,
    ) -> None:
        self.cost_model = CostLattice(_cost_model(cost_model, self.name))
        self.max_batch_size = _positive("max_batch_size", max_batch_size, self.name)
        self.max_batch_tokens = _positive("max_batch_tokens", max_batch_tokens, self.name)

    @classmethod
    def from_context(cls, ctx: SchedulerContext) -> _DPScheduler:
        return cls(
            cost_model=ctx.cost_model() if ctx.cost_model is not None else None,
            max_batch_size=ctx.batch_size or None,
            max_batch_tokens=ctx.max_batch_tokens,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_batch_size": self.max_batch_size,
            "max_batch_tokens": self.max_batch_tokens,
            "cost_model": type(self.cost_model.model).__name__,
        }


class BetaOnlyScheduler(_DPScheduler):
    """PetS beta-only: per task, ``min Σ beta(type, |run|, max_len)``; one forward per run."""

    name = "beta_only"
    options = ("cost_model", "max_batch_size", "max_batch_tokens")

    def schedule(self, queries: Sequence[Query]) -> list[ScheduledBatch]:
        if not queries:
            return []
        minis = form_minibatches(
            queries, self.cost_model, self.max_batch_size, self.max_batch_tokens
        )
        return [make_batch(m) for m in minis]


class AlphaOnlyScheduler(_DPScheduler):
    """PetS alpha-only: all queries sorted by length, ``min Σ alpha(|run|, max_len)``."""

    name = "alpha_only"
    options = ("cost_model", "max_batch_size", "max_batch_tokens")

    def schedule(self, queries: Sequence[Query]) -> list[ScheduledBatch]:
        if not queries:
            return []
        singles = [[q] for q in queries]
        macros = merge_minibatches(
            singles, self.cost_model, self.max_batch_size, self.max_batch_tokens, merge_beta=False
        )
        return [make_batch(m) for m in macros]


class CoordinatedScheduler(_DPScheduler):
    """PetS coordinated batching: intra-task DP (beta) then inter-task DP (alpha [+beta])."""

    name = "coordinated"
    options = (
        "cost_model",
        "max_batch_size",
        "max_batch_tokens",
        "max_minibatch_size",
        "merge_beta",
    )

    def __init__(
        self,
        cost_model: CostModel | None = None,
        max_batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        max_minibatch_size: int | None = None,
        merge_beta: bool = True,
    ) -> None:
        super().__init__(cost_model, max_batch_size, max_batch_tokens)
        self.max_minibatch_size = _positive("max_minibatch_size", max_minibatch_size, self.name)
        if self.max_batch_size is not None and self.max_minibatch_size is not None:
            self.max_minibatch_size = min(self.max_minibatch_size, self.max_batch_size)
        elif self.max_minibatch_size is None:
            self.max_minibatch_size = self.max_batch_size
        self.merge_beta = _flag("merge_beta", merge_beta, self.name)

    def schedule(self, queries: Sequence[Query]) -> list[ScheduledBatch]:
        if not queries:
            return []
        minis = form_minibatches(
            queries, self.cost_model, self.max_minibatch_size, self.max_batch_tokens
        )
        macros = merge_minibatches(
            minis, self.cost_model, self.max_batch_size, self.max_batch_tokens, self.merge_beta
        )
        return [make_batch(m) for m in macros]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "max_minibatch_size": self.max_minibatch_size,
            "merge_beta": self.merge_beta,
        }


class TokenBudgetScheduler(Scheduler):
    """Packed path: sort by task (stable), fill up to ``max_batch_tokens`` real tokens.

    Batches are packed (``padded_length`` 0); their cost is ``alpha_packed(Σ tokens) +
    Σ_segments beta``. A query longer than the budget gets a batch of its own.
    """

    name = "token_budget"
    options = ("max_batch_tokens", "max_batch_size")

    @classmethod
    def from_context(cls, ctx: SchedulerContext) -> TokenBudgetScheduler:
        return cls(max_batch_tokens=ctx.max_batch_tokens, max_batch_size=ctx.batch_size or None)

    def __init__(self, max_batch_tokens: int = 8192, max_batch_size: int | None = None) -> None:
        self.max_batch_tokens = (
            _positive("max_batch_tokens", max_batch_tokens, self.name, optional=False) or 8192
        )
        self.max_batch_size = _positive("max_batch_size", max_batch_size, self.name)

    def schedule(self, queries: Sequence[Query]) -> list[ScheduledBatch]:
        order = sorted(queries, key=lambda q: q.task_slot)
        out: list[ScheduledBatch] = []
        cur: list[Query] = []
        tokens = 0
        cap = self.max_batch_size
        for q in order:
            if cur and (
                tokens + q.length > self.max_batch_tokens or (cap is not None and len(cur) >= cap)
            ):
                out.append(make_batch(cur, packed=True))
                cur, tokens = [], 0
            cur.append(q)
            tokens += q.length
        if cur:
            out.append(make_batch(cur, packed=True))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_batch_tokens": self.max_batch_tokens,
            "max_batch_size": self.max_batch_size,
        }


class TaskGroupedScheduler(Scheduler):
    """One batch of all queries grouped by task; split only over the caps.

    Padding-free by default (the engine packs sequences); ``packed=False`` pads each batch
    to its longest query, as PetS did. Tokens count as ``Σ lengths`` (packed) or
    ``rows × longest`` (padded).
    """

    name = "task_grouped"
    options = ("max_batch_tokens", "max_batch_size", "packed")

    def __init__(
        self,
        max_batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        packed: bool = True,
    ) -> None:
        self.max_batch_tokens = _positive("max_batch_tokens", max_batch_tokens, self.name)
        self.max_batch_size = _positive("max_batch_size", max_batch_size, self.name)
        self.packed = _flag("packed", packed, self.name)

    @classmethod
    def from_context(cls, ctx: SchedulerContext) -> TaskGroupedScheduler:
        return cls(max_batch_tokens=ctx.max_batch_tokens, max_batch_size=ctx.batch_size or None)

    def schedule(self, queries: Sequence[Query]) -> list[ScheduledBatch]:
        tok_cap, size_cap = self.max_batch_tokens, self.max_batch_size
        if tok_cap is None and size_cap is None:
            return [make_batch(queries, self.packed)] if queries else []
        groups: dict[int, list[Query]] = {}
        for q in queries:
            groups.setdefault(q.task_slot, []).append(q)
        out: list[ScheduledBatch] = []
        cur: list[Query] = []
        total = longest = 0
        for q in (q for g in groups.values() for q in g):
            n_total, n_longest = total + q.length, max(longest, q.length)
            tokens = n_total if self.packed else (len(cur) + 1) * n_longest
            if cur and (
                (tok_cap is not None and tokens > tok_cap)
                or (size_cap is not None and len(cur) >= size_cap)
            ):
                out.append(make_batch(cur, self.packed))
                cur, n_total, n_longest = [], q.length, q.length
            cur.append(q)
            total, longest = n_total, n_longest
        if cur:
            out.append(make_batch(cur, self.packed))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_batch_tokens": self.max_batch_tokens,
            "max_batch_size": self.max_batch_size,
            "packed": self.packed,
        }
