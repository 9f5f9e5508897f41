"""served_overhead refuses to measure an engine from another tree than its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.bench.served_overhead import ROOT, check_engine_source

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
