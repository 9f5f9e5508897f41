"""Offline mode times scheduling and execution together."""

from __future__ import annotations

import time
from collections.abc import Sequence

from pets.scheduling import Query, ScheduledBatch, Scheduler, make_scheduler, run_offline


class SlowScheduler(Scheduler):
    name = "slow"

    def schedule(self, queries: Sequence[Query]) -> list[ScheduledBatch]:
        time.sleep(0.05)
        return make_scheduler("fixed", batch_size=2).schedule(queries)


def test_run_offline_counts_scheduling_time():
    qs = [Query(i, i % 2, "bitfit", 4 + i) for i in range(5)]
    ran: list[ScheduledBatch] = []
    synced = []
    r = run_offline(qs, SlowScheduler(), ran.append, sync=lambda: synced.append(1))
    assert [len(b) for b in ran] == [2, 2, 1] and synced == [1]
    assert r["num_batches"] == 3 and r["num_queries"] == 5
    assert r["schedule_s"] >= 0.05
    assert r["total_s"] >= r["schedule_s"] + r["execute_s"] - 1e-9
    assert r["qps"] == 5 / r["total_s"]
    assert r["real_tokens"] == sum(q.length for q in qs)
    assert r["padded_tokens"] == 2 * 5 + 2 * 7 + 8
    assert r["padding_overhead"] > 0
