"""PetS Fig. 12: throughput of batching policies, normalised to fixed batching.

Query pools as in the PetS artifact (``prepare_query_pool``): ``--queries`` (1024) queries,
length ``int(N(32, std))`` clipped to [1, 128] for std in {1, 2, 4, 8}, task uniform over
the first ``num_tasks`` (32/64/128) of 128 loaded tasks whose PET types are drawn
uniformly from ``--pet-types`` (default the paper's four; ``all``: every registered type but
``none``); numpy seed 1.

Each policy runs the pool in offline mode (:func:`pets.scheduling.run_offline`: the
scheduling time counts) through an :class:`OfflineExecutor`:

* ``--executor simulated`` (default, runs anywhere): each batch "costs" what the cost model
  says (:func:`pets.scheduling.batch_cost`), nothing is executed. The schedulers and the
  simulator share one model, so this shows the policies' logic, not real speed-ups.
* ``--executor engine``: the real engine (``pets.engine.Engine``, :class:`EngineExecutor`):
  every scheduled batch is one mixed-task forward; ``--param``/``--model-dir``/``--device``
  configure it as ``config.pbtxt`` would; pool tasks are the store's tasks.
Online (through tritonserver and perf_analyzer) is ``clients.paper.fig12_online``.

Writes ``fig12.csv`` and ``fig12.png`` to a dated run folder under ``--out``
(``clients/bench/results.py``).

    python -m clients.paper.fig12                                   # simulated, anywhere
    python -m clients.paper.fig12 --executor engine --device cuda:0 --param BACKBONE=bert-base \
        --param DTYPE=float16 --param TASK_STORE=var/fig12_store
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from clients.bench.results import Run, add_out_argument, pyplot, start_run
from clients.pets_client import parse_subset
from pets.pet import pet_types
from pets.scheduling import (
    AnalyticModel,
    CostModel,
    Query,
    ScheduledBatch,
    batch_cost,
    load_cost_model,
    make_scheduler,
    run_offline,
)

# The PET types of the PetS paper's Fig. 12 workload (the default pool).
PETS_TYPES = ("maskbert", "diff_pruning", "bitfit", "adapter")
POLICIES = ("fixed", "beta_only", "alpha_only", "coordinated", "token_budget", "task_grouped")
LOADED_TASKS = 128


def make_pool(
    n_queries: int,
    num_tasks: int,
    std: float,
    mean: float = 32.0,
    pet_types: Sequence[str] = PETS_TYPES,
    seed: int = 1,
    loaded_tasks: int = LOADED_TASKS,
    task_types: Sequence[str] | None = None,
) -> list[Query]:
    """A PetS-style query pool: ``Query.index`` = position, lengths in [1, 128] tokens.

    Task ``k``'s PET type is ``task_types[k]`` if given (a real task store), else drawn
    uniformly from ``pet_types`` for ``loaded_tasks`` tasks.
    """
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(pet_types), max(loaded_tasks, num_tasks))
    types = list(task_types) if task_types is not None else [pet_types[int(k)] for k in drawn]
    if len(types) < num_tasks:
        raise SystemExit(
            f"the task store has {len(types)} tasks, the pool needs {num_tasks}; "
            "create more tasks (`pets create`) or lower --tasks"
        )
    tasks = rng.integers(0, num_tasks, n_queries)
    lengths = np.clip(rng.normal(mean, std, n_queries).astype(np.int64), 1, 128)
    return [
        Query(i, int(t), types[int(t)], int(n))
        for i, (t, n) in enumerate(zip(tasks, lengths, strict=True))
    ]


class OfflineExecutor(Protocol):
    """Runs one scheduled batch (its queries, grouped by task) as one engine forward."""

    def prepare(self, queries: Sequence[Query]) -> None:
        """Called once per pool, outside the timed region (e.g. make token ids)."""

    def run(self, batch_queries: Sequence[Query]) -> None: ...

    def sync(self) -> None:
        """Wait for asynchronous work (inside the timed region)."""

    @property
    def simulated_s(self) -> float | None:
        """Simulated execution seconds since ``prepare`` (None for real executors)."""


class SimulatedExecutor:
    """Charges each batch its cost-model time instead of running it."""

    def __init__(self, model: CostModel) -> None:
        self.model, self._t, self._packed = model, 0.0, False

    def prepare(self, queries: Sequence[Query]) -> None:
        self._t = 0.0

    def run_scheduled(self, batch: ScheduledBatch, queries: Sequence[Query]) -> None:
        self._t += batch_cost(self.model, queries, batch.padded_length)

    def run(self, batch_queries: Sequence[Query]) -> None:
        self._t += batch_cost(self.model, batch_queries, max(q.length for q in batch_queries))

    def sync(self) -> None:
        pass

    @property
    def simulated_s(self) -> float | None:
        return self._t


class EngineExecutor:
    """The real engine, offline: each scheduled batch is one ``encoder.forward``.

    Pool task ``k`` is the ``k``-th task (by name) of the engine's task store, so the pool's
    PET types are the store's (:meth:`task_types`); the store needs >= ``num_tasks`` tasks
    (``pets create`` makes random ones). The engine packs sequences (padding-free), so
    ``padded_length`` only matters for the policies' cost model.
    TODO(lead): switch to a public offline entry point if the engine grows one.
    """

    def __init__(self, params: dict[str, str], model_dir: str | None, device: str) -> None:
        from pets.engine import Engine

        self.engine = Engine.from_parameters(params, model_dir=model_dir or ".", device=device)
        reg = self.engine.registry
        self.names = sorted(reg.tasks)
        self.slots = [reg.tasks[n].slot for n in self.names]
        self.tokens: dict[int, np.ndarray] = {}

    def task_types(self) -> list[str]:
        reg = self.engine.registry
        return [str(reg.tasks[n].manifest.pet_type) for n in self.names]

    def prepare(self, queries: Sequence[Query]) -> None:
        rng = np.random.default_rng(0)
        vocab = int(self.engine.spec.vocab)
        self.tokens = {q.index: rng.integers(1000, max(1001, vocab - 1), q.length) for q in queries}

    def run(self, batch_queries: Sequence[Query]) -> None:
        batch = self.engine.encoder.batch(
            [self.tokens[q.index] for q in batch_queries],
            [self.slots[q.task_slot] for q in batch_queries],
        )
        with self.engine.registry.lock:
            self.engine.encoder.forward(batch)

    def sync(self) -> None:
        if self.engine.device.type == "cuda":
            import torch

            torch.cuda.synchronize()

    @property
    def simulated_s(self) -> float | None:
        return None


def make_executor(
    kind: str,
    *,
    cost_model: CostModel,
    params: dict[str, str] | None = None,
    model_dir: str | None = None,
    device: str = "cuda",
) -> OfflineExecutor:
    """``"simulated"`` or ``"engine"`` (see the module docstring)."""
    if kind == "simulated":
        return SimulatedExecutor(cost_model)
    if kind == "engine":
        return EngineExecutor(params or {}, model_dir, device)
    raise SystemExit(f"unknown --executor {kind!r}; use simulated or engine")


def measure_policy(
    pool: list[Query],
    policy: str,
    cost_model: CostModel,
    executor: OfflineExecutor,
    fixed_batch: int,
) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if policy == "fixed":
        opts["batch_size"] = fixed_batch
    elif policy in ("alpha_only", "beta_only", "coordinated"):
        opts["cost_model"] = cost_model
    sched = make_scheduler(policy, **opts)
    by_index = {q.index: q for q in pool}
    executor.prepare(pool)

    def run_batch(b: ScheduledBatch) -> None:
        qs = [by_index[i] for i in b.indices]
        if isinstance(executor, SimulatedExecutor):
            executor.run_scheduled(b, qs)  # packed batches are costed as packed
        else:
            executor.run(qs)

    r = run_offline(pool, sched, run_batch, sync=executor.sync)
    sim = executor.simulated_s
    if sim is not None:  # simulated: wall time = scheduling + modelled execution
        r["execute_s"] = sim
        r["total_s"] = r["schedule_s"] + sim
        r["qps"] = len(pool) / r["total_s"]
    return r


def parse_pet_types(spec: str) -> tuple[str, ...]:
    """``--pet-types``: a comma list of registered types, or ``all`` (every one but none)."""
    known = [t for t in sorted(pet_types()) if t != "none"]
    return tuple(parse_subset(spec, known, "--pet-types"))


def plot(rows: list[dict[str, Any]], policies: Sequence[str], path: Path, title: str) -> None:
    plt = pyplot()
    tasks = sorted({r["num_tasks"] for r in rows}, reverse=True)
    stds = sorted({r["std"] for r in rows})
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(4.5 * len(tasks), 3.6), sharey=True, squeeze=False
    )
    width = 0.8 / len(policies)
    for ax, nt in zip(axes[0], tasks, strict=True):
        for k, p in enumerate(policies):
            ys = [
                next(
                    (
                        r["qps_norm"]
                        for r in rows
                        if r["num_tasks"] == nt and r["std"] == s and r["policy"] == p
                    ),
                    np.nan,
                )
                for s in stds
            ]
            ax.bar(np.arange(len(stds)) + (k - (len(policies) - 1) / 2) * width, ys, width, label=p)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xticks(np.arange(len(stds)), [f"std={s:g}" for s in stds])
        ax.set_title(f"{nt} tasks")
    axes[0][0].set_ylabel("QPS / fixed batching")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(policies), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="PetS Fig. 12: batching policies vs fixed")
    add_out_argument(ap)
    ap.add_argument("--queries", type=int, default=1024)
    ap.add_argument("--stds", default="1,2,4,8")
    ap.add_argument("--tasks", default="128,64,32")
    ap.add_argument(
        "--pet-types",
        default=",".join(PETS_TYPES),
        help="comma list of PET types, or 'all' (default: the paper's %(default)s)",
    )
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--fixed-batch", type=int, default=32, help="fixed batching size (PetS 32)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per point (median QPS)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--cost-table",
        default=None,
        help="JSON cost table from `pets profile` (default: analytic model)",
    )
    ap.add_argument(
        "--sim-device", default="cuda", help="analytic model defaults when no table: cuda or cpu"
    )
    ap.add_argument("--executor", default="simulated", choices=("simulated", "engine"))
    eng = ap.add_argument_group("engine (--executor engine)")
    eng.add_argument("--model-dir", default=None)
    eng.add_argument("--device", default="cuda")
    eng.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="engine parameter as in config.pbtxt (repeatable)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    if "fixed" not in policies:
        policies.insert(0, "fixed")
    model = load_cost_model(args.cost_table, AnalyticModel.for_device(args.sim_device))
    params = dict(kv.split("=", 1) for kv in args.param)
    executor = make_executor(
        args.executor, cost_model=model, params=params, model_dir=args.model_dir, device=args.device
    )
    types = parse_pet_types(args.pet_types)
    with start_run("fig12", args.out, params=vars(args)) as run:
        return _sweep(args, run, policies, model, executor, types)


def _sweep(
    args: argparse.Namespace,
    run: Run,
    policies: list[str],
    model: CostModel,
    executor: OfflineExecutor,
    types: tuple[str, ...],
) -> int:
    rows: list[dict[str, Any]] = []
    fields = [
        "num_tasks",
        "std",
        "policy",
        "executor",
        "num_batches",
        "mean_batch_size",
        "schedule_ms",
        "execute_ms",
        "qps",
        "qps_norm",
        "padding_overhead",
    ]
    with run.path("fig12.csv").open("w", newline="") as csv_file:  # written per point
        writer = csv.DictWriter(csv_file, fieldnames=fields)
        writer.writeheader()
        for nt in (int(x) for x in args.tasks.split(",")):
            for std in (float(x) for x in args.stds.split(",")):
                pool = make_pool(
                    args.queries,
                    nt,
                    std,
                    pet_types=types,
                    seed=args.seed,
                    task_types=getattr(executor, "task_types", lambda: None)(),
                )
                point: dict[str, dict[str, Any]] = {}
                for p in policies:
                    runs = [
                        measure_policy(pool, p, model, executor, args.fixed_batch)
                        for _ in range(args.repeats)
                    ]
                    qps = statistics.median(r["qps"] for r in runs)
                    best = min(runs, key=lambda r: abs(r["qps"] - qps))
                    point[p] = {**best, "qps": qps}
                base = point["fixed"]["qps"]
                for p in policies:
                    r = point[p]
                    rows.append(
                        {
                            "num_tasks": nt,
                            "std": std,
                            "policy": p,
                            "executor": args.executor,
                            "num_batches": r["num_batches"],
                            "mean_batch_size": round(r["mean_batch_size"], 2),
                            "schedule_ms": round(1e3 * r["schedule_s"], 3),
                            "execute_ms": round(1e3 * r["execute_s"], 3),
                            "qps": round(r["qps"], 1),
                            "qps_norm": round(r["qps"] / base, 3),
                            "padding_overhead": round(r["padding_overhead"], 3),
                        }
                    )
                    writer.writerow(rows[-1])
                csv_file.flush()
                print(
                    f"tasks={nt:3d} std={std:g}: "
                    + "  ".join(f"{p}={point[p]['qps'] / base:.2f}" for p in policies),
                    flush=True,
                )
    src = args.cost_table or f"analytic ({args.sim_device})"
    plot(
        rows,
        policies,
        run.path("fig12.png"),
        f"QPS normalised to fixed batching (bs {args.fixed_batch}); executor "
        f"{args.executor}; cost model {src}; {args.queries} queries, mean length 32",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
