"""Scale-out rehearsal on one machine: 3 tritonserver replicas, one shared task store, nginx.

Three replicas (one CPU `pets` instance each, bert-tiny, plus `pets_admin`) serve one task
store folder behind a real nginx (an HTTP and a gRPC upstream). Client threads send a
mixed-task load through nginx over both protocols while the test

* registers, updates and unregisters a task through replica A's `pets_admin` and asks every
  replica directly right after each call returned (docs/operations.md promises the change on
  the first request; the residency gauge gives the time an idle replica takes on its own),
* SIGKILLs replica C (server and stubs) mid-load, 50 ms after a burst of requests went out
  (so that some are in flight at C), registers a task while C is down, and restarts C on the
  same ports.

Checks: every answer equals the in-process engine's (which a direct answer of every replica
equals first); failed attempts were all routed to C and started before C died (nginx's
access log names the upstream of every attempt; the client retries a failed attempt); the
changes are served by every replica on the first request. The figures are printed (run
with -s). PETS_SCALEOUT_LOAD_S stretches the load phases for a longer run.
"""

from __future__ import annotations

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
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lifecycle_tasks import ATOL, RTOL, make_versions, named
from tritonclient.utils import InferenceServerException

from clients.pets_client import admin_inputs, build_inputs, client_module, free_ports, triton_env
from pets.admin import safetensors_bytes
from pets.backbone import load_backbone
from pets.engine import Engine
from pets.metrics import parse_prometheus
from pets.taskstore import write_task

from .conftest import ROOT, _shm_regions, _stop

pytestmark = pytest.mark.triton
TOKEN = "scaleout-rehearsal-token-5b2e"
BACKBONE = "bert-tiny"
STABLE = ("mix_bitfit", "mix_lora", "mix_adapter", "mix_diff")  # versions 0..3
IDS = [
    np.array([[101, 7592, 2088, 2003, 1037, 3231, 102]], dtype=np.int64),
    np.array([[101, 2023, 2003, 1037, 2936, 6251, 2055, 2070, 4248, 102]], dtype=np.int64),
]
LOAD_S = float(os.environ.get("PETS_SCALEOUT_LOAD_S", "4"))
HTTP_WORKERS, GRPC_WORKERS = 3, 2
RETRIES = 3
BURST = 16  # extra HTTP requests sent at once just before the kill (and a quarter on gRPC)
READY_S = 240.0
KILL_GRACE_S = 1.0  # an attempt that started this long after C died must not fail
RESIDENT_WAIT_S = 20.0


