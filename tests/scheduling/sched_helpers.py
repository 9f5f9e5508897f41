"""Brute-force enumerators and random instances shared by the scheduling tests."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np

from pets.scheduling import CostTable, Query

T = TypeVar("T")
TYPES = ("bitfit", "diff_pruning", "maskbert", "adapter")


def set_partitions(items: Sequence[T]) -> Iterator[list[list[T]]]:
    """Every partition of ``items`` into non-empty unordered groups (Bell(n) of them)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        yield [[first], *part]
        for k in range(len(part)):
            yield [*part[:k], [first, *part[k]], *part[k + 1 :]]


def ordered_splits(n: int) -> Iterator[list[tuple[int, int]]]:
    """Every split of ``range(n)`` into contiguous runs ``[(j, i), ...]`` (2^(n-1))."""
    for cuts in itertools.product((False, True), repeat=max(n - 1, 0)):
        runs, start = [], 0
        for k, c in enumerate(cuts, start=1):
            if c:
                runs.append((start, k))
                start = k
        runs.append((start, n))
        yield runs


def random_table(
    rng: np.random.Generator, monotone: bool, max_b: int = 12, max_s: int = 16
) -> CostTable:
    """Integer-grid table (every lookup exact). ``monotone``: non-decreasing in b and s."""
    bs, ss = tuple(range(1, max_b + 1)), tuple(range(1, max_s + 1))

    def grid() -> np.ndarray:
        if monotone:
            inc = rng.uniform(0.0, 1.0, (len(bs), len(ss)))
            return np.cumsum(np.cumsum(inc, axis=0), axis=1) + rng.uniform(0.5, 2.0)
        return rng.uniform(0.1, 5.0, (len(bs), len(ss)))

    return CostTable(
        batch_sizes=bs, seq_lens=ss, alpha_values=grid(), beta_values={t: grid() for t in TYPES}
    )


def random_queries(
    rng: np.random.Generator, n: int, n_tasks: int, max_len: int = 16, types: Sequence[str] = TYPES
) -> list[Query]:
    task_type = [types[int(rng.integers(len(types)))] for _ in range(n_tasks)]
    out = []
    for i in range(n):
        t = int(rng.integers(n_tasks))
        out.append(Query(i, t, task_type[t], int(rng.integers(1, max_len + 1))))
    return out
