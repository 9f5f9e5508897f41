"""End-to-end: the real tritonserver + tritonclient HTTP/gRPC + perf_analyzer."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from clients.bench.make_perf_data import make
from clients.pets_client import DEMO_TASKS, MODEL, build_inputs, client_module, random_ids

from .conftest import Server

pytestmark = pytest.mark.triton
PROTOCOLS = ("http", "grpc")
TEXTS = ["a gripping, beautifully shot film", "the service was slow and the food cold"]
RTOL, ATOL = 1e-4, 1e-5  # fp32; the server may batch rows differently from the reference


@pytest.fixture(scope="session")
def engine(triton_server: Server) -> Any:
    """The in-process engine with the served model's parameters (the reference)."""
    from pets.engine import Engine

    eng = Engine.from_parameters(
        triton_server.params(), model_dir=str(triton_server.model_dir), device="cpu"
    )
    yield eng
    eng.close()


def url(server: Server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def expected(engine: Any, req: dict[str, np.ndarray]) -> np.ndarray:
    (out,) = engine.execute([req])
    assert isinstance(out, np.ndarray), f"the reference engine refused {req}: {out}"
    return out


def task_arr(names: list[str]) -> np.ndarray:
    return np.array([n.encode() for n in names], dtype=object).reshape(-1, 1)


def is_invalid_arg(exc: InferenceServerException) -> bool:
    return exc.status() in ("400", "StatusCode.INVALID_ARGUMENT")


def batch_counts(server: Server) -> dict[int, int]:
    """Executions so far per batch size (statistics API)."""
    stats = client_module("http").InferenceServerClient(server.http_url)
    (model,) = stats.get_inference_statistics(MODEL)["model_stats"]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in model["batch_stats"]}


def test_metadata(triton_server: Server) -> None:
    mod = client_module("http")
    meta = mod.InferenceServerClient(triton_server.http_url).get_model_metadata(MODEL)
    assert {i["name"] for i in meta["inputs"]} == {
        "TASK",
        "TEXT",
        "INPUT_IDS",
        "INPUT_IDS_INT32",
        "TEXT_PAIR",
        "TOKEN_TYPE_IDS",
    }
    assert [o["name"] for o in meta["outputs"]] == ["OUTPUT"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_task_matches_engine(triton_server: Server, engine: Any, protocol: str) -> None:
    mod = client_module(protocol)
    client = mod.InferenceServerClient(url(triton_server, protocol))
    rng = np.random.default_rng(1)
    for task in DEMO_TASKS:
        ids = random_ids(rng, 12, rows=2)
        cases = [
            (build_inputs(mod, task, texts=TEXTS), {"TASK": task_arr([task] * 2),
                                                    "TEXT": task_arr(TEXTS)}),
            (build_inputs(mod, task, ids=ids), {"TASK": task_arr([task]), "INPUT_IDS": ids}),
            (build_inputs(mod, task, ids=ids, int32=True), {"TASK": task_arr([task]),
                                                            "INPUT_IDS": ids}),
        ]  # fmt: skip
        for inputs, ref in cases:
            got = client.infer(MODEL, inputs).as_numpy("OUTPUT")
            want = expected(engine, ref)
            assert got.dtype == np.float32 and got.shape == want.shape, (task, got.shape)
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=task)
    # the tasks really differ (no vacuous pass): same ids, different outputs per task
    ids = random_ids(rng, 10)
    outs = [client.infer(MODEL, build_inputs(mod, t, ids=ids)).as_numpy("OUTPUT")
            for t in DEMO_TASKS]  # fmt: skip
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            if outs[i].shape == outs[j].shape:
                assert not np.allclose(outs[i], outs[j]), (DEMO_TASKS[i], DEMO_TASKS[j])


def _rows_mismatch(mod: Any, rng: np.random.Generator) -> list[Any]:
    """TASK with 2 rows, INPUT_IDS with 3 (Triton itself refuses unequal batch dims)."""
    task = mod.InferInput("TASK", [2, 1], "BYTES")
    task.set_data_from_numpy(task_arr(["demo_lora", "demo_bitfit"]))
    return [task, build_inputs(mod, "demo_lora", ids=random_ids(rng, 8, rows=3))[1]]


