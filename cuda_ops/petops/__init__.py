"""petops: the PET serving op library (compiled CPU/CUDA kernels with a pure-PyTorch fallback).

The compiled library ``build/out/libpetops.so`` (built by ``build/build_ops.sh``) registers the
``torch.ops.petops.*`` operators. Importing this package loads it when present:

* ``PETOPS_LIBRARY=/path/libpetops.so`` loads that file instead;
* ``PETOPS_DISABLE=1`` skips loading, so every op runs ``petops.reference``.

Use :mod:`petops.ops` for the typed entry points; they fall back to the reference when the
library is missing or has no kernel for the tensors' device.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LIBRARY = _REPO_ROOT / "build" / "out" / "libpetops.so"

_loaded_path: Path | None = None
_load_error: str | None = None
_devices: dict[str, tuple[str, ...]] = {}


def _load() -> None:
    global _loaded_path, _load_error
    if os.environ.get("PETOPS_DISABLE", "") not in ("", "0"):
        _load_error = "disabled by PETOPS_DISABLE"
        return
    path = Path(os.environ.get("PETOPS_LIBRARY") or DEFAULT_LIBRARY)
    if not path.is_file():
        _load_error = f"{path} not found; build it with `bash build/build_ops.sh`"
        return
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as exc:  # ABI mismatch, missing CUDA runtime, ...
        _load_error = f"failed to load {path}: {exc}"
        return
    _loaded_path = path


def compiled_available() -> bool:
    """Whether ``torch.ops.petops`` kernels were loaded from the compiled library."""
    return _loaded_path is not None


def compiled_devices(op: str | None = None) -> tuple[str, ...]:
    """Device types with compiled kernels for ``op``, or for every op when ``op`` is None,
    e.g. ``("cpu", "cuda")``. A library built from an older tree may lack newer ops: those
    fall back to the reference alone."""
    if op is None:
        from .ops import OP_NAMES

        per_op = [set(compiled_devices(name)) for name in OP_NAMES]
        return tuple(d for d in ("cpu", "cuda") if all(d in devs for devs in per_op))
    if op not in _devices:  # fixed once loaded; cached because ops.py asks on every call
        keys = {"cpu": "CPU", "cuda": "CUDA"}
        _devices[op] = tuple(
            dev
            for dev, key in keys.items()
            if compiled_available()
            and hasattr(torch.ops.petops, op)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"petops::{op}", key)
        )
    return _devices[op]


def backend_name() -> str:
    """Human-readable backend, e.g. ``"compiled[cpu,cuda]"`` or ``"reference (<why>)"``."""
    if compiled_available():
        return f"compiled[{','.join(compiled_devices())}]"
    return f"reference ({_load_error})"


def library_path() -> Path | None:
    """The loaded ``libpetops.so``, or ``None``."""
    return _loaded_path


_load()

from . import ops, reference  # noqa: E402  (ops registers fake kernels for the loaded library)

__all__ = [
    "backend_name",
    "compiled_available",
    "compiled_devices",
    "library_path",
    "ops",
    "reference",
]
