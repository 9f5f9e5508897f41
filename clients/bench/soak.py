"""Soak: mixed valid, invalid and lifecycle traffic against a running server, with memory.

    python -m clients.bench.soak --url 127.0.0.1:8000 --minutes 30 --token "$PETS_ADMIN_TOKEN"

``--workers`` threads send, for ``--minutes`` (default 30), a mix of

* valid requests (ids and TEXT, 1-4 rows) for the store's tasks; every answer must equal the
  answer the same request got alone at the start (rtol 1e-4, atol 1e-5): else it is WRONG;
* invalid requests (unknown task, over-long name, TEXT over MAX_TEXT_BYTES, ids outside the
  vocabulary, ids over MAX_SEQ_LEN, rows of different widths when the store has them), each
  of which must be refused with INVALID_ARG: an answer is WRONG;
* with ``--token``, lifecycle cycles on the task ``soak_life`` through ``pets_admin``:
  register, infer (must succeed), update, infer, unregister, infer (must be refused).

Every ``--sample-s`` seconds it samples the resident memory (VmRSS) of the ``pets`` stub
processes on this host (``triton_python_backend_stub`` with the model's folder in its
command line; ``--server-pid`` limits it to one server's process group) and, where
``nvidia-smi`` exists, their GPU memory. It writes ``soak.csv`` (one row per sample),
``soak.png`` and a manifest into a dated run folder (clients/bench/results.py) and prints
the memory growth after warm-up: ``growth % = (median of the last 10% of samples - median
of the first 10% after --warmup-s) / that baseline * 100``.

``--fault-at S`` kills one ``pets`` stub (SIGKILL) S seconds in, then probes every second
like clients/canary.py; ``--admin-key`` (and a server in ``--model-control-mode=explicit``)
lets it reload the model as the canary's ``--reload`` does. It reports the requests that
failed between the kill and the recovery, and the recovery time (memory growth is not
computed across a restart). Exit status: 0 when nothing was WRONG (and the model recovered),
1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clients.bench.results import add_out_argument, pyplot, start_run
from clients.canary import probe as canary_probe
from clients.canary import reload as canary_reload
from clients.pets_client import DEFAULT_URL, MODEL, admin_inputs, build_inputs, client_module

RTOL, ATOL = 1e-4, 1e-5
LIFE_TASK = "soak_life"
TEXTS = ["a gripping, beautifully shot film", "the service was slow and the food cold",
         "quarterly revenue rose four percent", "il pleut sur la ville"]  # fmt: skip


# ------------------------------------------------------------------------------ memory
def stub_pids(model: str, server_pid: int | None = None) -> list[int]:
    """pids of the ``model`` stubs on this host (of ``server_pid``'s process group if given)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if server_pid is not None and os.getpgid(int(proc.name)) != server_pid:
                continue
        except (OSError, ProcessLookupError):
            continue
        if (
            cmd
            and cmd[0].endswith(b"triton_python_backend_stub")
            and any(f"/{model}/".encode() in c or c.endswith(f"/{model}".encode()) for c in cmd[1:])
        ):
            out.append(int(proc.name))
    return sorted(out)


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def gpu_mb(pids: list[int]) -> float | None:
    """GPU memory of ``pids`` in MiB from nvidia-smi; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        text = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    used = 0.0
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
            used += float(parts[1])
    return used


def growth_pct(rows: list[dict[str, Any]], warmup_s: float, key: str = "rss_mb") -> float | None:
    """Memory growth after warm-up in % (module docstring); None with too few samples."""
    after = [r[key] for r in rows if r["t_s"] >= warmup_s and r[key]]
    if len(after) < 4:
        return None
    n = max(1, len(after) // 10)
    base, last = float(np.median(after[:n])), float(np.median(after[-n:]))
    return (last - base) / base * 100.0


# ------------------------------------------------------------------------------ traffic
@dataclass
class Tally:
    counts: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    failures: list[tuple[float, str]] = field(default_factory=list)  # (time, message)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str, wrong: str | None = None, failed_at: float | None = None) -> None:
        with self.lock:
            self.counts[key] += 1
            if wrong is not None and len(self.wrong) < 50:
                self.wrong.append(wrong[:300])
            if failed_at is not None:
                self.failures.append((failed_at, key))


class Soak:
    """The traffic of one soak run (module docstring)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mod = client_module(args.protocol)
        self.url = args.url or DEFAULT_URL[args.protocol]
        self.tally = Tally()
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.outage: list[float] = []  # [kill time, recovery time] of the fault, seconds
        client = self.client()
        self.tasks = args.tasks.split(",") if args.tasks else self._discover(client)
        if not self.tasks:
            raise SystemExit("soak: no tasks to send; pass --tasks or --token (admin list)")
        self.probes = self._probes(client)
        self.widths = {
            t: out.shape[1] for (t, kind, _), out in self.probes.items() if kind == "ids"
        }
        self.t0 = time.monotonic()  # the run starts once the oracle answers are in

    def client(self) -> Any:
        return self.mod.InferenceServerClient(self.url)

    def _discover(self, client: Any) -> list[str]:
        if not self.args.token:
            return []
        raw = client.infer("pets_admin", admin_inputs(self.mod, self.args.token, "list"))
        listed = json.loads(raw.as_numpy("RESULT")[0])["tasks"]
        return [t["name"] for t in listed if t.get("pet") != "INVALID" and t["name"] != LIFE_TASK]

    def _probes(self, client: Any) -> dict[tuple[str, str, int], np.ndarray]:
        """Each task's answer alone to fixed ids and TEXT requests of 1-4 rows (the oracle)."""
        rng = np.random.default_rng(0)
        self.ids: dict[int, np.ndarray] = {}
        for rows in (1, 4):
            ids = rng.integers(1000, 30000, size=(rows, 6 + 3 * rows), dtype=np.int64)
            ids[:, 0], ids[:, -1] = 101, 102
            self.ids[rows] = ids
        out = {}
        for task in self.tasks:
            for rows in (1, 4):
                res = client.infer(MODEL, build_inputs(self.mod, task, ids=self.ids[rows]))
                out[(task, "ids", rows)] = res.as_numpy("OUTPUT")
                res = client.infer(MODEL, build_inputs(self.mod, task, texts=TEXTS[:rows]))
                out[(task, "text", rows)] = res.as_numpy("OUTPUT")
        return out

    def now(self) -> float:
        return time.monotonic() - self.t0

    def outside_fault(self, started: float) -> bool:
        """Whether a request sent at ``started`` (seconds) that failed is outside the fault:
        no stub was killed yet, or it was sent after the server was healthy again. One in
        flight across the recovery (sent to the dead or reloading stub) is the fault's."""
        if not self.outage:
            return True
        return len(self.outage) == 2 and started > self.outage[1]

    # one step of each traffic kind -----------------------------------------------------
    def valid(self, client: Any, rng: random.Random) -> None:
        task, kind, rows = rng.choice(list(self.probes))
        inputs = (
            build_inputs(self.mod, task, ids=self.ids[rows])
            if kind == "ids"
            else build_inputs(self.mod, task, texts=TEXTS[:rows])
        )
        started = self.now()
        try:
            out = client.infer(MODEL, inputs).as_numpy("OUTPUT")
        except Exception as exc:  # an outage (fault test) or a real failure
            self.tally.add("valid_failed", failed_at=self.now())
            if self.outside_fault(started):
                self.tally.add("valid_failed_outside_fault", wrong=f"{task}: {exc}")
            return
        want = self.probes[(task, kind, rows)]
        if out.shape != want.shape or not np.allclose(out, want, rtol=RTOL, atol=ATOL):
            diff = float(np.abs(out - want).max()) if out.shape == want.shape else "shape"
            self.tally.add("wrong", wrong=f"{task} {kind} x{rows}: max diff {diff}")
        else:
            self.tally.add("valid_ok")

    def invalid(self, client: Any, rng: random.Random) -> None:
        task = rng.choice(self.tasks)
        other = [t for t in self.tasks if self.widths[t] != self.widths[task]]
        cases = [
            ("unknown", build_inputs(self.mod, f"soak_no_{rng.randrange(1000)}", ids=[[101, 2]])),
            ("long_name", build_inputs(self.mod, "n" * 5000, ids=[[101, 102]])),
            ("big_text", build_inputs(self.mod, task, texts=["w" * 70_000])),
            ("vocab", build_inputs(self.mod, task, ids=[[101, 10**9]])),
            ("too_long", build_inputs(self.mod, task, ids=np.full((1, 600), 1000))),
        ]  # fmt: skip
        if other:
            cases.append(
                ("widths", build_inputs(self.mod, [task, other[0]], ids=self.ids[1][[0, 0]]))
            )
        name, inputs = rng.choice(cases)
        try:
            client.infer(MODEL, inputs)
        except Exception as exc:
            status = str(getattr(exc, "status", lambda: "")())
            if status in ("400", "StatusCode.INVALID_ARGUMENT"):
                self.tally.add("invalid_refused")
            else:  # a refusal for the wrong reason (e.g. during the fault's outage)
                self.tally.add("invalid_other_error", failed_at=self.now())
            return
        self.tally.add("wrong", wrong=f"invalid case {name} was answered")

    def lifecycle(self, client: Any, rng: random.Random) -> None:
        from pets.admin import safetensors_bytes
        from pets.heads import HeadConfig
        from pets.taskgen import random_task

        args, mod = self.args, self.mod
        if not hasattr(self, "_life"):
            from pets.backbone import load_backbone, resolve_checkpoint

            self._life = load_backbone(resolve_checkpoint(args.backbone))
        head = HeadConfig("classification", num_labels=2)
        steps = [("register", 0), ("update", 1)]
        # a cycle cut short (e.g. by the fault's outage) may have left the task behind
        with contextlib.suppress(Exception):
            client.infer("pets_admin", admin_inputs(mod, args.token, "unregister", LIFE_TASK))
        started = self.now()
        try:
            for action, seed in steps:
                m, t = random_task(
                    self._life, LIFE_TASK, rng.choice(["lora", "bitfit"]), head, seed
                )
                manifest, weights = json.dumps(m.to_json()), safetensors_bytes(t)
                req = admin_inputs(mod, args.token, action, LIFE_TASK, manifest, weights)
                client.infer("pets_admin", req)
                client.infer(MODEL, build_inputs(mod, LIFE_TASK, ids=self.ids[1]))
            client.infer("pets_admin", admin_inputs(mod, args.token, "unregister", LIFE_TASK))
        except Exception as exc:
            self.tally.add("lifecycle_failed", failed_at=self.now())
            if self.outside_fault(started):
                self.tally.add("lifecycle_failed_outside_fault", wrong=f"lifecycle: {exc}")
            return
        try:
            client.infer(MODEL, build_inputs(mod, LIFE_TASK, ids=self.ids[1]))
            self.tally.add("wrong", wrong="an unregistered task was served")
        except Exception:
            self.tally.add("lifecycle_ok")

    def worker(self, k: int) -> None:
        rng = random.Random(k)
        client = self.client()
        life = self.args.token is not None and k == 0  # one lane does the lifecycle
        while not self.stop.is_set():
            r = rng.random()
            if life and r < 0.1:
                self.lifecycle(client, rng)
            elif r < 0.3:
                self.invalid(client, rng)
            else:
                self.valid(client, rng)

    def fault(self, server_pid: int | None) -> None:
        """Kill one stub, then probe every second (reloading with --admin-key) until healthy."""
        pids = stub_pids(self.args.model, server_pid)
        if not pids:
            print("soak: --fault-at: no stub process found on this host", file=sys.stderr)
            self.outage = [self.now(), float("nan")]
            return
        os.kill(pids[0], signal.SIGKILL)
        self.outage = [self.now()]
        print(f"soak: killed stub pid {pids[0]} at {self.outage[0]:.1f} s", flush=True)
        client, task = self.client(), self.tasks[0]
        reloaded = False
        while self.now() < self.outage[0] + 600:
            try:
                canary_probe(client, self.mod, self.args.model, task)
                self.outage.append(self.now())
                print(f"soak: healthy again at {self.outage[1]:.1f} s", flush=True)
                return
            except Exception:
                if self.args.admin_key and not reloaded:
                    reloaded = True
                    print("soak: UNHEALTHY; reloading the model (canary --reload)", flush=True)
                    try:
                        canary_reload(client, self.args.model, self.args.admin_key, 300.0)
                    except Exception as exc:
                        print(f"soak: reload failed: {exc}", file=sys.stderr, flush=True)
                time.sleep(1.0)


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=("http", "grpc"), default="http")
    ap.add_argument("--url", help="server address (default 127.0.0.1:8000 / :8001)")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument(
        "--warmup-s",
        type=float,
        default=None,
        help="seconds excluded from the growth figure (default: 10%% of the run)",
    )
    ap.add_argument("--sample-s", type=float, default=5.0, help="seconds between memory samples")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--tasks", help="comma list of tasks (default: pets_admin list, needs --token)")
    ap.add_argument(
        "--token",
        default=os.environ.get("PETS_ADMIN_TOKEN"),
        help="pets_admin token: task discovery and lifecycle traffic",
    )
    ap.add_argument("--backbone", default="default", help="for the lifecycle tasks")
    ap.add_argument("--server-pid", type=int, help="sample only this server's stubs")
    ap.add_argument("--fault-at", type=float, help="kill a stub this many seconds in")
    ap.add_argument(
        "--admin-key",
        default=os.environ.get("PETS_ADMIN_KEY"),
        help="admin-key for the reload after --fault-at",
    )
    add_out_argument(ap)
    return ap.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    duration = args.minutes * 60.0
    warmup = args.warmup_s if args.warmup_s is not None else 0.1 * duration
    soak = Soak(args)
    run = start_run("soak", args.out, params=vars(args))
    threads = [threading.Thread(target=soak.worker, args=(k,), daemon=True)
               for k in range(args.workers)]  # fmt: skip
    for th in threads:
        th.start()
    fault_thread = None
    rows: list[dict[str, Any]] = []
    # with --fault-at the run lasts until the model recovered (or the reload gave up)
    while (t := soak.now()) < duration or (fault_thread is not None and fault_thread.is_alive()):
        if args.fault_at is not None and fault_thread is None and t >= args.fault_at:
            fault_thread = threading.Thread(target=soak.fault, args=(args.server_pid,), daemon=True)
            fault_thread.start()
        pids = stub_pids(args.model, args.server_pid)
        with soak.tally.lock:
            c = dict(soak.tally.counts)
        keys = ("valid_ok", "invalid_refused", "lifecycle_ok", "wrong", "valid_failed")
        rows.append(
            {
                "t_s": round(t, 2),
                "stubs": len(pids),
                "rss_mb": round(sum(rss_mb(p) for p in pids), 2),
                "gpu_mb": gpu_mb(pids),
                **{k: c.get(k, 0) for k in keys},
            }
        )
        print(
            f"{t:7.1f} s  stubs {len(pids)}  rss {rows[-1]['rss_mb']:9.1f} MiB  "
            f"{json.dumps(c, sort_keys=True)}",
            flush=True,
        )
        soak.stop.wait(min(args.sample_s, max(0.5, duration - soak.now())))
    soak.stop.set()
    for th in threads:
        th.join(timeout=60)
    if fault_thread is not None:
        fault_thread.join(timeout=60)
    counts, wrong = dict(soak.tally.counts), list(soak.tally.wrong)
    summary: dict[str, Any] = {"duration_s": round(soak.now(), 1), "warmup_s": warmup,
                               "counts": counts, "wrong": wrong}  # fmt: skip
    fault_ok = True
    if args.fault_at is not None:
        kill = soak.outage[0] if soak.outage else None
        back = soak.outage[1] if len(soak.outage) == 2 else None
        failed = [f for f in soak.tally.failures if kill is not None and f[0] >= kill]
        summary["fault"] = {
            "killed_at_s": kill,
            "recovered_at_s": back,
            "recovery_s": None if back is None or kill is None else round(back - kill, 1),
            "failed_requests": len(failed),
            "failed_after_recovery": sum(1 for f in failed if back is not None and f[0] > back + 1),
        }
        fault_ok = back is not None and back == back  # not NaN
        print(f"fault: {json.dumps(summary['fault'])}")
    else:
        rss = growth_pct(rows, warmup)
        gpu = growth_pct(rows, warmup, "gpu_mb") if any(r["gpu_mb"] for r in rows) else None
        after = [r["rss_mb"] for r in rows if r["t_s"] >= warmup]
        summary.update(rss_growth_pct=rss, gpu_growth_pct=gpu,
                       rss_after_warmup_mb=after[0] if after else None,
                       rss_end_mb=rows[-1]["rss_mb"] if rows else None)  # fmt: skip
        print(f"memory growth after warm-up ({warmup:.0f} s): RSS "
              f"{'n/a' if rss is None else f'{rss:+.2f} %'} ({summary['rss_after_warmup_mb']} -> "
              f"{summary['rss_end_mb']} MiB)"
              + ("" if gpu is None else f", GPU {gpu:+.2f} %"))  # fmt: skip
    print(f"requests: {json.dumps(counts, sort_keys=True)}; WRONG: {len(wrong)}")
    for w in wrong[:10]:
        print(f"  WRONG {w}")
    run.write_csv("soak.csv", rows)
    run.write_json("summary.json", summary)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([r["t_s"] for r in rows], [r["rss_mb"] for r in rows], label="pets stubs RSS (MiB)")
    if any(r["gpu_mb"] for r in rows):
        ax.plot([r["t_s"] for r in rows], [r["gpu_mb"] or 0 for r in rows], label="GPU (MiB)")
    ax.axvline(warmup, color="grey", linestyle="--", label="end of warm-up")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run.path("soak.png"), dpi=100)
    run.update(summary=summary)
    run.finish("ok" if not wrong and fault_ok else "wrong answers or no recovery")
    return 0 if not wrong and fault_ok else 1


if __name__ == "__main__":
    sys.exit(main())
