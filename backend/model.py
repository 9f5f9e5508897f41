"""Triton Python-based backend ``pets``: a thin shell over :class:`pets.engine.Engine`.

Triton loads this file as ``<backend-dir>/pets/model.py`` for every model whose config says
``backend: "pets"``. It and ``pets_admin/model.py`` (the ``pets_admin`` shell) are the only
modules that import ``triton_python_backend_utils``: it turns Triton requests into numpy
dicts, calls the engine once per batch, and turns the engine's results into exactly one
response per request, in order. ``execute`` never
raises: an engine crash becomes an INTERNAL error for each request of that batch.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
import traceback
from collections import Counter
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from pets.engine import Engine
from pets.errors import RequestError
from pets.metrics import COUNTERS, GAUGES, INFO, rejected_series
from pets.protocol import check_stub_numpy

# Inputs handed to the engine as-is (absent optional inputs are left out of the dict).
# Triton fixes one dtype per input, so INT32 ids arrive through their own optional input.
_INPUTS = ("TASK", "TEXT", "INPUT_IDS", "INPUT_IDS_INT32", "TEXT_PAIR", "TOKEN_TYPE_IDS")
_INPUT_SET = frozenset(_INPUTS)
_OUTPUT = "OUTPUT"

# Our codes are TritonError attribute names. pb_utils.TritonError only exists once the stub
# has set the module up, i.e. after this file is imported: look codes up lazily.
_CODES = ("INVALID_ARG", "NOT_FOUND", "UNAVAILABLE", "INTERNAL")


def _parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """config.pbtxt ``parameters`` as plain strings."""
    raw = model_config.get("parameters") or {}
    return {k: str(v.get("string_value", "")) for k, v in raw.items()}


def _cpu_threads(raw: str, config: dict[str, Any], cores: int) -> int:
    """Torch's intra-op threads for one CPU instance (``CPU_THREADS``).

    ``auto``: the cores left after one for the server's own threads (frontends, batcher),
    shared among the model's CPU instances, at least 1. On a small host the instances would
    otherwise each spin ``cores`` OpenMP threads against the server and the clients.
    """
    if raw in ("", "auto"):
        groups = config.get("instance_group") or [{"kind": "KIND_CPU", "count": 1}]
        count = sum(int(g.get("count", 1)) for g in groups if g.get("kind") == "KIND_CPU")
        return max(1, (cores - 1) // max(1, count))
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(
            f"CPU_THREADS={raw!r}; expected auto or an integer >= 1 (torch threads per CPU "
            "instance); fix config.pbtxt"
        )
    return int(raw)


def _device(kind: str, device_id: str) -> str:
    """Map Triton's instance kind/device id onto a torch device string."""
    if kind == "GPU":
        return f"cuda:{int(device_id or 0)}"
    if kind == "MODEL":  # placement left to the model: GPU 0 when there is one
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return "cpu"


def _decode(request: Any) -> dict[str, np.ndarray] | RequestError:
    """One request's inputs as numpy arrays (views into shm, valid during execute).

    One ``inputs()`` call per request: looking each optional input up by name costs a scan
    of the request's inputs per name, four times per request.
    """
    inputs: dict[str, np.ndarray] = {}
    for tensor in request.inputs():
        name = tensor.name()
        if name in _INPUT_SET:
            inputs[name] = tensor.as_numpy()
    if "INPUT_IDS" in inputs and "INPUT_IDS_INT32" in inputs:
        return RequestError(
            "both INPUT_IDS (INT64) and INPUT_IDS_INT32 were sent; send the token ids once, "
            "in one of them",
            "INVALID_ARG",
        )
    return inputs


def _error(err: RequestError) -> Any:
    code = getattr(pb_utils.TritonError, err.code if err.code in _CODES else "INTERNAL")
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(err.message, code))


def _response(res: Any) -> Any:
    if isinstance(res, RequestError):
        return _error(res)
    try:
        arr = np.ascontiguousarray(res, dtype=np.float32)
        return pb_utils.InferenceResponse([pb_utils.Tensor(_OUTPUT, arr)])
    except Exception as exc:  # a bad result fails its own request only
        msg = f"pets engine returned an unusable output ({type(res).__name__}): {exc}"
        return _error(RequestError(msg, "INTERNAL"))


