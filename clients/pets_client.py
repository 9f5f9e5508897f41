"""Small helpers shared by the pets clients (infer, loadgen, canary), the benchmarks in
clients/bench/ and the e2e tests.

The `pets` model takes TASK (BYTES [k,1]) plus one of TEXT (BYTES [k,1]),
INPUT_IDS (INT64 [k,L]) or INPUT_IDS_INT32 (INT32 [k,L]); it returns OUTPUT (FP32 [k,D]).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

MODEL = "pets"
DEMO_TASKS = ("demo_bitfit", "demo_diff_pruning", "demo_maskbert", "demo_adapter", "demo_lora")
DEFAULT_URL = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}
REPO_ROOT = Path(__file__).resolve().parent.parent


def client_module(protocol: str, aio: bool = False) -> ModuleType:
    """tritonclient.http / .grpc (or their asyncio variants)."""
    if protocol not in DEFAULT_URL:
        raise ValueError(f"protocol {protocol!r} is not supported; use 'http' or 'grpc'")
    if protocol == "http":
        import tritonclient.http as http
        import tritonclient.http.aio as http_aio

        return http_aio if aio else http
    import tritonclient.grpc as grpc
    import tritonclient.grpc.aio as grpc_aio

    return grpc_aio if aio else grpc


def build_inputs(
    mod: ModuleType,
    tasks: Sequence[str] | str,
    *,
    texts: Sequence[str] | None = None,
    ids: Any = None,
    int32: bool = False,
) -> list[Any]:
    """InferInputs for k rows: ``tasks`` (one name, or one per row) with ``texts`` or ``ids``.

    ``ids`` is a [k, L] (or [L]) integer array; ``int32`` sends it as INPUT_IDS_INT32.
    ``mod`` is a tritonclient.http/.grpc module (aio modules share InferInput).
    """
    if (texts is None) == (ids is None):
        raise ValueError("give exactly one of texts= or ids=")
    if texts is not None:
        k = len(texts)
    else:
        ids = np.asarray(ids)
        ids = ids[None, :] if ids.ndim == 1 else ids
        k = ids.shape[0]
    names = [tasks] * k if isinstance(tasks, str) else list(tasks)
    if len(names) != k:
        raise ValueError(f"{len(names)} task names for {k} rows; give one, or one per row")
    out = [_tensor(mod, "TASK", np.array(names, dtype=object).reshape(k, 1), "BYTES")]
    if texts is not None:
        out.append(_tensor(mod, "TEXT", np.array(texts, dtype=object).reshape(k, 1), "BYTES"))
    elif int32:
        out.append(_tensor(mod, "INPUT_IDS_INT32", ids.astype(np.int32), "INT32"))
    else:
        out.append(_tensor(mod, "INPUT_IDS", ids.astype(np.int64), "INT64"))
    return out


def admin_inputs(
    mod: ModuleType,
    token: str,
    action: str,
    name: str | None = None,
    manifest: bytes | str | None = None,
    weights: bytes | None = None,
) -> list[Any]:
    """InferInputs of the pets_admin model (each a one-element BYTES tensor of shape [1]).

    ``manifest`` is the task's manifest JSON, ``weights`` the raw safetensors file bytes.
    """
    values = {
        "TOKEN": token,
        "ACTION": action,
        "NAME": name,
        "MANIFEST": manifest,
        "WEIGHTS": weights,
    }
    out = []
    for key, value in values.items():
        if value is not None:
            raw = value.encode() if isinstance(value, str) else bytes(value)
            out.append(_tensor(mod, key, np.array([raw], dtype=np.object_), "BYTES"))
    return out


def _tensor(mod: ModuleType, name: str, arr: np.ndarray, dtype: str) -> Any:
    t = mod.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def random_ids(rng: np.random.Generator, length: int, rows: int = 1) -> np.ndarray:
    """[rows, length] BERT-like ids: [CLS] random word-piece ids [SEP] (length >= 2)."""
    if length < 2:
        raise ValueError(f"length {length} is too short; need >= 2 for [CLS] ... [SEP]")
    ids = rng.integers(1000, 30000, size=(rows, length), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return ids


def parse_lengths(spec: str) -> tuple[str, list[int]]:
    """Sequence lengths: ``'64'`` (fixed), ``'a:b'`` (uniform in [a, b]) or ``'a,b,c'``
    (choice); returns ``("uniform", [a, b])`` or ``("choice", [...])``."""
    try:
        if ":" in spec:
            lo, hi = (int(x) for x in spec.split(":"))
            if not 2 <= lo <= hi:
                raise ValueError
            return "uniform", [lo, hi]
        vals = [int(x) for x in spec.split(",")]
        if min(vals) < 2:
            raise ValueError
        return "choice", vals
    except ValueError:
        raise SystemExit(
            f"length spec {spec!r} is invalid: use L, LO:HI or L1,L2,... with lengths >= 2"
        ) from None


def parse_point(text: str, flag: str = "--points") -> tuple[int, str]:
    """A benchmark point ``NxL`` (``N`` requests or sequences of ``L`` tokens) or ``NxLO:HI``
    (lengths drawn uniformly, a :func:`parse_lengths` spec) -> ``(N, length spec)``; ``flag``
    names the option in the error."""
    n, sep, length = text.partition("x")
    if not (sep and n.isdigit() and int(n) >= 1):
        raise SystemExit(f"{flag} entry {text!r}: expected NxL or NxLO:HI (1x128, 1x16:128)")
    try:
        parse_lengths(length)
    except SystemExit as exc:
        raise SystemExit(f"{flag} entry {text!r}: {exc}") from None
    return int(n), length


def parse_subset(text: str, known: Sequence[str], flag: str) -> list[str]:
    """A CLI list option: ``all`` (every one of ``known``, in its order) or a comma list of
    some of them (in the given order); anything else exits naming ``flag`` and the choices."""
    if text == "all":
        return list(known)
    picked = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in picked if t not in known]
    if unknown or not picked:
        raise SystemExit(
            f"{flag} {text!r}: {unknown or 'empty list'} not among {', '.join(known)}; give "
            "'all' or a comma list of them"
        )
    return picked


def set_queue_delay(config: str, us: int, where: str) -> str:
    """``config`` (config.pbtxt text) with its dynamic batcher's
    ``max_queue_delay_microseconds`` set to ``us``; ``where`` names the file in the error
    when it has no such field."""
    out, n = re.subn(
        r"max_queue_delay_microseconds: \d+", f"max_queue_delay_microseconds: {us}", config
    )
    if n != 1:
        raise SystemExit(f"{where} has no max_queue_delay_microseconds to rewrite")
    return out


def triton_env(root: Path = REPO_ROOT) -> dict[str, str]:
    """os.environ plus build/triton/env.sh (LD_LIBRARY_PATH/PATH for tritonserver and
    perf_analyzer). Run build/install_triton.sh first."""
    env_sh = root / "build" / "triton" / "env.sh"
    if not env_sh.is_file():
        raise FileNotFoundError(f"{env_sh} is missing; run `bash build/install_triton.sh`")
    dump = subprocess.run(
        ["bash", "-c", 'source "$1" && env -0', "_", str(env_sh)],
        check=True,
        capture_output=True,
        env=dict(os.environ),
    ).stdout.decode()
    return dict(item.split("=", 1) for item in dump.split("\0") if "=" in item)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on the loopback interface (for a tritonserver's HTTP,
    gRPC and metrics endpoints): all are held open together, then released."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class TritonServer:
    """A tritonserver on loopback ports, started by :func:`start_tritonserver`."""

    proc: subprocess.Popen[bytes]
    http: int
    grpc: int
    metrics: int

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http}"

    @property
    def metrics_url(self) -> str:
        return f"127.0.0.1:{self.metrics}/metrics"

    def stop(self) -> None:
        """SIGTERM the server's process group (its stubs too), then SIGKILL what is left."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
            return
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def start_tritonserver(
    repo: Path,
    log: Path,
    env: dict[str, str] | None = None,
    extra: Sequence[str] = (),
    ready_s: float = 180.0,
) -> TritonServer:
    """Start tritonserver on ``repo`` with free loopback ports, its output in ``log``, and
    wait until it is ready. ``env``: :func:`triton_env` by default; ``extra``: more flags.
    Raises SystemExit (with the log's tail) when it exits or is not ready in ``ready_s``."""
    env = triton_env() if env is None else env
    http, grpc, metrics = free_ports(3)
    cmd = [
        "tritonserver", f"--model-repository={repo}",
        f"--backend-directory={env['PETS_TRITON_BACKENDS']}",
        "--http-address=127.0.0.1", f"--http-port={http}",
        "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
        "--metrics-address=127.0.0.1", f"--metrics-port={metrics}",
        *extra,
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = TritonServer(proc, http, grpc, metrics)
    deadline = time.monotonic() + ready_s
    while True:
        try:
            urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=2)
            return server
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                tail = log.read_text(errors="replace")[-3000:]
                raise SystemExit(
                    f"tritonserver did not become ready in {ready_s:.0f} s "
                    f"(exit code {proc.returncode}); the end of {log}:\n{tail}"
                ) from None
            time.sleep(0.5)
