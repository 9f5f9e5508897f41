"""clients.bench.cpu_ops on a tiny grid: engine capture, per-library timing, the run folder.

The benchmark records the petops calls of a real bert-tiny engine execute and times them in a
child process per library; here with two requests, one thread and a few calls, against this
tree's library twice (so every output must match exactly).
"""

from __future__ import annotations

import csv
import json

import pytest

import petops
from clients.bench import cpu_ops
from petops import ops

pytestmark = pytest.mark.skipif(
    not petops.compiled_available(), reason=f"petops library not built: {petops.backend_name()}"
)


def test_capture_sees_every_cpu_op_of_a_mixed_batch() -> None:
    # One request per PET type; seg_masked_mm comes from the MASKBERT_FORMAT=bitmask engine.
    groups = cpu_ops.capture(cpu_ops.Case("bert-tiny", 7, 3), tasks_per_type=1, keep=1)
    assert {g["op"] for g in groups} == set(ops.OP_NAMES)
    for g in groups:
        assert g["calls"] >= len(g["args"]) == 1, g["key"]
        rows = g["args"][0][0].shape[0]
        assert rows == 21, g["key"]  # 7 requests x 3 tokens


def test_bench_writes_rows_for_each_library(tmp_path) -> None:
    lib = str(cpu_ops.DEFAULT_LIBRARY)
    folder = cpu_ops.main(
        [
            "--cases",
            "bert-tiny:7x2",
            "--tasks-per-type",
            "1",
            "--threads",
            "1",
            "--iters",
            "2",
            "--keep",
            "1",
            "--library",
            f"a={lib}",
            "--library",
            f"b={lib}",
            "--out",
            str(tmp_path),
        ]
    )
    assert folder is not None
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "ok" and "cpu_ops.csv" in manifest["files"]
    rows = list(csv.DictReader((folder / "cpu_ops.csv").open()))
    by_lib: dict[str, list[dict[str, str]]] = {"a": [], "b": []}
    for r in rows:
        by_lib[r["library"]].append(r)
    assert len(by_lib["a"]) == len(by_lib["b"]) > 1
    ops_timed = {r["op"] for r in by_lib["b"]}
    assert {"bias_act", "adapter_residual_layernorm", "seg_spmm", "total"} <= ops_timed
    for r in by_lib["b"]:
        if r["op"] == "total":
            assert float(r["per_execute_us"]) > 0
            continue
        assert float(r["median_us"]) > 0 and r["threads"] == "1", r
        assert float(r["max_abs_diff"]) == 0.0, r  # the same library: identical outputs


def test_parse_errors_name_the_expected_form() -> None:
    with pytest.raises(SystemExit, match="BACKBONE:BxL"):
        cpu_ops.parse_cases("bert-tiny")
    with pytest.raises(SystemExit, match="LABEL=PATH"):
        cpu_ops.parse_libraries(["nolabel"])
