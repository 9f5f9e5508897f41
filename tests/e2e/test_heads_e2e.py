"""End-to-end heads through the real tritonserver, HTTP and gRPC (one server start):
token classification ``[k, L, C]``, sentence pairs (TEXT_PAIR, TOKEN_TYPE_IDS), multi-label,
regression and embedding tasks, alone, mixed in one request, and concurrently; the example
script clients/examples/heads.py against the same server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients.pets_client import client_module
from pets.heads import HeadConfig
from pets.taskgen import random_task
from pets.taskstore import write_task

from .conftest import ROOT, Server, launch

pytestmark = pytest.mark.triton
PROTOCOLS = ("http", "grpc")
ATOL = 1e-5
# The tasks clients/examples/heads.py documents (its `pets create` lines).
TASKS = {
    "ner": ("lora", HeadConfig("token_classification", num_labels=5)),
    "nli": (
        "adapter",
        HeadConfig("classification", num_labels=3, output="probabilities", pairs=True),
    ),
    "tags": ("ia3", HeadConfig("multi_label", num_labels=3, output="probabilities")),
    "sts": ("bitfit", HeadConfig("regression", num_labels=1, pairs=True)),
    "emb": ("diff_pruning", HeadConfig("embedding", pooling="mean", normalize=True)),
}


@pytest.fixture(scope="module")
def heads_server(tmp_path_factory: pytest.TempPathFactory, backbone: Any) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("heads")
    for seed, (name, (pet, head)) in enumerate(TASKS.items()):
        hp = {"bottleneck": 16} if pet == "adapter" else {}
        m, t = random_task(backbone, name, pet, head, seed=seed, hparams=hp)
        write_task(tmp / "store", m, t)
    with launch(tmp, tmp / "store") as server:
        yield server


@pytest.fixture(scope="module")
def ref(heads_server: Server) -> Iterator[Any]:
    from pets.engine import Engine

    eng = Engine.from_parameters(heads_server.params(), model_dir=str(heads_server.model_dir))
    assert not eng.load_errors, eng.load_errors
    yield eng
    eng.close()


def _bytes(rows: list[str]) -> np.ndarray:
    return np.array([r.encode() for r in rows], dtype=object)[:, None]


def _infer(server: Server, protocol: str, req: dict[str, np.ndarray]) -> np.ndarray:
    mod = client_module(protocol)
    url = server.http_url if protocol == "http" else server.grpc_url
    client = mod.InferenceServerClient(url)
    ins = []
    for name, arr in req.items():
        dtype = "BYTES" if arr.dtype == object else "INT64"
        t = mod.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        ins.append(t)
    return client.infer("pets", ins).as_numpy("OUTPUT")


def _want(ref: Any, req: dict[str, np.ndarray]) -> np.ndarray:
    (out,) = ref.execute([req])
    assert isinstance(out, np.ndarray), out
    return out


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_token_classification_returns_each_tokens_row(heads_server, ref, protocol):
    req = {"TASK": _bytes(["ner"]), "TEXT": _bytes(["Ada Lovelace was born in London."])}
    got = _infer(heads_server, protocol, req)
    n = len(ref.tokenizer.encode("Ada Lovelace was born in London.").ids)
    assert got.shape == (1, n, 5)  # [k, L, C]: L the text's own tokens, no padding
    np.testing.assert_allclose(got, _want(ref, req), atol=ATOL, rtol=0)
    ids = np.array([[101, 2000, 2001, 102, 3000, 102], [101, 2500, 2600, 2700, 2800, 102]])
    types = np.array([[0, 0, 0, 0, 1, 1], [0] * 6])
    req = {"TASK": _bytes(["ner", "ner"]), "INPUT_IDS": ids, "TOKEN_TYPE_IDS": types}
    got = _infer(heads_server, protocol, req)
    assert got.shape == (2, 6, 5)
    np.testing.assert_allclose(got, _want(ref, req), atol=ATOL, rtol=0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_one_request_mixes_heads_pairs_and_single_texts(heads_server, ref, protocol):
    req = {
        "TASK": _bytes(["nli", "tags", "nli"]),
        "TEXT": _bytes(["A man plays a guitar.", "great battery", "It rains."]),
        "TEXT_PAIR": _bytes(["A musician performs.", "", "The street is wet."]),
    }
    got = _infer(heads_server, protocol, req)
    assert got.shape == (3, 3)
    np.testing.assert_allclose(got, _want(ref, req), atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[[0, 2]].sum(1), 1, atol=1e-5)  # softmax rows
    single = {"TASK": _bytes(["nli"]), "TEXT": _bytes(["A man plays a guitar."])}
    assert np.abs(_infer(heads_server, protocol, single)[0] - got[0]).max() > 1e-4


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_concurrent_requests_of_every_head(heads_server, ref, protocol):
    reqs = {
        "ner": {"TASK": _bytes(["ner"]), "TEXT": _bytes(["Paris is in France."])},
        "nli": {"TASK": _bytes(["nli"]), "TEXT": _bytes(["x"]), "TEXT_PAIR": _bytes(["y z"])},
        "tags": {"TASK": _bytes(["tags"]), "TEXT": _bytes(["fast, cheap"])},
        "sts": {"TASK": _bytes(["sts"]), "TEXT": _bytes(["a cat"]), "TEXT_PAIR": _bytes(["a"])},
        "emb": {"TASK": _bytes(["emb"]), "TEXT": _bytes(["one backbone"])},
    }
    mod = client_module(protocol, aio=True)
    url = heads_server.http_url if protocol == "http" else heads_server.grpc_url

    async def go() -> list[np.ndarray]:
        client = mod.InferenceServerClient(url)
        try:
            calls = []
            for req in reqs.values():
                ins = []
                for name, arr in req.items():
                    t = mod.InferInput(name, list(arr.shape), "BYTES")
                    t.set_data_from_numpy(arr)
                    ins.append(t)
                calls.append(client.infer("pets", ins))
            return [r.as_numpy("OUTPUT") for r in await asyncio.gather(*calls)]
        finally:
            await client.close()

    for (name, req), got in zip(reqs.items(), asyncio.run(go()), strict=True):
        np.testing.assert_allclose(got, _want(ref, req), atol=ATOL, rtol=0, err_msg=name)
    assert reqs and got.shape == (1, 384)  # the last: emb, MiniLM's hidden size


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_pair_inputs_fail_with_the_fix(heads_server, protocol):
    from tritonclient.utils import InferenceServerException

    req = {"TASK": _bytes(["nli"]), "INPUT_IDS": np.array([[101, 102]]),
           "TOKEN_TYPE_IDS": np.array([[0, 2]])}  # fmt: skip
    with pytest.raises(InferenceServerException, match=r"token types \[0, 2\)"):
        _infer(heads_server, protocol, req)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_heads_example_runs(heads_server, protocol):
    url = heads_server.http_url if protocol == "http" else heads_server.grpc_url
    script = Path(ROOT) / "clients" / "examples" / "heads.py"
    proc = subprocess.run([sys.executable, str(script), "--protocol", protocol, "--url", url],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "one request, nli + tags: OUTPUT (2, 3)" in proc.stdout
    assert "ner   OUTPUT (1, 10, 5)" in proc.stdout, proc.stdout