class _TritonLogHandler(logging.Handler):
    """Sends the engine's ``logging`` records to tritonserver's log (``pb_utils.Logger``).

    Without it the engine's own lines (which ops, cost model and CUDA graphs are in use,
    task-store refreshes) would go to the stub's stderr and never reach the server log.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if record.levelno >= logging.ERROR:
                pb_utils.Logger.log_error(msg)
            elif record.levelno >= logging.WARNING:
                pb_utils.Logger.log_warn(msg)
            else:
                pb_utils.Logger.log_info(msg)
        except Exception:  # logging must never fail the caller
            self.handleError(record)


def _route_engine_logs() -> None:
    """Attach one :class:`_TritonLogHandler` to the ``pets`` logger (idempotent)."""
    logger = logging.getLogger("pets")
    if not any(isinstance(h, _TritonLogHandler) for h in logger.handlers):
        logger.addHandler(_TritonLogHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


class _MetricsPusher:
    """Pushes the engine's per-task counters into ``pb_utils.MetricFamily`` series.

    Every series update is a synchronous IPC round trip to the server, so pushing after every
    execute cost one round trip per task and series (two thirds of the throughput of a
    14-task CPU server). The request path now only appends each execute's rows to
    :class:`pets.metrics.EngineStats`; this thread drains (and counts) them every
    ``interval_s`` and on :meth:`close`, so the exported series lag by about one interval.
    """

    def __init__(
        self, engine: Any, model: str, instance: str, device: str, interval_s: float
    ) -> None:
        self.stats, self.model, self.instance, self.device = engine.stats, model, instance, device
        self.engine = engine  # for the backbone fingerprint and the rejected store entries
        mf = pb_utils.MetricFamily
        self._families: dict[str, Any] = {}
        for key, (name, desc) in COUNTERS.items():
            self._families[key] = mf(name=name, description=desc, kind=mf.COUNTER)
        for key, (name, desc) in (GAUGES | INFO).items():
            self._families[key] = mf(name=name, description=desc, kind=mf.GAUGE)
        self._series: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        self._gauges: tuple[int, int] | None = None
        self._rejected: set[tuple[str, str]] = set()
        self._backbone_sent = False
        self._lock = threading.Lock()  # one flush at a time (the thread and close)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, args=(interval_s,), name="pets-metrics", daemon=True
        )
        self._thread.start()

    def _loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()

    def flush(self) -> None:
        """Push the deltas since the last flush; never raises."""
        with self._lock:
            try:
                d = self.stats.drain()
                for key in ("requests", "tokens", "compute_us"):
                    for task, value in getattr(d, key).items():
                        if value > 0:
                            self._metric(key, task=task).increment(float(value))
                for (task, reason), value in d.errors.items():
                    self._metric("errors", task=task, reason=reason).increment(float(value))
                gauges = (d.tasks_resident, d.memory_bytes)
                if gauges != self._gauges:
                    self._gauges = gauges
                    # device too: Triton names instances per group, so one group over
                    # several GPUs repeats a name (pets_0_0 on cuda:0 and on cuda:1)
                    where = {"instance": self.instance, "device": self.device}
                    self._metric("tasks_resident", **where).set(float(gauges[0]))
                    self._metric("memory_bytes", **where).set(float(gauges[1]))
                if not self._backbone_sent:
                    fp = self.engine.spec.fingerprint
                    self._metric("backbone", instance=self.instance, fingerprint=fp).set(1.0)
                    self._backbone_sent = True
                rejected = rejected_series(dict(self.engine.registry.rejected))
                for task, reason in rejected ^ self._rejected:  # only the changes
                    self._metric("rejected", instance=self.instance, task=task, reason=reason).set(
                        1.0 if (task, reason) in rejected else 0.0
                    )
                self._rejected = rejected
            except Exception as exc:  # metrics must never fail serving
                pb_utils.Logger.log_warn(f"pets: metrics update failed: {exc}")

    def _metric(self, family: str, **labels: str) -> Any:
        key = (family, tuple(sorted(labels.items())))
        series = self._series.get(key)
        if series is None:
            series = self._families[family].Metric(labels={"model": self.model, **labels})
            self._series[key] = series
        return series


class TritonPythonModel:
    """One instance = one stub process = one Engine."""

    def initialize(self, args: dict[str, str]) -> None:
        check_stub_numpy(np.__version__)
        config = json.loads(args["model_config"])
        params = _parameters(config)
        device = _device(
            args.get("model_instance_kind", "CPU"), args.get("model_instance_device_id", "0")
        )
        self.name = args.get("model_instance_name", config.get("name", "pets"))
        _route_engine_logs()
        if device == "cpu":
            cores = len(os.sched_getaffinity(0))
            torch.set_num_threads(_cpu_threads(params.get("CPU_THREADS", "auto"), config, cores))
        self.engine: Engine | None = Engine.from_parameters(
            params, model_dir=os.path.abspath(args["model_repository"]), device=device
        )
        self.model = str(config.get("name", "pets"))
        self.metrics: _MetricsPusher | None = None
        if params.get("METRICS", "1") != "0" and hasattr(pb_utils, "MetricFamily"):
            raw = params.get("METRICS_INTERVAL_MS", "1000") or "1000"
            if not raw.isdigit() or int(raw) < 10:
                raise ValueError(
                    f"METRICS_INTERVAL_MS={raw!r}; expected an integer >= 10 (milliseconds "
                    "between pushes of the per-task series); fix config.pbtxt"
                )
            self.metrics = _MetricsPusher(
                self.engine, self.model, self.name, device, int(raw) / 1000
            )
        else:  # nothing drains the per-task counts: do not keep them
            self.engine.stats.disable()
        threads = f" with {torch.get_num_threads()} CPU threads" if device == "cpu" else ""
        pb_utils.Logger.log_info(
            f"pets: instance {self.name} ready on {device}{threads}, engine from "
            f"{os.path.dirname(os.path.abspath(inspect.getfile(Engine)))}, "
            f"parameters {params}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        n = len(requests)
        try:
            return self._execute(requests)
        except RequestError as err:  # the engine refused the whole batch (e.g. UNAVAILABLE)
            self._batch_failed(n, err.code)
            return [_error(err) for _ in range(n)]
        except Exception as exc:  # never raise out of execute: one INTERNAL per request
            pb_utils.Logger.log_error(f"pets: batch of {n} failed:\n{traceback.format_exc()}")
            msg = (
                f"pets engine failed on a batch of {n} request(s): "
                f"{type(exc).__name__}: {exc}; see the server log"
            )
            self._batch_failed(n, "INTERNAL")
            return [_error(RequestError(msg, "INTERNAL")) for _ in range(n)]

    def _batch_failed(self, n: int, code: str) -> None:
        stats = getattr(self.engine, "stats", None)
        if stats is not None and self.metrics is not None:
            stats.record_errors(Counter({("", code): n}))

    def _execute(self, requests: list[Any]) -> list[Any]:
        if self.engine is None:
            raise RuntimeError("the model instance is finalized")
        decoded: list[dict[str, np.ndarray] | RequestError] = []
        for request in requests:
            try:
                decoded.append(_decode(request))
            except Exception as exc:  # a malformed tensor fails its own request only
                decoded.append(RequestError(f"could not read the inputs: {exc}", "INTERNAL"))
        good = [(i, d) for i, d in enumerate(decoded) if not isinstance(d, RequestError)]
        results: list[Any] = list(decoded)
        if good:
            outs = self.engine.execute([d for _, d in good])
            if len(outs) != len(good):
                raise RuntimeError(
                    f"engine returned {len(outs)} results for {len(good)} "
                    "requests; expected one per request"
                )
            for (i, _), out in zip(good, outs, strict=True):
                results[i] = out
        return [_response(res) for res in results]

    def finalize(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None
