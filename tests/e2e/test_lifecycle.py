"""Task lifecycle through the real server: the pets_admin model, refresh, metrics, canary.

One throwaway tritonserver for the module (explicit model control, `pets` with two instances
plus `pets_admin`, default REFRESH_MS). Every inference answer is checked against a separate
in-process engine. The canary test kills the `pets` stubs, so it runs last.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lifecycle_tasks import (  # fixtures versions, expected: tests/conftest.py
    IDS,
    named,
    which,
)
from tritonclient.utils import InferenceServerException

from clients.pets_client import admin_inputs, build_inputs, client_module
from pets.admin import safetensors_bytes
from pets.metrics import parse_prometheus
from pets.taskstore import write_task

from .conftest import ROOT, Server, launch

pytestmark = pytest.mark.triton
TOKEN = "lifecycle-test-token-3f9a1c"
CYCLES = int(os.environ.get("PETS_SERVER_CYCLES", "100"))
LANES = 5  # cycles in flight at once
STABLE = ("stable0", "stable1")  # versions 0 and 1 under fixed names


@pytest.fixture(scope="module")
def life(tmp_path_factory: pytest.TempPathFactory, versions: list[Any]) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("life")
    store = tmp / "store"
    for k, name in enumerate(STABLE):
        write_task(store, *named(versions[k], name))
    with launch(
        tmp,
        store,
        models=("pets", "pets_admin"),
        extra_args=(
            "--model-control-mode=explicit",
            "--load-model=pets",
            "--load-model=pets_admin",
        ),
        extra_env={"PETS_ADMIN_TOKEN": TOKEN},
        instances={"pets": 2},
    ) as server:
        yield server


def admin(
    server: Server,
    action: str,
    name: str | None = None,
    manifest: Any = None,
    weights: bytes | None = None,
    protocol: str = "http",
    token: str = TOKEN,
) -> dict[str, Any]:
    mod = client_module(protocol)
    client = mod.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    if manifest is not None and not isinstance(manifest, (bytes, str)):
        manifest = json.dumps(manifest)
    res = client.infer("pets_admin", admin_inputs(mod, token, action, name, manifest, weights))
    return dict(json.loads(res.as_numpy("RESULT")[0]))


def task_payload(task: Any) -> tuple[dict[str, Any], bytes]:
    m, t = task
    return m.to_json(), safetensors_bytes(t)


def infer_many(client: Any, mod: Any, names: list[str]) -> list[Any]:
    """One request per name (HTTP: sent together, so the batcher may merge them); answers or
    errors."""
    out: list[Any] = []
    if mod.__name__.endswith("grpc"):
        for n in names:
            try:
                out.append(client.infer("pets", build_inputs(mod, n, ids=IDS)).as_numpy("OUTPUT"))
            except InferenceServerException as exc:
                out.append(exc)
        return out
    pending = [client.async_infer("pets", build_inputs(mod, n, ids=IDS)) for n in names]
    for p in pending:
        try:
            out.append(p.get_result().as_numpy("OUTPUT"))
        except InferenceServerException as exc:
            out.append(exc)
    return out


def refused(out: Any) -> bool:
    """The answer for a task that is not (or no longer) registered."""
    msg = str(out.message()) if isinstance(out, InferenceServerException) else ""
    return "unknown task" in msg or "was unregistered while the request waited" in msg


def show(out: Any) -> str:
    if isinstance(out, InferenceServerException):
        return f"error {out.status()}: {out.message()}"
    return repr(out)


def store_snapshot(store: Path) -> set[tuple[str, int, int]]:
    return {
        (str(p.relative_to(store)), p.stat().st_mtime_ns, p.stat().st_size)
        for p in store.rglob("*")
        if p.is_file() and p.name != ".admin.lock"
    }


# ------------------------------------------------------------------------------------ admin
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_admin_list_and_status(life: Server, protocol: str) -> None:
    listed = admin(life, "list", protocol=protocol)
    assert [t["name"] for t in listed["tasks"]] == list(STABLE)
    assert listed["backbone"].startswith("sha256:")
    assert admin(life, "status", protocol=protocol)["tasks"] == 2
    st = admin(life, "status", "stable1", protocol=protocol)
    assert st["manifest"]["pet"]["type"] == "lora" and st["weights_bytes"] > 0


def _hostile(versions: list[Any], backbone_fp: str) -> dict[str, tuple[dict[str, Any], str]]:
    """case -> (admin() kwargs, words the error must contain)."""
    good_m, good_w = task_payload(named(versions[2], "evil"))
    m, t = named(versions[1], "evil")
    shape = dict(t)
    key = next(k for k in sorted(shape) if k.endswith("lora_A.weight") or "lora_A" in k)
    shape[key] = torch.zeros(3, 5)
    nan = {k: v.clone() for k, v in t.items()}
    nan[key].view(-1)[0] = float("nan")
    huge = (1 << 40).to_bytes(8, "little") + good_w[8:]
    pkl = pickle.dumps({k: v.numpy() for k, v in t.items()})
    other = dict(good_m, backbone={"fingerprint": "sha256:0000000000000000"})
    reg = {"action": "register", "name": "evil", "manifest": good_m}
    return {
        "wrong token": (
            {**reg, "weights": good_w, "token": "not-the-token-at-all"},
            "wrong or missing admin token",
        ),
        "empty token": ({**reg, "weights": good_w, "token": ""}, "wrong or missing admin token"),
        "path name": ({**reg, "name": "../evil", "weights": good_w}, "invalid task name"),
        "truncated": ({**reg, "weights": good_w[: len(good_w) // 2]}, "truncated"),
        "wrong shape": (
            {**reg, "manifest": m.to_json(), "weights": safetensors_bytes(shape)},
            "has shape",
        ),
        "nan": ({**reg, "manifest": m.to_json(), "weights": safetensors_bytes(nan)}, "NaN"),
        "huge header": ({**reg, "weights": huge}, "declares a"),
        "pickle": ({**reg, "weights": pkl}, "not a safetensors file"),
        "name mismatch": ({**reg, "name": "evil2", "weights": good_w}, "MANIFEST names task"),
        "other backbone": ({**reg, "manifest": other, "weights": good_w}, backbone_fp),
        "bad json": ({**reg, "manifest": "{not json", "weights": good_w}, "not valid JSON"),
        "no weights": (dict(reg), "needs MANIFEST"),
        "bad action": ({"action": "drop-table", "name": "evil"}, "is unknown"),
        "register existing": (
            {**reg, "name": "stable0", "manifest": dict(good_m, name="stable0"), "weights": good_w},
            "already exists",
        ),
        "update missing": ({**reg, "action": "update", "weights": good_w}, "does not exist"),
        "unregister missing": ({"action": "unregister", "name": "evil"}, "does not exist"),
    }


def test_hostile_admin_input_is_refused_and_store_unchanged(
    life: Server, versions: list[Any]
) -> None:
    before = store_snapshot(life.store)
    fp = admin(life, "list")["backbone"]
    for i, (case, (kwargs, words)) in enumerate(_hostile(versions, fp).items()):
        protocol = "grpc" if i % 2 else "http"
        with pytest.raises(InferenceServerException) as info:
            admin(life, protocol=protocol, **kwargs)
        msg = str(info.value.message())
        assert words in msg, f"{case} ({protocol}): {msg}"
        assert TOKEN not in msg and "not-the-token-at-all" not in msg, case
        assert info.value.status() not in ("500", "StatusCode.INTERNAL"), (case, msg)
    assert store_snapshot(life.store) == before, "a refused admin request changed the store"
    mod = client_module("http")
    (out,) = infer_many(mod.InferenceServerClient(life.http_url), mod, ["evil"])
    assert refused(out), out


# ------------------------------------------------------------------------------------ cycles
def _load(
    server: Server,
    expected: list[np.ndarray],
    stop: threading.Event,
    counts: dict[str, int],
    wrong: list[str],
) -> None:
    """Background load: stable tasks over gRPC, each answer checked."""
    mod = client_module("grpc")
    client = mod.InferenceServerClient(server.grpc_url)
    deadline = time.monotonic() + 600  # bounded even if the test body dies
    while not stop.is_set() and time.monotonic() < deadline:
        for k, out in enumerate(infer_many(client, mod, list(STABLE))):
            counts["load"] += 1
            if which(out, expected, [k]) is None:
                wrong.append(f"load: {STABLE[k]} answered {show(out)}")


def test_register_update_unregister_under_load(
    life: Server, versions: list[Any], expected: list[np.ndarray]
) -> None:
    """CYCLES cycles through pets_admin (HTTP and gRPC alternately) while a load thread
    queries stable tasks; every answer is checked against the in-process engine. Two
    instances serve: a request sent after an admin call returned must see its change on
    whichever instance runs it."""
    http = client_module("http")
    client = http.InferenceServerClient(life.http_url, concurrency=LANES)
    n_v, wrong, counts = len(versions), [], {"load": 0, "cycle": 0}
    stop = threading.Event()
    loader = threading.Thread(target=_load, args=(life, expected, stop, counts, wrong), daemon=True)
    payloads = [task_payload(v) for v in versions]

    def serve(names: list[str]) -> list[Any]:
        outs = infer_many(client, http, names)
        counts["cycle"] += len(outs)
        return outs

    loader.start()
    t_start = time.monotonic()
    try:
        for first in range(0, CYCLES, LANES):
            cyc = range(first, min(first + LANES, CYCLES))
            names, a, b = (
                [f"cyc{i}" for i in cyc],
                [i % n_v for i in cyc],
                [(i + 1) % n_v for i in cyc],
            )
            proto = ["http" if i % 2 else "grpc" for i in cyc]
            for n, k, p in zip(names, a, proto, strict=True):
                m, w = payloads[k]
                assert admin(life, "register", n, dict(m, name=n), w, protocol=p)["ok"]
            for n, k, out in zip(names, a, serve(names), strict=True):  # served at once
                if which(out, expected, [k]) is None:
                    wrong.append(f"{n} right after register: {show(out)}")
            for n, k, p in zip(names, b, proto, strict=True):
                m, w = payloads[k]
                assert admin(life, "update", n, dict(m, name=n), w, protocol=p)["ok"]
            for n, k, out in zip(names, b, serve(names), strict=True):
                if which(out, expected, [k]) is None:
                    wrong.append(f"{n} right after update: {show(out)}")
            for n, p in zip(names, proto, strict=True):
                assert admin(life, "unregister", n, protocol=p)["ok"]
            for n, out in zip(names, serve(names), strict=True):
                if not refused(out):
                    wrong.append(f"{n} right after unregister: {show(out)}")
            assert len(wrong) < 10, "\n".join(wrong)
    finally:
        stop.set()
        loader.join(timeout=30)
    elapsed = time.monotonic() - t_start
    print(
        f"\n{CYCLES} admin cycles in {elapsed:.1f} s; {counts['cycle']} cycle answers and "
        f"{counts['load']} load answers checked"
    )
    assert not wrong, "\n".join(wrong[:20])
    assert counts["load"] > 0
    assert [t["name"] for t in admin(life, "list")["tasks"]] == list(STABLE)


# ------------------------------------------------------------------------------------ metrics
def _scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (n, tuple(sorted(lab.items()))): v
        for n, lab, v in parse_prometheus(text)
        if n.startswith("pets_")
    }


def _get(m: dict[Any, float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted({"model": "pets", **labels}.items()))), 0.0)


def _settled_scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A scrape once earlier tests' counts have all been pushed (two scrapes, more than one
    METRICS_INTERVAL_MS apart, agree)."""
    last = _scrape(server)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        time.sleep(1.2)
        now = _scrape(server)
        if now == last:
            return now
        last = now
    return last


