"""Session fixture: a real tritonserver serving `pets` from a temporary model repository.

The repository is a copy of model_repository/pets whose TASK_STORE points at a demo store
made by `pets demo-store` in a temp dir. The server binds 127.0.0.1 on free ports and is
stopped (with any leftover stub process and shm region) at the end of the session.
Needs build/install_triton.sh (make test runs it).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clients.pets_client import free_ports, triton_env

ROOT = Path(__file__).resolve().parents[2]

READY_TIMEOUT_S = 180.0
SHM_RE = re.compile(r"^triton_.*backend_shm_region_")
PARAM_RE = re.compile(r'parameters\s*\{\s*key:\s*"(\w+)"\s*value\s*\{\s*string_value:\s*"([^"]*)"')


@dataclass
class Server:
    http_url: str
    grpc_url: str
    metrics_url: str
    model_dir: Path  # <tmp repo>/pets
    store: Path
    log: Path
    env: dict[str, str]
    pid: int = 0  # tritonserver's pid = its process group (the stubs join it)

    def params(self) -> dict[str, str]:
        """The config.pbtxt parameters the served model was loaded with."""
        return dict(PARAM_RE.findall((self.model_dir / "config.pbtxt").read_text()))

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _shm_regions() -> set[str]:
    try:
        return {f for f in os.listdir("/dev/shm") if SHM_RE.match(f)}
    except FileNotFoundError:
        return set()


def make_demo_store(dest: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; from pets.cli import main; sys.exit(main())",
           "demo-store", str(dest)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"`pets demo-store {dest}` failed:\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("triton")
    store = tmp / "demo_store"
    make_demo_store(store)
    with launch(tmp, store) as server:
        yield server


@contextlib.contextmanager
def launch(
    tmp: Path,
    store: Path,
    models: tuple[str, ...] = ("pets",),
    extra_args: tuple[str, ...] = (),
    extra_env: dict[str, str] | None = None,
    params: dict[str, dict[str, str]] | None = None,
    instances: dict[str, int] | None = None,
) -> Iterator[Server]:
    """Start tritonserver on free loopback ports serving ``models`` (copies of
    model_repository/<m>, TASK_STORE -> ``store``; ``params`` overrides other parameters and
    ``instances`` the KIND_CPU instance count, per model); stop it, its stubs and their shm
    regions on exit. The yielded Server's model_dir is the first model's folder."""
    if not (ROOT / "build" / "triton" / "env.sh").is_file():
        pytest.skip("Triton runtime not assembled: run `bash build/install_triton.sh` (make test)")
    env = {**triton_env(), **(extra_env or {})}
    if shutil.which("tritonserver", path=env["PATH"]) is None:
        pytest.fail("build/triton/env.sh puts no tritonserver on PATH; rerun install_triton.sh")
    repo = tmp / "repo"
    for model in models:
        shutil.copytree(ROOT / "model_repository" / model, repo / model)
        cfg = repo / model / "config.pbtxt"
        text = cfg.read_text()
        for key, value in {"TASK_STORE": str(store), **(params or {}).get(model, {})}.items():
            text, n = re.subn(rf'(key: "{key}" value \{{ string_value: )"[^"]*"', rf'\1"{value}"',
                              text)  # fmt: skip
            assert n == 1, f"{cfg} has no {key} parameter to rewrite"
        if model in (instances or {}):
            text, n = re.subn(
                r"^instance_group .*$",
                f"instance_group [ {{ kind: KIND_CPU count: {instances[model]} }} ]",
                text,
                flags=re.M,
            )
            assert n == 1, f"{cfg} has no one-line instance_group to rewrite"
        cfg.write_text(text)
    # The shells may have changed since install_triton.sh ran: serve the current ones.
    backends = Path(env["PETS_TRITON_BACKENDS"])
    shutil.copy2(ROOT / "backend" / "model.py", backends / "pets")
    (backends / "pets_admin").mkdir(exist_ok=True)
    shutil.copy2(ROOT / "backend" / "pets_admin" / "model.py", backends / "pets_admin" / "model.py")

    http, grpc, metrics = free_ports(3)
    log = tmp / "tritonserver.log"
    shm_before = _shm_regions()
    cmd = [
        "tritonserver", f"--model-repository={repo}",
        f"--backend-directory={env['PETS_TRITON_BACKENDS']}", "--disable-auto-complete-config",
        "--http-address=127.0.0.1", f"--http-port={http}",
        "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
        "--metrics-address=127.0.0.1", f"--metrics-port={metrics}",
        "--http-restricted-api=model-repository,shared-memory:admin-key=test",
        "--grpc-restricted-protocol=model-repository,shared-memory:admin-key=test",
        "--exit-timeout-secs=10", *extra_args,
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=tmp)  # fmt: skip
    server = Server(f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"127.0.0.1:{metrics}",
                    repo / models[0], store, log, env, proc.pid)  # fmt: skip
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tritonserver exited ({proc.returncode}) before ready:\n"
                            f"{server.log_tail()}")  # fmt: skip
            try:
                urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=2)
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tritonserver not ready after {READY_TIMEOUT_S:.0f} s:\n"
                            f"{server.log_tail()}")  # fmt: skip
            time.sleep(0.5)
        yield server
    finally:
        _stop(proc)
        for f in _shm_regions() - shm_before:
            Path("/dev/shm", f).unlink(missing_ok=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, wait, SIGKILL; then kill what is left of the server's process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftover stubs share the server's group
