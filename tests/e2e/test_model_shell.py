"""backend/model.py without a server: a stand-in triton_python_backend_utils and engine.

Covers the paths the real server cannot easily provoke: an engine that raises (every
request of the batch gets INTERNAL, nothing propagates), an engine that refuses a whole
batch, unusable outputs, and both id inputs in one request.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from pets.errors import RequestError
from pets.metrics import EngineStats

MODEL_PY = Path(__file__).resolve().parents[2] / "backend" / "model.py"


class TritonError:
    INVALID_ARG, NOT_FOUND, UNAVAILABLE, INTERNAL = (
        "INVALID_ARG",
        "NOT_FOUND",
        "UNAVAILABLE",
        "INTERNAL",
    )

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self.message, self.code = message, code


class Tensor:
    def __init__(self, name: str, arr: np.ndarray) -> None:
        self._name, self.arr = name, arr

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self.arr


class Request(dict[str, Tensor]):
    """pb_utils.InferenceRequest's ``inputs()``: the tensors the client sent."""

    def inputs(self) -> list[Tensor]:
        return list(self.values())


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: Any = None) -> None:
        self.outputs, self.error = output_tensors or [], error


class FakeEngine:
    behaviour = "ok"
    seen: ClassVar[list[list[dict[str, np.ndarray]]]] = []

    def __init__(self) -> None:
        self.stats = EngineStats()  # model.py disables it here: no MetricFamily to push to

    @classmethod
    def from_parameters(cls, params: dict[str, str], *, model_dir: str, device: str) -> Any:
        assert Path(model_dir).is_absolute() and device == "cpu" and params["DTYPE"] == "auto"
        return cls()

    def execute(self, requests: list[dict[str, np.ndarray]]) -> list[Any]:
        FakeEngine.seen.append(requests)
        if self.behaviour == "raise":
            raise ValueError("boom")
        if self.behaviour == "refuse":
            raise RequestError("task store is loading; retry", "UNAVAILABLE")
        if self.behaviour == "short":
            return []
        if self.behaviour == "garbage":
            return [object() for _ in requests]
        return [
            RequestError(f"unknown task {r['TASK'][0, 0]!r}", "NOT_FOUND")
            if r["TASK"][0, 0] == b"nope"
            else np.full((1, 2), len(r), np.float64)
            for r in requests
        ]

    def close(self) -> None:
        pass


@pytest.fixture()
def shell(monkeypatch: pytest.MonkeyPatch) -> Any:
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TritonError = TritonError  # type: ignore[attr-defined]
    pb.Tensor = Tensor  # type: ignore[attr-defined]
    pb.InferenceResponse = InferenceResponse  # type: ignore[attr-defined]
    pb.Logger = types.SimpleNamespace(
        log_info=lambda m: None, log_warn=lambda m: None, log_error=lambda m: None
    )  # type: ignore[attr-defined]
    eng = types.ModuleType("pets.engine")
    eng.Engine = FakeEngine  # type: ignore[attr-defined]
    # initialize sets torch's threads for a CPU instance: keep this process's own
    monkeypatch.setattr("torch.set_num_threads", THREADS.append)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.setitem(sys.modules, "pets.engine", eng)
    spec = importlib.util.spec_from_file_location("pets_model_shell", MODEL_PY)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.TritonPythonModel()
    config = {"name": "pets", "parameters": {"DTYPE": {"string_value": "auto"}}}
    args = {"model_config": json.dumps(config), "model_instance_kind": "CPU",
            "model_instance_device_id": "0", "model_repository": "repo/pets"}  # fmt: skip
    model.initialize(args)
    FakeEngine.behaviour, FakeEngine.seen = "ok", []
    return model


THREADS: list[int] = []


def test_numpy_2_is_refused_at_start(shell: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Triton 2.51's stub decodes BYTES inputs as garbage under numpy 2, then aborts
    monkeypatch.setattr(np, "__version__", "2.1.3")
    args = {"model_config": json.dumps({"name": "pets"}), "model_repository": "repo/pets"}
    with pytest.raises(RuntimeError, match=r"numpy 2\.1\.3 .*numpy<2"):
        shell.initialize(args)


def test_cpu_instance_sets_its_threads(shell: Any) -> None:
    assert THREADS and THREADS[-1] >= 1  # initialize set them for its CPU instance
    threads = shell.initialize.__globals__["_cpu_threads"]
    cpu = {"instance_group": [{"kind": "KIND_CPU", "count": 2}, {"kind": "KIND_GPU"}]}
    assert threads("auto", cpu, 9) == 4  # (9 - 1) / 2 CPU instances
    assert threads("", {}, 2) == 1  # one instance, one core left to the server
    assert threads("3", {}, 2) == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError, match="CPU_THREADS"):
            threads(bad, {}, 2)


def req(task: bytes, **ids: np.ndarray) -> Request:
    r = Request(TASK=Tensor("TASK", np.array([[task]], dtype=object)))
    r.update({k: Tensor(k, v) for k, v in ids.items()})
    return r


IDS = np.array([[101, 2000, 102]], dtype=np.int64)


def test_one_response_per_request_in_order(shell: Any) -> None:
    out = shell.execute([req(b"a", INPUT_IDS=IDS), req(b"nope", INPUT_IDS=IDS),
                         req(b"b", INPUT_IDS_INT32=IDS.astype(np.int32))])  # fmt: skip
    assert [o.error is None for o in out] == [True, False, True]
    assert out[1].error.code == "NOT_FOUND" and "nope" in out[1].error.message
    assert out[0].outputs[0].name() == "OUTPUT" and out[0].outputs[0].arr.dtype == np.float32
    assert set(FakeEngine.seen[0][2]) == {"TASK", "INPUT_IDS_INT32"}


def test_both_id_inputs_fail_alone(shell: Any) -> None:
    out = shell.execute([req(b"a", INPUT_IDS=IDS, INPUT_IDS_INT32=IDS.astype(np.int32)),
                         req(b"a", INPUT_IDS=IDS)])  # fmt: skip
    assert out[0].error.code == "INVALID_ARG" and "INPUT_IDS_INT32" in out[0].error.message
    assert out[1].error is None and len(FakeEngine.seen[0]) == 1


@pytest.mark.parametrize(
    ("behaviour", "code", "words"),
    [("raise", "INTERNAL", "ValueError: boom"), ("refuse", "UNAVAILABLE", "retry"),
     ("short", "INTERNAL", "0 results for 2"), ("garbage", "INTERNAL", "unusable output")],
)  # fmt: skip
def test_engine_failures_become_errors(shell: Any, behaviour: str, code: str, words: str) -> None:
    FakeEngine.behaviour = behaviour
    out = shell.execute([req(b"a", INPUT_IDS=IDS), req(b"b", INPUT_IDS=IDS)])
    assert len(out) == 2
    for o in out:
        assert o.error is not None and o.error.code == code and words in o.error.message


def test_finalize_closes(shell: Any) -> None:
    shell.finalize()
    out = shell.execute([req(b"a", INPUT_IDS=IDS)])
    assert out[0].error.code == "INTERNAL" and "finalized" in out[0].error.message
