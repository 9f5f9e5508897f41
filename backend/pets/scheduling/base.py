"""The scheduler contract: queries in, engine batches out.

The engine hands a scheduler the queries of one ``execute`` call (or one offline pool) and
runs every returned :class:`ScheduledBatch` as ONE mixed-task forward. Contract, checked by
:func:`validate_schedule` (and by the tests for every policy):

* every query index appears in exactly one batch;
* inside a batch the indices are grouped contiguously by task (one engine segment per
  task), keeping the first-appearance order of tasks and the policy's order of queries
  inside a task (stable grouping, see :func:`group_by_task`);
* ``padded_length`` is the length the batch is costed (and may be padded) at: the longest
  query in the batch for the padded path, ``0`` for the packed (padding-free) path.

Units: lengths are in tokens; every cost in this package is in seconds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pets.pet import pet_types

PET_TYPES: tuple[str, ...] = tuple(pet_types())
"""PET type names known to the scheduler and the cost model: the registry's, in code order."""


@dataclass(frozen=True)
class SchedulerContext:
    """What the engine offers a policy to configure itself from (:meth:`Scheduler.from_context`).

    ``max_batch_tokens`` caps the tokens of one forward; ``batch_size`` the sequences (0: the
    policy's own default); ``cost_model`` builds the cost model, called only by the policies
    that use one (the engine's profiled table, or the analytic model of its device).
    """

    max_batch_tokens: int
    batch_size: int = 0
    cost_model: Callable[[], Any] | None = None


@dataclass(frozen=True)
class Query:
    """One sequence to serve.

    ``index`` is its position in the caller's list (answers go back in this order),
    ``task_slot`` the task identity, ``pet_type`` one of :data:`PET_TYPES`, ``length`` the
    number of tokens (>= 1).
    """

    index: int
    task_slot: int
    pet_type: str
    length: int


@dataclass(frozen=True)
class ScheduledBatch:
    """One engine forward: query indices grouped contiguously by task.

    ``padded_length`` (tokens): the length used for cost, i.e. the longest query of the
    batch on the padded path, or 0 for a packed (padding-free) batch.
    """

    indices: tuple[int, ...]
    padded_length: int

    def __len__(self) -> int:
        return len(self.indices)


class Scheduler(ABC):
    """A batching policy. Subclasses set ``name`` and keep their whole logic inside."""

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()
    """Keyword options ``__init__`` accepts (the registry checks names against this)."""

    @classmethod
    def from_context(cls, ctx: SchedulerContext) -> Scheduler:
        """The policy configured from the engine's settings; each policy takes what it uses."""
        raise NotImplementedError(f"{cls.__name__} does not define from_context")

    @abstractmethod
    def schedule(self, queries: Sequence[Query]) -> list[ScheduledBatch]:
        """Partition ``queries`` into engine batches (see the module docstring)."""

    def describe(self) -> dict[str, Any]:
        """Name and option values, for logs and experiment CSVs."""
        return {"name": self.name}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({opts})"


def group_by_task(queries: Iterable[Query]) -> list[Query]:
    """Stable grouping by task: tasks in first-appearance order, queries in input order.

    O(n); used to lay out every batch as contiguous per-task segments.
    """
    groups: dict[int, list[Query]] = {}
    for q in queries:
        groups.setdefault(q.task_slot, []).append(q)
    return [q for g in groups.values() for q in g]


def make_batch(queries: Sequence[Query], packed: bool = False) -> ScheduledBatch:
    """Build a :class:`ScheduledBatch` from ``queries`` (grouped by task, stable)."""
    grouped = group_by_task(queries)
    padded = 0 if packed or not grouped else max(q.length for q in grouped)
    return ScheduledBatch(tuple(q.index for q in grouped), padded)


def validate_schedule(queries: Sequence[Query], batches: Sequence[ScheduledBatch]) -> None:
    """Raise ``AssertionError`` unless ``batches`` satisfies the contract for ``queries``."""
    by_index = {q.index: q for q in queries}
    seen: set[int] = set()
    for b in batches:
        assert len(b.indices) > 0, "empty batch"
        tasks_done: set[int] = set()
        prev_task: int | None = None
        for i in b.indices:
            assert i in by_index, f"unknown query index {i}"
            assert i not in seen, f"query {i} scheduled twice"
            seen.add(i)
            t = by_index[i].task_slot
            if t != prev_task:
                assert t not in tasks_done, f"task {t} split into two segments of a batch"
                if prev_task is not None:
                    tasks_done.add(prev_task)
                prev_task = t
        longest = max(by_index[i].length for i in b.indices)
        assert b.padded_length == 0 or b.padded_length >= longest, (
            f"padded_length {b.padded_length} < longest query {longest}"
        )
    missing = set(by_index) - seen
    assert not missing, f"queries never scheduled: {sorted(missing)[:10]}"
