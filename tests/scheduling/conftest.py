"""Make ``pets`` importable from the source tree when it is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import pets  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "backend"))
