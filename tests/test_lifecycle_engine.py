"""Task lifecycle against the in-process Engine, with its store-refresh thread running.

* 1000 register -> request -> update -> request -> unregister cycles (store writes with the
  atomic ``write_task``/``delete_task``), ten at a time, each execute a mixed batch of the
  ten cycling tasks and a stable task;
  every response is checked against outputs computed by a separate engine: a new task is
  served at once (the re-check), an update or removal shows within a second and, until
  then, the previous version answers (never anything else). Memory returns afterwards.
* An engine that gets no requests at all still sees every change within a second.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lifecycle_tasks import (  # fixtures versions, expected: tests/conftest.py
    named,
    pool_usage,
    request,
    which,
)

from pets.engine import Engine
from pets.errors import RequestError
from pets.taskstore import delete_task, write_task

CYCLES = int(os.environ.get("PETS_LIFECYCLE_CYCLES", "1000"))
LANES = 10  # cycles in flight at once (one request each per execute)
VISIBLE_S = 1.0  # the promise: an idle engine (no executes) sees a change within a second


def _refused(out: Any) -> bool:
    return isinstance(out, RequestError) and (
        "unknown task" in out.message or "unregistered" in out.message
    )


def test_idle_engine_sees_changes_within_a_second(tmp_path: Path, versions: list[Any]) -> None:
    eng = Engine.from_parameters({"TASK_STORE": str(tmp_path)})  # default REFRESH_MS, no traffic
    try:
        steps = [
            (
                "register",
                lambda: write_task(tmp_path, *named(versions[0], "idle")),
                lambda: (
                    "idle" in eng.registry.tasks
                    and eng.registry.tasks["idle"].manifest.pet_type == "bitfit"
                ),
            ),
            (
                "update",
                lambda: write_task(tmp_path, *named(versions[1], "idle")),
                lambda: (
                    eng.registry.tasks.get("idle") is not None
                    and eng.registry.tasks["idle"].manifest.pet_type == "lora"
                ),
            ),
            (
                "unregister",
                lambda: delete_task(tmp_path, "idle"),
                lambda: "idle" not in eng.registry.tasks,
            ),
        ]
        for what, act, seen in steps:
            t0 = time.monotonic()
            act()
            while not seen():
                assert time.monotonic() - t0 < VISIBLE_S, f"{what} not seen by an idle engine"
                time.sleep(0.005)
            print(f"idle engine saw {what} after {(time.monotonic() - t0) * 1e3:.0f} ms")
        assert eng.registry.memory_bytes() == 0
    finally:
        eng.close()
    assert eng._refresher is not None and not eng._refresher.is_alive()


@pytest.mark.slow
def test_register_update_unregister_cycles(
    tmp_path: Path, versions: list[Any], expected: list[np.ndarray]
) -> None:
    """CYCLES cycles in LANES lanes: every execute carries one request per lane plus one for a
    stable task (a mixed batch, as Triton delivers them); the store is written between
    executes while the engine's refresh thread runs concurrently, and the execute right after
    each write must already serve it."""
    store = tmp_path / "store"
    write_task(store, *named(versions[0], "stable"))
    eng = Engine.from_parameters({"TASK_STORE": str(store), "REFRESH_MS": "10"})
    n_v, lanes = len(versions), min(LANES, CYCLES)
    base_mem, base_pools = eng.registry.memory_bytes(), pool_usage(eng)
    wrong: list[str] = []
    served = 0

    def serve(names: list[str]) -> list[Any]:
        nonlocal served
        *outs, stable = eng.execute([request(n) for n in names] + [request("stable")])
        served += len(names) + 1
        if which(stable, expected, [0]) is None:
            wrong.append(f"stable task answered {stable!r} next to {names}")
        return outs

    t_start = time.monotonic()
    try:
        for first in range(0, CYCLES, lanes):
            cyc = range(first, min(first + lanes, CYCLES))
            names = [f"cyc{i}" for i in cyc]
            a = [i % n_v for i in cyc]
            b = [(i + 1) % n_v for i in cyc]
            for n, k in zip(names, a, strict=True):  # register
                write_task(store, *named(versions[k], n))
            for n, k, out in zip(names, a, serve(names), strict=True):  # served at once
                if which(out, expected, [k]) is None:
                    wrong.append(f"{n} right after register: {out!r}")
            for n, k in zip(names, b, strict=True):  # update
                write_task(store, *named(versions[k], n))
            for n, k, out in zip(names, b, serve(names), strict=True):  # served at once
                if which(out, expected, [k]) is None:
                    wrong.append(f"{n} right after update: {out!r}")
            for n in names:  # unregister
                delete_task(store, n)
            for n, out in zip(names, serve(names), strict=True):  # refused at once
                if not _refused(out):
                    wrong.append(f"{n} right after unregister: {out!r}")
            assert len(wrong) < 10, "\n".join(wrong)
        elapsed = time.monotonic() - t_start
        eng.maybe_refresh(force=True)
        mem, pools = eng.registry.memory_bytes(), pool_usage(eng)
        tasks = sorted(eng.registry.tasks)
    finally:
        eng.close()
    print(
        f"\n{CYCLES} cycles ({lanes} lanes) in {elapsed:.1f} s, {served} responses checked; "
        f"task memory {base_mem} -> {mem} bytes; pools {pools}"
    )
    assert not wrong, "\n".join(wrong)
    assert tasks == ["stable"]
    assert mem == base_mem, "task memory did not return after unregistering"
    assert pools == base_pools, {
        k: (base_pools.get(k), v) for k, v in pools.items() if base_pools.get(k) != v
    }