# ------------------------------------------------------------------------------- replicas
@dataclass
class Replica:
    name: str
    http: int
    grpc: int
    metrics: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, repo: Path, backends: Path, env: dict[str, str]) -> None:
        cmd = [
            "tritonserver", f"--model-repository={repo}", f"--backend-directory={backends}",
            "--disable-auto-complete-config",
            "--http-address=127.0.0.1", f"--http-port={self.http}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics}",
            "--http-restricted-api=model-repository,shared-memory:admin-key=test",
            "--grpc-restricted-protocol=model-repository,shared-memory:admin-key=test",
            "--exit-timeout-secs=5",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=self.log.parent)  # fmt: skip

    def wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"replica {self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=2)
                return
            if time.monotonic() > deadline:
                pytest.fail(f"replica {self.name} not ready in time:\n{self.tail()}")
            time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL the server and its stubs (one process group): a crashed host."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _nginx_conf(tmp: Path, http: int, grpc: int, replicas: list[Replica]) -> Path:
    ups_http = "".join(
        f"    server 127.0.0.1:{r.http} max_fails=1 fail_timeout=2s;\n" for r in replicas
    )
    ups_grpc = "".join(
        f"    server 127.0.0.1:{r.grpc} max_fails=1 fail_timeout=2s;\n" for r in replicas
    )
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the 0700 tmp dir
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""{user}worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 512; }}
http {{
  log_format up '$http_x_pets_req|$upstream_addr|$status|$upstream_status';
  access_log {tmp}/nginx-access.log up;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  client_max_body_size 64m;
  upstream pets_http {{
{ups_http}  }}
  upstream pets_grpc {{
{ups_grpc}  }}
  server {{
    listen 127.0.0.1:{http};
    location / {{
      proxy_pass http://pets_http;
      proxy_http_version 1.1;
      proxy_next_upstream error timeout;
    }}
  }}
  server {{
    listen 127.0.0.1:{grpc} http2;
    location / {{
      grpc_pass grpc://pets_grpc;
      grpc_next_upstream error timeout;
    }}
  }}
}}
"""
    )
    return conf


@contextlib.contextmanager
def _nginx(tmp: Path, replicas: list[Replica]) -> Iterator[tuple[str, str, Path]]:
    exe = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if exe is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light; .ci/run does)")
    http, grpc = free_ports(2)
    conf = _nginx_conf(tmp, http, grpc, replicas)
    cmd = [exe, "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf)]
    check = subprocess.run([*cmd, "-t"], capture_output=True, text=True)
    assert check.returncode == 0, f"nginx -t refused the config:\n{check.stderr}"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/live", timeout=2)
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nginx did not start:\n{(tmp / 'nginx-error.log').read_text()}")
            time.sleep(0.2)
        yield f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", tmp / "nginx-access.log"
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful: the access log is complete
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------------------- the run
@dataclass
class Rehearsal:
    replicas: list[Replica]
    nginx_http: str
    nginx_grpc: str
    access_log: Path
    store: Path
    expected: dict[tuple[str, int], np.ndarray]  # (task, ids index) -> output
    versions: list[Any]
    backends: Path
    repo: Path
    env: dict[str, str]
    pythonpath: str


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rehearsal]:
    if not (ROOT / "build" / "triton" / "env.sh").is_file():
        pytest.skip("Triton runtime not assembled: run `bash build/install_triton.sh` (make test)")
    tmp = tmp_path_factory.mktemp("scaleout")
    versions = make_versions(load_backbone(BACKBONE))
    store = tmp / "store"
    for k, name in enumerate(STABLE):
        write_task(store, *named(versions[k], name))
    ref = Engine.from_parameters(
        {"TASK_STORE": str(tmp / "ref"), "BACKBONE": BACKBONE, "REFRESH_MS": "0"}
    )
    expected: dict[tuple[str, int], np.ndarray] = {}
    try:
        for k, version in enumerate(versions):
            ref.registry.add(*named(version, f"v{k}"))
            for i, ids in enumerate(IDS):
                (out,) = ref.run([ids[0]], [f"v{k}"])
                expected[(f"v{k}", i)] = np.asarray(out)[None, :]
    finally:
        ref.close()
    for i in range(len(IDS)):  # no vacuous pass: every version answers differently
        outs = [expected[(f"v{k}", i)] for k in range(len(versions))]
        for a in range(len(outs)):
            for b in range(a + 1, len(outs)):
                assert not np.allclose(outs[a], outs[b], rtol=RTOL, atol=ATOL), (i, a, b)
    for k, name in enumerate(STABLE):
        for i in range(len(IDS)):
            expected[(name, i)] = expected[(f"v{k}", i)]

    src_path = os.pathsep.join(str(ROOT / p) for p in ("backend", "cuda_ops", "."))
    pythonpath = os.pathsep.join(p for p in (src_path, os.environ.get("PYTHONPATH")) if p)
    env = {**triton_env(), "PETS_ADMIN_TOKEN": TOKEN, "PYTHONPATH": pythonpath}  # this checkout
    if shutil.which("tritonserver", path=env["PATH"]) is None:
        pytest.fail("build/triton/env.sh puts no tritonserver on PATH; rerun install_triton.sh")
    # A private backend directory: this checkout's shells, the shared python backend.
    backends = tmp / "backends"
    backends.mkdir()
    (backends / "python").symlink_to(Path(env["PETS_TRITON_BACKENDS"]) / "python")
    for model, src in (("pets", "backend/model.py"), ("pets_admin", "backend/pets_admin/model.py")):
        (backends / model).mkdir()
        shutil.copy2(ROOT / src, backends / model / "model.py")
    repo = tmp / "repo"
    place = subprocess.run(
        [sys.executable, "-m", "pets.placement", "--src", str(ROOT / "model_repository"),
         "--out", str(repo), "--cpu-instances", "1", "--store", str(store),
         "--backbone", BACKBONE, "--set", "REFRESH_MS=200", "--set", "METRICS_INTERVAL_MS=100"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": pythonpath},
    )  # fmt: skip
    assert place.returncode == 0, place.stderr
    (tmp / "instances.txt").write_text(place.stdout)  # what the container's probe reads
    assert place.stdout.split() == ["pets_0_0", "cpu"], place.stdout  # Triton's name, checked below

    ports = free_ports(9)
    replicas = [
        Replica(n, *ports[3 * k : 3 * k + 3], log=tmp / f"replica_{n}.log")
        for k, n in enumerate("ABC")
    ]
    shm_before = _shm_regions()
    try:
        for r in replicas:
            r.start(repo, backends, env)
        deadline = time.monotonic() + READY_S
        for r in replicas:
            r.wait_ready(deadline)
        with _nginx(tmp, replicas) as (nginx_http, nginx_grpc, access_log):
            yield Rehearsal(replicas, nginx_http, nginx_grpc, access_log, store, expected,
                            versions, backends, repo, env, pythonpath)  # fmt: skip
    finally:
        for r in replicas:
            r.stop()
        for f in _shm_regions() - shm_before:
            Path("/dev/shm", f).unlink(missing_ok=True)


def _admin(url: str, action: str, name: str, task: Any = None) -> dict[str, Any]:
    mod = client_module("http")
    manifest = weights = None
    if task is not None:
        manifest, weights = json.dumps(task[0].to_json()), safetensors_bytes(task[1])
    res = mod.InferenceServerClient(url).infer(
        "pets_admin", admin_inputs(mod, TOKEN, action, name, manifest, weights)
    )
    return dict(json.loads(res.as_numpy("RESULT")[0]))


def _ask(url: str, task: str, ids: int = 0) -> np.ndarray | InferenceServerException:
    mod = client_module("http")
    try:
        out = mod.InferenceServerClient(url).infer("pets", build_inputs(mod, task, ids=IDS[ids]))
        return np.asarray(out.as_numpy("OUTPUT"))
    except InferenceServerException as exc:
        return exc


def _same(out: Any, want: np.ndarray) -> bool:
    return (
        isinstance(out, np.ndarray)
        and out.shape == want.shape
        and bool(np.allclose(out, want, rtol=RTOL, atol=ATOL))
    )


def _resident(r: Replica) -> float | None:
    """pets_tasks_resident of the replica's one instance (None while unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{r.metrics}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    vals = [v for n, lab, v in parse_prometheus(text) if n == "pets_tasks_resident"]
    return vals[0] if len(vals) == 1 else None


