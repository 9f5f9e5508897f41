"""Checks of the Triton kernels: through the CPU interpreter in a child process, and of their
sm_90 code compiled ahead of time.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` kernel is defined, so the checks run in a
fresh interpreter started with it set: the test module itself, run as a script, prints one
JSON object per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(script: str, timeout: float = 600) -> list[dict[str, Any]]:
    """Run ``script`` (a test module's path) with ``TRITON_INTERPRET=1`` and the test paths
    of pyproject.toml; returns its JSON lines. Fails with the child's stderr."""
    env = os.environ | {"TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        str(ROOT / p) for p in ("backend", "cuda_ops", ".", "tests", "tests/ops")
    )
    proc = subprocess.run(
        [sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def assert_hopper_code(asm: dict[str, Any], what: object) -> None:
    """``asm`` (a kernel compiled for sm_90, :mod:`petops.triton_aot`) uses wgmma and spills
    no registers; ``what`` names it in the failure."""
    from petops.triton_aot import resource_usage

    assert "wgmma.mma_async" in asm["ptx"], f"{what}: no Hopper matrix instructions"
    usage = resource_usage(asm["cubin"])
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0, f"{what} spills: {usage}"