def test_metrics_count_requests_errors_tokens(life: Server) -> None:
    before = _settled_scrape(life)
    mod = client_module("http")
    client = mod.InferenceServerClient(life.http_url)
    for _ in range(6):
        client.infer("pets", build_inputs(mod, "stable0", ids=IDS))
    with pytest.raises(InferenceServerException):
        client.infer("pets", build_inputs(mod, "no_such_task", ids=IDS))

    def delta(name: str, **labels: str) -> float:
        return _get(after, name, **labels) - _get(before, name, **labels)

    # Series are pushed off the request path, every METRICS_INTERVAL_MS (1 s by default):
    # they must show the requests within a few intervals.
    deadline = time.monotonic() + 10
    after = _scrape(life)
    while time.monotonic() < deadline and (
        delta("pets_task_requests_total", task="stable0") < 6
        or delta("pets_task_errors_total", task="", reason="INVALID_ARG") < 1
    ):
        time.sleep(0.1)
        after = _scrape(life)
    assert delta("pets_task_requests_total", task="stable0") == 6
    assert delta("pets_task_tokens_total", task="stable0") == 6 * IDS.shape[1]
    assert delta("pets_task_compute_us_total", task="stable0") > 0
    assert delta("pets_task_errors_total", task="", reason="INVALID_ARG") == 1
    assert not any(("task", "no_such_task") in key[1] for key in after), "client name as label"
    resident = {
        dict(k[1])["instance"]: v for k, v in after.items() if k[0] == "pets_tasks_resident"
    }
    assert resident and all(v == len(STABLE) for v in resident.values()), resident
    out = subprocess.run(
        [sys.executable, "-m", "pets.cli", "status", "--url", life.metrics_url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    print("\n" + out.stdout)
    row = next(line for line in out.stdout.splitlines() if line.startswith("stable0 "))
    assert int(row.split()[1]) >= 6
    assert "tasks resident" in out.stdout and "avg queue" in out.stdout


# ------------------------------------------------------------------------------------ canary
def _stubs(server: Server, model: str) -> list[int]:
    """pids of the model's triton_python_backend_stub processes (the server's group)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            pgid = os.getpgid(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
        if (
            pgid == server.pid
            and cmd
            and cmd[0].endswith(b"triton_python_backend_stub")
            and any(f"/{model}/".encode() in c or c.endswith(f"/{model}".encode()) for c in cmd[1:])
        ):
            pids.append(int(proc.name))
    return pids


def _canary(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PETS_ADMIN_TOKEN": TOKEN}
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "clients" / "canary.py"),
            "--url",
            server.http_url,
            "--count",
            "1",
            "--timeout",
            "20",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=ROOT,
    )


def test_canary_sees_dead_stub_and_reload_recovers(
    life: Server, expected: list[np.ndarray]
) -> None:
    ok = _canary(life)
    assert ok.returncode == 0 and "HEALTHY pets task=stable0" in ok.stdout, ok.stdout + ok.stderr
    stubs = _stubs(life, "pets")
    assert len(stubs) == 2, f"expected 2 pets stubs in group {life.pid}, found {stubs}"
    for pid in stubs:
        os.kill(pid, signal.SIGKILL)
    time.sleep(1.0)
    ready = urllib.request.urlopen(f"http://{life.http_url}/v2/models/pets/ready", timeout=5)
    print(f"\nafter killing the stubs, v2/models/pets/ready answers {ready.status} (2.51)")
    dead = _canary(life)
    assert dead.returncode == 1 and "UNHEALTHY pets" in dead.stdout, dead.stdout + dead.stderr
    print(dead.stdout.strip())
    fixed = _canary(life, "--reload", "--admin-key", "test")
    print(fixed.stdout.strip())
    assert fixed.returncode == 0 and "RECOVERED pets" in fixed.stdout, fixed.stdout + fixed.stderr
    mod = client_module("http")
    out = (
        mod.InferenceServerClient(life.http_url)
        .infer("pets", build_inputs(mod, "stable1", ids=IDS))
        .as_numpy("OUTPUT")
    )
    assert which(out, expected, [1]) == 1
