"""clients/bench/gpu/detached.sh: a long benchmark outlives the command that started it, and a
later command waits for it and reads its status."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "clients" / "bench" / "gpu" / "detached.sh"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_a_run_is_waited_for_and_its_status_kept(tmp_path: Path) -> None:
    d = tmp_path / "run"
    flag = tmp_path / "go"
    # the command waits for a file, so the first wait sees it still running
    cmd = f"while [ ! -f {flag} ]; do sleep 0.2; done; echo 'two words'; exit 7"
    assert _run("start", str(d), "bash", "-c", cmd).returncode == 0
    still = _run("wait", str(d), "1")
    assert still.returncode == 3 and "still running" in still.stdout
    assert _run("start", str(d), "true").returncode == 1  # one run at a time
    flag.touch()
    done = _run("wait", str(d), "30")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "two words" in done.stdout and "status 7" in done.stdout
    assert (d / "rc").read_text().strip() == "7"


def test_misuse_is_refused(tmp_path: Path) -> None:
    assert _run().returncode == 2
    assert _run("start", str(tmp_path / "x")).returncode == 2
    assert _run("wait", str(tmp_path / "none")).returncode == 1