# ------------------------------------------------------------------------------- load
@dataclass
class Attempt:
    rid: str
    protocol: str
    t0: float
    t1: float
    error: str | None


@dataclass
class Load:
    """Client threads through nginx; every answer is checked, failed attempts retried."""

    reh: Rehearsal
    stop: threading.Event = field(default_factory=threading.Event)
    attempts: list[Attempt] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    answered: int = 0
    gave_up: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, protocol: str, worker: int, count: int = 0) -> None:
        """Requests one after another until :attr:`stop` (or ``count`` of them)."""
        mod = client_module(protocol)
        url = self.reh.nginx_http if protocol == "http" else self.reh.nginx_grpc
        rng = random.Random(worker)
        client = mod.InferenceServerClient(url)
        n = 0
        while not self.stop.is_set() and (count == 0 or n < count):
            n += 1
            task, ids = rng.choice(STABLE), rng.randrange(len(IDS))
            for k in range(RETRIES):
                rid = f"{protocol}{worker}-{n}-{k}"
                t0 = time.monotonic()
                try:
                    res = client.infer("pets", build_inputs(mod, task, ids=IDS[ids]),
                                       headers={"x-pets-req": rid})  # fmt: skip
                    out, err = np.asarray(res.as_numpy("OUTPUT")), None
                except InferenceServerException as exc:
                    out, err = None, " ".join(str(exc).split())[:200]
                    client = mod.InferenceServerClient(url)  # a fresh connection to retry on
                with self.lock:
                    self.attempts.append(Attempt(rid, protocol, t0, time.monotonic(), err))
                    if err is None:
                        self.answered += 1
                        if not _same(out, self.reh.expected[(task, ids)]):
                            self.wrong.append(f"{rid} {task}: {out}")
                if err is None:
                    break
            else:
                with self.lock:
                    self.gave_up += 1


