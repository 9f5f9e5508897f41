"""served_overhead refuses to measure an engine from another tree than its own, counts the
CUDA-graph captures the server logs, and times the served model's own engine in process."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest

from clients.bench.served_overhead import (
    HF_MODEL,
    ROOT,
    captures_since,
    check_engine_source,
    data_requests,
    engine_params,
    in_process_rate,
    make_data,
    make_repo,
    stub_threads,
)
from clients.bench.server_breakdown import forward_by_group, parse_tasks
from clients.pets_client import parse_point

LINE = 'I1207 model.py:253] "pets: instance pets_0_0 ready on cpu, engine from {}, parameters {{}}"'


def test_this_trees_engine_passes(tmp_path: Path) -> None:
    log = tmp_path / "tritonserver.log"
    log.write_text(LINE.format((ROOT / "backend" / "pets").resolve()) + "\n")
    check_engine_source(log)


def test_another_trees_engine_is_refused(tmp_path: Path) -> None:
    log = tmp_path / "tritonserver.log"
    log.write_text(LINE.format("/elsewhere/backend/pets") + "\n")
    with pytest.raises(SystemExit, match="/elsewhere/backend/pets"):
        check_engine_source(log)


def test_a_log_without_the_line_is_not_judged(tmp_path: Path) -> None:
    log = tmp_path / "tritonserver.log"
    log.write_text("I1207 server is ready\n")
    check_engine_source(log)


def test_captures_are_counted_from_an_offset(tmp_path: Path) -> None:
    log = tmp_path / "tritonserver.log"
    log.write_text("I pets: CUDA graphs: captured a forward in 12.5 ms (1 held)\n")
    start = log.stat().st_size
    with log.open("a") as f:
        f.write("I pets: CUDA graphs: captured a forward in 14.0 ms (2 held)\n")
        f.write("I pets: something else\nI pets: CUDA graphs: captured a forward in 1.5 ms\n")
    assert captures_since(log, start) == (2, 15.5)
    assert captures_since(log, log.stat().st_size) == (0, 0.0)


def test_hf_model_source_is_python() -> None:
    """The ``--hf`` model's source is formatted from a template: it must stay valid Python
    and name the backbone it was given."""
    source = HF_MODEL.format(backbone="bert-tiny")
    compile(source, "model.py", "exec")
    assert "load_backbone('bert-tiny')" in source


def test_points_take_a_fixed_length_or_a_range(tmp_path: Path) -> None:
    assert parse_point("1x128") == (1, "128")
    assert parse_point("8x16:128") == (8, "16:128")
    for bad in ("1x", "x64", "1x64:", "1x9:3", "0x64", "1x1", "1y64"):
        with pytest.raises(SystemExit, match="--points entry"):
            parse_point(bad)
    make_data(tmp_path / "d.json", ["a", "b"], "16:24", 64)
    data = json.loads((tmp_path / "d.json").read_text())["data"]
    sizes = [d["INPUT_IDS"]["shape"][0] for d in data]
    assert min(sizes) >= 16 and max(sizes) <= 24 and len(set(sizes)) > 4
    assert all(len(d["INPUT_IDS"]["content"]) == d["INPUT_IDS"]["shape"][0] for d in data)
    assert [d["TASK"][0] for d in data[:3]] == ["a", "b", "a"]


def test_queue_delay_is_rewritten_for_every_model(tmp_path: Path) -> None:
    """``--queue-delay-us`` sets the batcher delay of pets and of the no-op model alike (a
    lone request waits that long before its batch is sent); without it both keep the
    shipped config's delay."""
    shipped = (ROOT / "model_repository/pets/config.pbtxt").read_text()
    default = re.findall(r"max_queue_delay_microseconds: (\d+)", shipped)
    assert len(default) == 1 and default[0] != "7"
    base = dict(backbone="bert-tiny", tasks=2, pet_types="lora", metrics=1, kind="CPU")
    base.update(instances=1, profile_stub=False, hf=False)
    for delay, want in ((7, "7"), (None, default[0])):
        repo, names = make_repo(
            argparse.Namespace(**base, queue_delay_us=delay), tmp_path / f"{delay}"
        )
        assert names == ["t0_lora", "t1_lora"]
        for model in ("pets", "noop"):
            text = (repo / model / "config.pbtxt").read_text()
            assert re.findall(r"max_queue_delay_microseconds: (\d+)", text) == [want], model