def _bad_requests(mod: Any, max_len: int) -> dict[str, tuple[list[Any], tuple[str, ...]]]:
    """name -> (inputs, words one of which the error message must contain)."""
    rng = np.random.default_rng(2)
    empty = mod.InferInput("INPUT_IDS", [1, 0], "INT64")
    empty.set_data_from_numpy(np.zeros((1, 0), dtype=np.int64))
    task = mod.InferInput("TASK", [1, 1], "BYTES")
    task.set_data_from_numpy(task_arr(["demo_lora"]))
    return {
        "unknown task": (build_inputs(mod, "no_such_task", ids=random_ids(rng, 8)),
                         ("unknown task", "no_such_task")),
        "empty ids": ([task, empty], ("empty",)),
        "too long": (build_inputs(mod, "demo_lora", ids=random_ids(rng, max_len + 1)),
                     ("limit", "MAX_SEQ_LEN", "tokens")),
        "row mismatch": (_rows_mismatch(mod, rng), ("batch size", "rows")),
        "bad id": (build_inputs(mod, "demo_lora", ids=np.array([[101, 10**9, 102]])),
                   ("vocabulary", "outside")),
    }  # fmt: skip


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_requests_fail_alone(triton_server: Server, engine: Any, protocol: str) -> None:
    """Bad requests sent concurrently with good ones (so they share batches) get their own
    INVALID_ARG; the good ones still match the reference."""
    mod = client_module(protocol, aio=True)
    rng = np.random.default_rng(3)
    good = [(t, random_ids(rng, int(rng.integers(4, 40)))) for t in DEMO_TASKS * 4]
    bad = _bad_requests(mod, engine.max_seq_len)

    async def run() -> tuple[list[Any], list[Any]]:
        client = mod.InferenceServerClient(url(triton_server, protocol))
        try:
            g = [client.infer(MODEL, build_inputs(mod, t, ids=x)) for t, x in good]
            b = [client.infer(MODEL, inputs) for inputs, _ in bad.values()]
            res = await asyncio.gather(*g, *b, return_exceptions=True)
        finally:
            await client.close()
        return res[: len(g)], res[len(g) :]

    before = batch_counts(triton_server)
    good_res, bad_res = asyncio.run(run())
    grown = {n: c - before.get(n, 0) for n, c in batch_counts(triton_server).items()}
    assert any(n > 1 and c > 0 for n, c in grown.items()), f"no batching happened: {grown}"
    for (t, x), res in zip(good, good_res, strict=True):
        assert not isinstance(res, BaseException), f"good request for {t} failed: {res}"
        want = expected(engine, {"TASK": task_arr([t]), "INPUT_IDS": x})
        np.testing.assert_allclose(res.as_numpy("OUTPUT"), want, rtol=RTOL, atol=ATOL)
    for (name, (_, words)), res in zip(bad.items(), bad_res, strict=True):
        assert isinstance(res, InferenceServerException), f"{name}: expected an error, got {res}"
        assert is_invalid_arg(res), f"{name}: {res.status()} {res.message()}"
        assert any(w in res.message() for w in words), f"{name}: unhelpful message {res.message()}"


def test_wrong_task_shape_is_refused(triton_server: Server) -> None:
    mod = client_module("http")
    client = mod.InferenceServerClient(triton_server.http_url)
    task = mod.InferInput("TASK", [1, 2], "BYTES")
    task.set_data_from_numpy(np.array([[b"demo_lora", b"demo_lora"]], dtype=object))
    ids = build_inputs(mod, "demo_lora", ids=np.array([101, 2000, 102]))[1]
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [task, ids])
    assert is_invalid_arg(info.value) and "TASK" in info.value.message()


def test_perf_analyzer_mixed_tasks(triton_server: Server, tmp_path: Path) -> None:
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(make(list(DEMO_TASKS), "8:48", 50, seed=0, int32=False)))
    cmd = [
        "perf_analyzer", "-m", MODEL, "-i", "grpc", "-u", triton_server.grpc_url, "--async",
        "--input-data", str(data), "--concurrency-range", "4",
        # count windows: a slow CI machine still completes them; any stable result will do
        "--measurement-mode", "count_windows", "--measurement-request-count", "10",
        "--max-trials", "6", "--stability-percentage", "999",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=triton_server.env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"perf_analyzer failed ({proc.returncode}):\n{out[-4000:]}"
    m = re.search(r"Throughput: ([0-9.]+) infer/sec", out)
    assert m and float(m.group(1)) > 0, out[-4000:]