def _upstreams(access_log: Path) -> dict[str, tuple[str, str]]:
    """attempt id -> (the upstream that answered it last, nginx status), from the access log
    (``$upstream_addr`` lists every upstream nginx tried: ``a:1, b:2``)."""
    out = {}
    for line in access_log.read_text().splitlines():
        parts = line.split("|")
        if len(parts) == 4 and parts[0] not in ("", "-"):
            out[parts[0]] = (parts[1].split(",")[-1].strip(), parts[2])
    return out


def _sent_to(load: Load, access_log: Path, r: Replica, since: float) -> list[Attempt]:
    """Attempts started after ``since`` that nginx passed to replica ``r``."""
    ups = _upstreams(access_log)
    addrs = {f"127.0.0.1:{r.http}", f"127.0.0.1:{r.grpc}"}
    with load.lock:
        recent = [x for x in load.attempts if x.t0 > since]
    return [x for x in recent if ups.get(x.rid, ("",))[0] in addrs]


def _propagate(
    reh: Rehearsal, live: list[Replica], action: str, name: str, version: int | None
) -> dict[str, float]:
    """``action`` through replica A, then every live replica asked once, directly: each must
    answer with the change on that first request. Returns ms from the admin call's return
    to each replica's answer."""
    a = reh.replicas[0]
    task = None if version is None else named(reh.versions[version], name)
    _admin(f"127.0.0.1:{a.http}", action, name, task)
    t_done = time.monotonic()
    took = {}
    for r in live:
        out = _ask(f"127.0.0.1:{r.http}", name)
        took[r.name] = (time.monotonic() - t_done) * 1e3
        if version is None:
            assert isinstance(out, InferenceServerException) and "unknown task" in str(out), (
                f"replica {r.name} still serves {name!r} after unregister returned: {out}"
            )
        else:
            want = reh.expected[(f"v{version}", 0)]
            assert _same(out, want), (
                f"replica {r.name}: first request after {action} {name} (v{version}) "
                f"returned {out}, expected {want}"
            )
    return took


def _wait_resident(live: list[Replica], want: dict[str, float], t0: float) -> dict[str, float]:
    """ms from ``t0`` until each replica's pets_tasks_resident equals ``want[name]``."""
    seen: dict[str, float] = {}
    while len(seen) < len(live):
        for r in live:
            if r.name not in seen and _resident(r) == want[r.name]:
                seen[r.name] = (time.monotonic() - t0) * 1e3
        assert time.monotonic() - t0 < RESIDENT_WAIT_S, (
            f"residency after a change: reached {seen}, waited for {want} "
            f"for {RESIDENT_WAIT_S:.0f} s"
        )
        time.sleep(0.02)
    return seen


def test_direct_answers_equal_the_engine(rehearsal: Rehearsal) -> None:
    """Every replica answers every stable task as the in-process engine does (the oracle
    of the load's checks), and names its one instance as placement said."""
    for r in rehearsal.replicas:
        for name in STABLE:
            for i in range(len(IDS)):
                out = _ask(f"127.0.0.1:{r.http}", name, i)
                assert _same(out, rehearsal.expected[(name, i)]), (r.name, name, i, out)
        text = urllib.request.urlopen(f"http://127.0.0.1:{r.metrics}/metrics").read().decode()
        inst = {
            (lab["instance"], lab["device"])
            for n, lab, _ in parse_prometheus(text)
            if n == "pets_tasks_resident"
        }
        assert inst == {("pets_0_0", "cpu")}, inst