def test_forward_time_is_split_by_pet_type() -> None:
    """The per-task series give each PET type's mean forward per sequence between two
    scrapes; other models' series and tasks outside the map are left out."""
    page = """# HELP pets_task_compute_us_total forward time per task
pets_task_compute_us_total{{model="pets",task="t0_lora"}} {a}
pets_task_compute_us_total{{model="pets",task="t1_maskbert"}} {b}
pets_task_compute_us_total{{model="other",task="t0_lora"}} 99999
pets_task_requests_total{{model="pets",task="t0_lora"}} {n}
pets_task_requests_total{{model="pets",task="t1_maskbert"}} {n}
pets_task_requests_total{{model="pets",task="stray"}} 5
nv_inference_exec_count{{model="pets",version="1"}} 7
"""
    before = parse_tasks(page.format(a=1000, b=3000, n=1), "pets")
    after = parse_tasks(page.format(a=5000, b=15000, n=5), "pets")
    assert before[("pets_task_compute_us_total", "t0_lora")] == 1000  # not model="other"
    got = forward_by_group(before, after, {"t0_lora": "lora", "t1_maskbert": "maskbert"})
    assert got == pytest.approx({"lora": 1.0, "maskbert": 3.0})  # 4 ms / 4, 12 ms / 4
    assert forward_by_group(after, after, {"t0_lora": "lora"}) == {}  # nothing served


def test_in_process_engine_serves_the_perf_data(tmp_path: Path) -> None:
    """``--in-process`` builds the pets model's engine from its config (parameters, store)
    and runs perf_analyzer's data through ``Engine.execute``: every request answered, as
    the server would answer it, and a rate measured."""
    from pets.engine import Engine

    base = dict(backbone="bert-tiny", tasks=3, pet_types="lora,bitfit,maskbert", metrics=1)
    base.update(kind="CPU", instances=1, profile_stub=False, hf=False, queue_delay_us=None)
    repo, names = make_repo(argparse.Namespace(**base), tmp_path)
    params, max_batch = engine_params((repo / "pets" / "config.pbtxt").read_text())
    shipped = (ROOT / "model_repository/pets/config.pbtxt").read_text()
    assert max_batch == int(re.findall(r"max_batch_size: (\d+)", shipped)[0]) > 1
    assert params["BACKBONE"] == "bert-tiny" and params["TASK_STORE"] == str(tmp_path / "store")
    assert params["METRICS"] == "1" and "SCHEDULER" in params
    make_data(tmp_path / "d.json", names, "8:12", 6)
    reqs = data_requests(tmp_path / "d.json")
    assert [r["TASK"][0, 0].decode() for r in reqs] == names * 2
    assert all(r["INPUT_IDS"].shape[0] == 1 and 8 <= r["INPUT_IDS"].shape[1] <= 12 for r in reqs)
    engine = Engine.from_parameters(params, model_dir=str(repo), device="cpu")
    try:
        outs = engine.execute(reqs[:4])
        assert all(isinstance(o, np.ndarray) and o.shape == (1, 2) for o in outs)
        got = in_process_rate(engine, reqs, batch=4, min_s=0.05)
        assert got["req_per_s"] > 0 and got["batch_ms"] > 0
        assert got["req_per_s"] == pytest.approx(4e3 / got["batch_ms"])
    finally:
        engine.close()


def test_stub_threads_come_from_the_ready_line(tmp_path: Path) -> None:
    log = tmp_path / "tritonserver.log"
    log.write_text(LINE.format("/x") + "\n")
    assert stub_threads(log) is None
    log.write_text('I model.py:253] "pets: instance pets_0_0 ready on cpu with 3 CPU threads, e"\n')
    assert stub_threads(log) == 3
