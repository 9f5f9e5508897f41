"""The shadow-op functions the engine calls.

``petops.ops`` dispatches to the compiled library when it is built (and has a kernel for the
tensor's device) and to the pure-PyTorch references otherwise; ``select`` forces one side.
"""

from __future__ import annotations

import logging
from types import ModuleType

from petops import reference as _reference

log = logging.getLogger("pets")

try:
    from petops import ops as _ops
except ImportError:  # pragma: no cover - petops ships with pets; only a broken install lands here
    _ops = None  # type: ignore[assignment]

K: ModuleType = _ops if _ops is not None else _reference


def select(mode: str) -> str:
    """Choose the op implementation: ``auto`` | ``compiled`` | ``reference``.

    Returns:
        A description of what is in use (logged by the engine).
    """
    global K
    if mode not in ("auto", "compiled", "reference"):
        raise ValueError(f"OPS={mode!r}; expected 'auto', 'compiled' or 'reference'")
    if _ops is None or mode == "reference":
        K = _reference
        return "reference (pure PyTorch)"
    _ops.set_backend(mode)
    K = _ops
    return f"petops: {_ops.backend_description()}"


def active() -> ModuleType:
    """The op module in use (``petops.ops`` or ``petops.reference``)."""
    return K
