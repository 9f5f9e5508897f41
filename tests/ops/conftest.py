"""Make the source-tree ``petops`` importable and the one under test.

A stale editable install (made before ``cuda_ops/petops/__init__.py`` existed) resolves
``petops`` as a namespace package, which never runs ``__init__`` and so never loads the
compiled library; re-running ``pip install -e .`` fixes the install. Until then, drop such a
namespace import so the tests below see the real package.
"""

from __future__ import annotations

import sys
from pathlib import Path

_CUDA_OPS = Path(__file__).resolve().parents[2] / "cuda_ops"
if str(_CUDA_OPS) not in sys.path:
    sys.path.insert(0, str(_CUDA_OPS))
if "petops" in sys.modules and getattr(sys.modules["petops"], "__file__", None) is None:
    for name in [m for m in sys.modules if m == "petops" or m.startswith("petops.")]:
        del sys.modules[name]
