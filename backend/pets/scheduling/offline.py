"""Offline mode: schedule a whole query pool, run every batch, time both.

Unlike the PetS artifact (which built the batches before starting the clock), the
scheduling time is part of the measured wall time and hence of the throughput.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from pets.scheduling.base import Query, ScheduledBatch, Scheduler


def run_offline(
    queries: Sequence[Query],
    scheduler: Scheduler,
    run_batch: Callable[[ScheduledBatch], None],
    sync: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Schedule ``queries`` with ``scheduler`` and call ``run_batch`` on each batch.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs once after the last batch so that
    asynchronous execution is inside the timed region. Returns (times in seconds)::

        policy, num_queries, num_batches, schedule_s, execute_s, total_s,
        qps (queries / total_s), mean_batch_size, real_tokens, padded_tokens
        (Σ rows·padded_length, real tokens for packed batches), padding_overhead
        (padded_tokens / real_tokens - 1)
    """
    lengths = {q.index: q.length for q in queries}
    t0 = time.perf_counter()
    batches = scheduler.schedule(queries)
    t1 = time.perf_counter()
    for b in batches:
        run_batch(b)
    if sync is not None:
        sync()
    t2 = time.perf_counter()
    real = sum(lengths.values())
    padded = sum(
        len(b.indices) * b.padded_length if b.padded_length else sum(lengths[i] for i in b.indices)
        for b in batches
    )
    total = t2 - t0
    return {
        "policy": scheduler.name,
        "num_queries": len(queries),
        "num_batches": len(batches),
        "schedule_s": t1 - t0,
        "execute_s": t2 - t1,
        "total_s": total,
        "qps": len(queries) / total if total > 0 else float("inf"),
        "mean_batch_size": len(queries) / len(batches) if batches else 0.0,
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_overhead": padded / real - 1.0 if real else 0.0,
    }
