"""One output convention for every benchmark and paper experiment: a dated run folder.

Each run writes ``<root>/<YYYY-MM-DD>_<HHMMSS>_<name>/`` (root ``var/runs`` of the repository
by default, ignored by git; scripts take ``--out ROOT`` to choose another) holding
``manifest.json`` beside the run's CSV/JSON files and plots. The manifest records what is
needed to trust or repeat a number: the commit and whether the tree was dirty, the date,
host, GPU name(s) and driver, CUDA and torch versions, Python, platform, the exact command
line, the script's parameters, and (once the run finishes) the files it wrote.

    run = start_run("bench_engine", args.out, params=vars(args))
    run.write_csv("engine_bench.csv", rows)
    run.finish()          # lists the files in the manifest, prints the folder

Fields that cannot be known on a host (no git checkout, no GPU, no torch) are ``null``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO_ROOT / "var" / "runs"
MANIFEST = "manifest.json"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """``--out ROOT``: where the dated run folder is made (default ``var/runs``)."""
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_ROOT,
        metavar="ROOT",
        help="root of the dated run folder <ROOT>/<date>_<time>_<name>/ (default var/runs)",
    )


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that started this process, as one shell-quoted string.

    ``python -m pkg.mod ...`` is written back as such (``sys.argv[0]`` then holds the file).
    """
    args = list(sys.argv if argv is None else argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if argv is None and spec is not None and spec.name:
        head = [sys.executable, "-m", spec.name.removesuffix(".__main__")]
        return shlex.join(head + args[1:])
    return shlex.join([sys.executable, *args])


def git_state(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout holding ``repo``.

    Dirty means tracked changes or untracked files git does not ignore. ``PETS_RUN_COMMIT``
    in the environment names the commit instead: a copy of the tree shipped to a GPU host may
    carry a ``.git`` that does not match its files.
    """
    named = os.environ.get("PETS_RUN_COMMIT")
    if named:
        return {"commit": named, "dirty": False, "commit_source": "PETS_RUN_COMMIT"}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain")
    return {"commit": head.strip(), "dirty": None if status is None else bool(status.strip())}


def gpu_info() -> list[dict[str, Any]]:
    """One entry per visible NVIDIA GPU: index, name, driver, memory (MiB).

    From ``nvidia-smi`` when it is on PATH; else the names torch sees (driver unknown).
    """
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        query = "index,name,driver_version,memory.total"
        try:
            done = subprocess.run(
                [smi, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if done.returncode == 0:
                gpus = []
                for line in done.stdout.strip().splitlines():
                    index, name, driver, mem = (v.strip() for v in line.split(",", 3))
                    gpus.append(
                        {
                            "index": int(index),
                            "name": name,
                            "driver": driver,
                            "memory_mib": int(mem) if mem.isdigit() else None,
                        }
                    )
                return gpus
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
    torch = _torch()
    if torch is None or not torch.cuda.is_available():
        return []
    return [
        {"index": i, "name": torch.cuda.get_device_name(i), "driver": None, "memory_mib": None}
        for i in range(torch.cuda.device_count())
    ]


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def environment() -> dict[str, Any]:
    """Host, software and GPU facts of this process (the manifest minus the run's own)."""
    torch = _torch()
    return {
        **git_state(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": None if torch is None else torch.__version__,
        "cuda": None if torch is None else torch.version.cuda,
        "gpus": gpu_info(),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # Path, torch.dtype, ...


class Run:
    """A run folder being written. Make one with :func:`start_run`."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.dir = folder
        self.manifest = manifest

    def path(self, filename: str) -> Path:
        """``<run folder>/<filename>`` (parent folders made)."""
        p = self.dir / filename
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_csv(
        self, filename: str, rows: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None
    ) -> Path:
        """Rows as CSV; columns ``fields`` or every key of the rows, in order of first
        appearance (a row without a column leaves it empty)."""
        if fields is None and not rows:
            raise ValueError(f"no rows for {filename} and no fields: give fields= for the header")
        p = self.path(filename)
        columns = list(fields) if fields else list(dict.fromkeys(k for r in rows for k in r))
        with p.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)
        return p

    def write_json(self, filename: str, obj: Any, indent: int | None = 2) -> Path:
        p = self.path(filename)
        p.write_text(json.dumps(obj, indent=indent) + "\n")
        return p

    def write_text(self, filename: str, text: str) -> Path:
        p = self.path(filename)
        p.write_text(text)
        return p

    def update(self, **params: Any) -> None:
        """Add to the manifest's ``params`` and rewrite it."""
        self.manifest["params"].update(_jsonable(params))
        self._write()

    def finish(self, status: str = "ok") -> Path:
        """Record the end time, ``status`` and the files written; print the folder."""
        self.manifest["finished"] = _now().isoformat(timespec="seconds")
        self.manifest["status"] = status
        self.manifest["files"] = sorted(
            str(p.relative_to(self.dir)) for p in self.dir.rglob("*") if p.is_file()
        )
        self._write()
        print(f"# results in {self.dir}", file=sys.stderr, flush=True)
        return self.dir

    def _write(self) -> None:
        (self.dir / MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n")

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        self.finish("ok" if exc_type is None else f"failed: {exc_type.__name__}")


def _now() -> dt.datetime:
    return dt.datetime.now().astimezone()


def run_folder_name(name: str, when: dt.datetime) -> str:
    """``<YYYY-MM-DD>_<HHMMSS>_<name>`` for a run started at ``when`` (local time)."""
    if not NAME_RE.match(name):
        raise ValueError(
            f"run name {name!r} is not a slug; use lower-case letters, digits, '_', '-' or '.'"
        )
    return f"{when:%Y-%m-%d_%H%M%S}_{name}"


def start_run(
    name: str,
    root: Path | str | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    argv: Sequence[str] | None = None,
    when: dt.datetime | None = None,
    environment_info: Mapping[str, Any] | None = None,
) -> Run:
    """Make ``<root>/<date>_<time>_<name>/`` and write its first ``manifest.json``.

    ``params`` are the script's settings (e.g. ``vars(args)``; ``out`` is dropped, the
    folder says it). A second run started in the same second gets ``_2``, ``_3``, ...
    ``argv``, ``when`` and ``environment_info`` replace what is read from this process
    (for tests).
    """
    when = when or _now()
    root = Path(root) if root is not None else DEFAULT_ROOT
    base = run_folder_name(name, when)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        folder = root / (base if k == 1 else f"{base}_{k}")
        try:
            folder.mkdir()
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - a thousand runs in one second
        raise FileExistsError(f"{root / base}_*: too many runs named {name!r} in one second")
    settings = {k: v for k, v in (params or {}).items() if k != "out"}
    manifest: dict[str, Any] = {
        "name": name,
        "date": when.isoformat(timespec="seconds"),
        "command": command_line(argv),
        "cwd": os.getcwd(),
        **(environment() if environment_info is None else dict(environment_info)),
        "params": _jsonable(settings),
        "reconstructed_from_git": False,
    }
    run = Run(folder, manifest)
    run._write()
    return run


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (plots go to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
