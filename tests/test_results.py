"""The benchmark output convention (clients/bench/results.py): dated run folders with a
manifest of the commit, host, GPU and command line."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clients.bench import results

WHEN = dt.datetime(2026, 11, 27, 9, 5, 7, tzinfo=dt.timezone(dt.timedelta(hours=1)))
FIELDS = {
    "name", "date", "command", "cwd", "commit", "dirty", "hostname", "platform", "cpu",
    "cpu_count", "python", "torch", "cuda", "gpus", "params", "reconstructed_from_git",
}  # fmt: skip


def test_folder_name_and_manifest(tmp_path: Path) -> None:
    run = results.start_run(
        "bench_engine",
        tmp_path,
        params={"batch": 64, "out": tmp_path, "dtype": "float16", "root": Path("/x")},
        argv=["bench.py", "--batch", "64", "--name", "two words"],
        when=WHEN,
    )
    assert run.dir == tmp_path / "2026-11-27_090507_bench_engine"
    m = json.loads((run.dir / "manifest.json").read_text())
    assert set(m) >= FIELDS, FIELDS - set(m)
    assert m["name"] == "bench_engine"
    assert m["date"] == "2026-11-27T09:05:07+01:00"
    assert m["command"].endswith("bench.py --batch 64 --name 'two words'")
    assert m["command"].startswith(sys.executable)
    # the folder already names where it is: --out is not a parameter; paths become strings
    assert m["params"] == {"batch": 64, "dtype": "float16", "root": "/x"}
    assert m["reconstructed_from_git"] is False
    assert isinstance(m["gpus"], list)
    assert m["python"] == ".".join(map(str, sys.version_info[:3]))
    assert "status" not in m and "files" not in m  # not finished yet


def test_commit_and_dirty_flag_match_git(tmp_path: Path) -> None:
    m = results.start_run("x", tmp_path, argv=["x"], when=WHEN).manifest
    head = subprocess.run(
        ["git", "-C", str(results.REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert m["commit"] == head.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", m["commit"])
    status = subprocess.run(
        ["git", "-C", str(results.REPO_ROOT), "status", "--porcelain"],
        capture_output=True,
        text=True,
    ).stdout
    assert m["dirty"] is bool(status.strip())


def test_git_state_outside_a_checkout(tmp_path: Path) -> None:
    assert results.git_state(tmp_path) == {"commit": None, "dirty": None}


def test_files_and_finish(tmp_path: Path) -> None:
    run = results.start_run("fig12", tmp_path, argv=["fig12"], when=WHEN)
    run.write_csv("fig12.csv", [{"policy": "fixed", "qps": 1.0}, {"policy": "coordinated"}])
    run.write_json("sub/summary.json", {"a": 1})
    run.update(backend="reference")
    assert run.finish() == run.dir
    m = json.loads((run.dir / "manifest.json").read_text())
    assert m["files"] == ["fig12.csv", "manifest.json", "sub/summary.json"]
    assert m["status"] == "ok"
    assert m["params"] == {"backend": "reference"}
    assert dt.datetime.fromisoformat(m["finished"]) >= dt.datetime.fromisoformat(m["date"])
    assert (run.dir / "fig12.csv").read_text().splitlines() == [
        "policy,qps",
        "fixed,1.0",
        "coordinated,",
    ]


def test_csv_columns_are_every_rows_keys(tmp_path: Path) -> None:
    """A later row may bring columns the first lacks (forward_overhead's ranged points):
    they are kept, not refused."""
    run = results.start_run("fwd", tmp_path, argv=["fwd"], when=WHEN)
    run.write_csv("f.csv", [{"mix": "a", "gpu_ms": 1.0}, {"mix": "b", "wall_ms_exact": 2.0}])
    assert (run.dir / "f.csv").read_text().splitlines() == [
        "mix,gpu_ms,wall_ms_exact",
        "a,1.0,",
        "b,,2.0",
    ]


def test_context_manager_records_failure(tmp_path: Path) -> None:
    with pytest.raises(KeyError), results.start_run("x", tmp_path, argv=["x"], when=WHEN) as run:
        raise KeyError("boom")
    assert json.loads((run.dir / "manifest.json").read_text())["status"] == "failed: KeyError"


def test_same_second_gets_a_suffix(tmp_path: Path) -> None:
    names = [results.start_run("x", tmp_path, argv=["x"], when=WHEN).dir.name for _ in range(3)]
    assert names == ["2026-11-27_090507_x", "2026-11-27_090507_x_2", "2026-11-27_090507_x_3"]


@pytest.mark.parametrize("bad", ["", "Bench", "a b", "../up", "_x"])
def test_bad_names_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="not a slug"):
        results.start_run(bad, tmp_path, argv=["x"], when=WHEN)
    assert not any(tmp_path.iterdir())


def test_default_root_is_ignored_by_git() -> None:
    assert results.DEFAULT_ROOT == results.REPO_ROOT / "var" / "runs"
    done = subprocess.run(
        ["git", "-C", str(results.REPO_ROOT), "check-ignore", "-q", "var/runs/x/manifest.json"]
    )
    if done.returncode == 128:
        pytest.skip("not a git checkout")
    assert done.returncode == 0, "var/runs is not ignored by git"


def test_a_named_commit_wins_over_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    from clients.bench.results import git_state

    monkeypatch.setenv("PETS_RUN_COMMIT", "0123abc")
    assert git_state() == {"commit": "0123abc", "dirty": False, "commit_source": "PETS_RUN_COMMIT"}
