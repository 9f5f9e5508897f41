"""host_path runs end to end on the CPU: its engine replays warmed one-request graphs and
writes a row per point."""

from __future__ import annotations

import csv
from pathlib import Path

from clients.bench.host_path import main


def test_host_path_writes_a_row_per_point(tmp_path: Path) -> None:
    assert main(["--tasks", "7", "--points", "1x8:20,2x16", "--executes", "30",
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    (run,) = tmp_path.iterdir()
    rows = list(csv.DictReader((run / "host_path.csv").open()))
    assert [r["point"] for r in rows] == ["1x8:20", "2x16"]
    one = rows[0]
    assert int(one["warmed_graphs"]) == 7 * 7  # 7 PET types x buckets 16..128
    assert int(one["replays"]) > 0 and float(one["us_per_request"]) > 0
