"""Per-task statistics: EngineStats, the engine's bulk per-execute counts, model.py's flush
into MetricFamily series (with a stand-in pb_utils), and the `pets status` table."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pets.metrics import EngineStats, parse_prometheus, status_table

MODEL_PY = Path(__file__).resolve().parents[1] / "backend" / "model.py"


def test_engine_stats_drain_and_split() -> None:
    st = EngineStats()
    st.record(["a", "b", "a"], [15, 10, 15], [("", "INVALID_ARG")], 0.004, 2, 1000)
    st.record(["a"], [10], [], 0.001, 2, 1200)
    d = st.drain()
    assert d.requests == Counter(a=3, b=1) and d.tokens == Counter(a=40, b=10)
    assert d.compute_us["a"] == pytest.approx(3000 + 1000) and d.compute_us["b"] == pytest.approx(
        1000
    )
    assert d.errors == Counter({("", "INVALID_ARG"): 1}) and d.memory_bytes == 1200
    again = st.drain()
    assert again.empty() and again.memory_bytes == 1200 and st.totals.requests["a"] == 3
    st.record_errors(Counter({("a", "UNAVAILABLE"): 2}))
    assert st.drain().errors == Counter({("a", "UNAVAILABLE"): 2})
    assert st.totals.errors == Counter({("", "INVALID_ARG"): 1, ("a", "UNAVAILABLE"): 2})


def test_engine_stats_fold_when_nothing_drains() -> None:
    """With no reader, executes are folded every FOLD_EVERY records: what is kept stays
    bounded and the counts stay exact."""
    st = EngineStats()
    n = 3 * EngineStats.FOLD_EVERY + 5
    for _ in range(n):
        st.record(["a"], [4], [], 1e-6, 1, 10)
    assert len(st._pending) == 5
    d = st.drain()
    assert d.requests == Counter(a=n) and d.tokens == Counter(a=4 * n)
    assert d.compute_us["a"] == pytest.approx(n)
    assert st.enabled
    st.disable()  # no reader will come (METRICS=0): nothing is kept
    assert not st.enabled
    st.record(["a"], [4], [("a", "INTERNAL")], 1e-6, 1, 10)
    st.record_errors(Counter({("", "INVALID_ARG"): 1}))
    assert st.drain().empty() and st.totals.requests == Counter(a=n)


def test_engine_records_bulk_counts(engine: Any) -> None:
    engine.stats.drain()
    ids = np.array([[101, 2000, 2001, 102]], dtype=np.int64)
    reqs = [
        {"TASK": np.array([[b"demo_lora"]] * 2, dtype=object), "INPUT_IDS": np.vstack([ids, ids])},
        {"TASK": np.array([[b"demo_bitfit"]], dtype=object), "INPUT_IDS": ids},
        {"TASK": np.array([[b"who_is_this"]], dtype=object), "INPUT_IDS": ids},
    ]
    outs = engine.execute(reqs)
    assert [isinstance(o, np.ndarray) for o in outs] == [True, True, False]
    d = engine.stats.drain()
    assert d.requests == Counter(demo_lora=2, demo_bitfit=1)
    assert d.tokens == Counter(demo_lora=8, demo_bitfit=4)
    assert d.errors == Counter({("", "INVALID_ARG"): 1})  # never the client's task name
    assert d.compute_us["demo_lora"] == pytest.approx(2 * d.compute_us["demo_bitfit"])
    assert d.tasks_resident == len(engine.registry.tasks)
    assert d.memory_bytes == engine.registry.memory_bytes() > 0


class _Metric:
    def __init__(self, family: _Family, labels: dict[str, str]) -> None:
        self.family, self.labels, self.value = family, labels, 0.0

    def increment(self, v: float) -> None:
        assert v >= 0 or self.family.kind == "GAUGE"
        self.value += v
        self.family.calls += 1

    def set(self, v: float) -> None:
        self.value = v
        self.family.calls += 1


class _Family:
    COUNTER, GAUGE = "COUNTER", "GAUGE"
    all: dict[str, _Family] = {}  # noqa: RUF012

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.kind, self.series, self.calls = name, kind, [], 0
        _Family.all[name] = self

    def Metric(self, labels: dict[str, str]) -> _Metric:  # pb_utils' name
        m = _Metric(self, labels)
        self.series.append(m)
        return m


def test_model_pushes_series_off_the_request_path(monkeypatch: pytest.MonkeyPatch) -> None:
    class Eng:
        def __init__(self) -> None:
            self.stats = EngineStats()
            self.spec = types.SimpleNamespace(fingerprint="sha256:f00")
            self.registry = types.SimpleNamespace(rejected={"bad": "x" * 500})

        @classmethod
        def from_parameters(cls, *a: Any, **k: Any) -> Eng:
            return cls()

        def execute(self, requests: list[Any]) -> list[Any]:
            n = len(requests)
            self.stats.record(["t"] * n, [5] * n, [], 0.002, 1, 4096)
            return [np.zeros((1, 2), np.float32) for _ in requests]

        def close(self) -> None:
            pass

    pb = types.ModuleType("triton_python_backend_utils")
    pb.MetricFamily = _Family  # type: ignore[attr-defined]
    pb.Tensor = lambda name, arr: (name, arr)  # type: ignore[attr-defined]
    pb.InferenceResponse = lambda tensors=None, error=None: (tensors, error)  # type: ignore[attr-defined]
    pb.TritonError = type("TritonError", (), {"INTERNAL": "INTERNAL"})  # type: ignore[attr-defined]
    pb.Logger = types.SimpleNamespace(log_info=print, log_error=print, log_warn=print)  # type: ignore[attr-defined]
    eng_mod = types.ModuleType("pets.engine")
    eng_mod.Engine = Eng  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.setitem(sys.modules, "pets.engine", eng_mod)
    spec = importlib.util.spec_from_file_location("pets_model_metrics", MODEL_PY)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def instance(name: str, **params: str) -> Any:
        model = mod.TritonPythonModel()
        parameters = {k: {"string_value": v} for k, v in params.items()}
        model.initialize(
            {
                "model_config": json.dumps({"name": "pets", "parameters": parameters}),
                "model_repository": "repo/pets",
                "model_instance_name": name,
            }
        )
        return model

    model = instance("pets_0_0", METRICS_INTERVAL_MS="60000")
    request = types.SimpleNamespace(inputs=lambda: [])
    model.execute([request, request])
    model.execute([request])
    fam = _Family.all
    # Executes only count in process: no IPC to the server on the request path.
    assert all(f.calls == 0 for f in fam.values())
    model.metrics.flush()  # what the pusher thread does every METRICS_INTERVAL_MS
    (req,) = fam["pets_task_requests_total"].series
    assert req.labels == {"model": "pets", "task": "t"} and req.value == 3
    assert fam["pets_task_tokens_total"].series[0].value == 15
    assert fam["pets_task_compute_us_total"].series[0].value == pytest.approx(4000)
    (mem,) = fam["pets_task_memory_bytes"].series
    assert mem.labels == {"model": "pets", "instance": "pets_0_0", "device": "cpu"}
    assert mem.value == 4096
    assert fam["pets_task_memory_bytes"].calls == 1  # gauges only when they change
    (bb,) = fam["pets_backbone_info"].series
    assert bb.labels["fingerprint"] == "sha256:f00" and bb.value == 1
    (rej,) = fam["pets_task_rejected"].series
    assert rej.labels["task"] == "bad" and rej.labels["reason"] == "x" * 300 + "..."
    assert rej.value == 1
    model.engine.registry.rejected.clear()  # the entry loads (or goes): its series drops to 0
    model.metrics.flush()
    assert rej.value == 0 and fam["pets_task_rejected"].calls == 2
    model.execute([request])
    model.finalize()  # the last deltas are pushed when the instance goes away
    assert req.value == 4 and fam["pets_task_memory_bytes"].calls == 1
    # METRICS=0: nothing will drain the counts, so the request path keeps none
    off = instance("pets_0_1", METRICS="0")
    assert off.metrics is None
    off.execute([request, request])
    assert off.engine.stats.drain().empty() and not off.engine.stats.totals.requests


SCRAPE = """# HELP pets_task_requests_total x
pets_task_requests_total{model="pets",task="a"} 4
pets_task_tokens_total{model="pets",task="a"} 40
pets_task_compute_us_total{model="pets",task="a"} 8000
pets_task_errors_total{model="pets",task="",reason="INVALID_ARG"} 2
pets_tasks_resident{instance="pets_0_0",model="pets"} 3
pets_task_memory_bytes{instance="pets_0_0",model="pets"} 2097152
nv_inference_request_success{model="pets",version="1"} 6
nv_inference_queue_duration_us{model="pets",version="1"} 600
nv_inference_request_duration_us{model="pets",version="1"} 6000
nv_inference_request_success{model="other",version="1"} 99
pets_backbone_info{fingerprint="sha256:abc",instance="pets_0_0",model="pets"} 1
pets_task_rejected{instance="pets_0_0",model="pets",reason="was made for \\"x\\"",task="bad"} 1
pets_task_rejected{instance="pets_0_0",model="pets",reason="old",task="fixed"} 0
"""


def test_status_table() -> None:
    assert (
        "pets_tasks_resident",
        {"instance": "pets_0_0", "model": "pets"},
        3.0,
    ) in parse_prometheus(SCRAPE)
    out = status_table(SCRAPE)
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert rows["a"][1:] == ["4", "0", "40", "2.000"]
    assert rows["(unregistered)"][1:3] == ["0", "2"]
    assert "instance pets_0_0: 3 tasks resident, 2.00 MiB" in out
    assert "6 requests, avg queue 0.100 ms, avg request 1.000 ms" in out
    assert "backbone sha256:abc (instances pets_0_0)" in out
    assert 'REJECTED bad (instances pets_0_0): was made for "x"' in out
    assert "fixed" not in out


def test_status_table_tells_instances_apart_by_device() -> None:
    """One instance group over two GPUs gives two instances one name: the device label
    keeps their rows apart instead of one overwriting the other."""
    scrape = "\n".join(
        f'pets_tasks_resident{{device="cuda:{k}",instance="pets_0_0",model="pets"}} {k + 2}'
        for k in range(2)
    )
    out = status_table(scrape)
    assert "instance pets_0_0 (cuda:0): 2 tasks resident" in out
    assert "instance pets_0_0 (cuda:1): 3 tasks resident" in out