def test_scaleout_rehearsal(rehearsal: Rehearsal) -> None:
    reh = rehearsal
    a, b, c = reh.replicas
    load = Load(reh)
    workers = [
        threading.Thread(target=load.run, args=(p, w), daemon=True)
        for p, n in (("http", HTTP_WORKERS), ("grpc", GRPC_WORKERS))
        for w in range(n)
    ]
    t_start = time.monotonic()
    for w in workers:
        w.start()
    figures: dict[str, Any] = {}
    try:
        time.sleep(LOAD_S / 2)
        # 1. register, update, unregister through A under load; every replica asked at once
        base = {r.name: _resident(r) or 0.0 for r in reh.replicas}
        figures["register"] = _propagate(reh, reh.replicas, "register", "fresh", 4)
        figures["update"] = _propagate(reh, reh.replicas, "update", "fresh", 5)
        figures["unregister"] = _propagate(reh, reh.replicas, "unregister", "fresh", None)
        # an idle-refresh figure: a task nobody asks for reaches every replica's memory
        t0 = time.monotonic()
        _admin(f"127.0.0.1:{a.http}", "register", "quiet", named(reh.versions[2], "quiet"))
        figures["resident"] = _wait_resident(reh.replicas, {k: v + 1 for k, v in base.items()}, t0)
        time.sleep(LOAD_S / 2)

        # 2. kill C mid-load (with a burst in flight, so that some requests are at C when it
        # dies); change the store while it is down; restart it
        burst = [
            threading.Thread(target=load.run, args=(p, 100 + i, 1), daemon=True)
            for i, p in enumerate(["http"] * BURST + ["grpc"] * (BURST // 4))
        ]
        for w in burst:
            w.start()
        time.sleep(0.05)
        c.kill()
        t_kill = time.monotonic()
        for w in burst:
            w.join(timeout=60)
        figures["while_down"] = _propagate(reh, [a, b], "register", "during_outage", 1)
        time.sleep(LOAD_S / 2)
        c.start(reh.repo, reh.backends, reh.env)
        t_restart = time.monotonic()
        c.wait_ready(t_restart + READY_S)
        figures["restart_s"] = time.monotonic() - t_restart
        out = _ask(f"127.0.0.1:{c.http}", "during_outage")
        assert _same(out, reh.expected[("v1", 0)]), f"restarted C: {out}"
        time.sleep(LOAD_S / 2)
        # C is back in nginx's rotation once its fail_timeout (2 s) ran out: wait for it
        t_ready = time.monotonic()
        while not _sent_to(load, reh.access_log, c, t_ready):
            assert time.monotonic() - t_ready < 20, "nginx sent nothing to C after its restart"
            time.sleep(0.5)
    finally:
        load.stop.set()
        for w in workers:
            w.join(timeout=60)
    t_end = time.monotonic()
    time.sleep(0.5)  # nginx writes the last log lines
    ups = _upstreams(reh.access_log)

    c_addrs = {f"127.0.0.1:{c.http}", f"127.0.0.1:{c.grpc}"}
    failed = [x for x in load.attempts if x.error is not None]
    stray = []
    for x in failed:
        upstream = ups.get(x.rid, ("?", "?"))[0]
        if upstream not in c_addrs or x.t0 > t_kill + KILL_GRACE_S:
            stray.append((x, upstream, x.t0 - t_kill))
    per_replica = Counter(
        next((r.name for r in reh.replicas if addr.endswith(f":{r.http}") or
              addr.endswith(f":{r.grpc}")), "?")
        for addr, _ in ups.values()
    )  # fmt: skip
    after_restart = _sent_to(load, reh.access_log, c, t_restart + figures["restart_s"])
    print(
        f"\nscale-out rehearsal: 3 replicas (1 CPU instance each, {BACKBONE}), nginx, "
        f"{HTTP_WORKERS} HTTP + {GRPC_WORKERS} gRPC client threads, {t_end - t_start:.1f} s\n"
        f"  answers {load.answered} (wrong {len(load.wrong)}), attempts {len(load.attempts)}, "
        f"failed attempts {len(failed)} (all routed to the killed replica: {not stray}), "
        f"requests given up after {RETRIES} tries {load.gave_up}\n"
        f"  attempts per replica (nginx log): {dict(sorted(per_replica.items()))}; "
        f"to C after its restart: {len(after_restart)}\n"
        f"  first request after the admin call returned, ms per replica: "
        + "; ".join(
            f"{k} {', '.join(f'{n} {v:.0f}' for n, v in figures[k].items())}"
            for k in ("register", "update", "unregister", "while_down")
        )
        + f"\n  unasked task resident on every replica after (ms): "
        f"{', '.join(f'{n} {v:.0f}' for n, v in figures['resident'].items())}\n"
        f"  C restarted in {figures['restart_s']:.1f} s and served the task registered while "
        "it was down"
    )
    for x in failed:
        print(f"  failed: {x.rid} {x.protocol} {x.t0 - t_kill:+.2f} s from the kill: {x.error}")
    assert not load.wrong, load.wrong[:5]
    assert not stray, [(x.rid, up, f"{dt:+.2f} s", x.error) for x, up, dt in stray]
    assert load.gave_up == 0
    assert load.answered > 50, "too little load to mean anything"
    assert all(per_replica[r.name] > 0 for r in reh.replicas), per_replica


def _probe(reh: Rehearsal, r: Replica, *args: str) -> subprocess.CompletedProcess[str]:
    """build/container/probe.py as the Deployment runs it, aimed at replica ``r``."""
    assert r.proc is not None
    return subprocess.run(
        [sys.executable, str(ROOT / "build" / "container" / "probe.py"),
         "--url", f"127.0.0.1:{r.http}", "--instances", str(reh.repo.parent / "instances.txt"),
         "--server-pid", str(r.proc.pid), "--timeout", "20", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": reh.pythonpath, "PETS_ADMIN_TOKEN": TOKEN},
    )  # fmt: skip


def test_probe_sees_a_dead_stub(rehearsal: Rehearsal) -> None:
    """The Deployment's probe: healthy on a served task and on an unknown one (an empty store
    must stay ready), unhealthy once the `pets` stub is dead although v2/health/ready is 200."""
    c = rehearsal.replicas[2]
    ok = _probe(rehearsal, c)
    assert ok.returncode == 0 and "HEALTHY pets: task=" in ok.stdout, ok.stdout + ok.stderr
    no_task = _probe(rehearsal, c, "--token", "")
    assert no_task.returncode == 0 and "refused an unknown task" in no_task.stdout, no_task.stdout
    stubs = [
        int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_pets_stub_of(p, c)
    ]
    assert len(stubs) == 1, f"expected one pets stub of replica C, found {stubs}"
    os.kill(stubs[0], signal.SIGKILL)
    time.sleep(0.5)
    ready = urllib.request.urlopen(f"http://127.0.0.1:{c.http}/v2/health/ready", timeout=5)
    dead = _probe(rehearsal, c)
    print(f"\nv2/health/ready {ready.status} after the stub died; probe: {dead.stdout.strip()}")
    assert dead.returncode == 1 and "no live stub process for instance(s) ['pets_0_0']" in (
        dead.stdout
    ), dead.stdout + dead.stderr


def _is_pets_stub_of(p: Path, r: Replica) -> bool:
    try:
        argv = (p / "cmdline").read_bytes().split(b"\0")
        ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return (
        r.proc is not None
        and ppid == r.proc.pid
        and argv[0].endswith(b"triton_python_backend_stub")
        and b"/pets/" in argv[1]
    )
