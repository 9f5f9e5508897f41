"""Error types. Every message names the offending value, what was expected and the fix."""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal["INVALID_ARG", "NOT_FOUND", "UNAVAILABLE", "INTERNAL"]
SHORT_LIMIT = 80  # characters of an offending value's repr in a message


def short(value: object, limit: int = SHORT_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters (the full length said), so a message that
    names a client's or a file's value stays short whatever the value is."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def clip(text: str, limit: int) -> str:
    """``text`` itself, or its first ``limit`` characters and the full length (for messages
    that pass on a library's own error text, which may quote the offending input)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


LIBRARY_MESSAGE_LIMIT = 300  # characters of a library's error text passed on in ours


class PetsError(Exception):
    """Base class of all errors raised by the pets engine."""


class RequestError(PetsError):
    """A problem with one request. It becomes that request's own error response.

    ``code`` maps onto Triton's error codes (``model.py`` does the mapping); batch-mates of
    the failing request are unaffected.
    """

    def __init__(self, message: str, code: ErrorCode = "INVALID_ARG") -> None:
        super().__init__(message)
        self.message = message
        self.code: ErrorCode = code

    def __repr__(self) -> str:
        return f"RequestError({self.code}: {self.message})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RequestError)
            and other.code == self.code
            and other.message == self.message
        )

    def __hash__(self) -> int:
        return hash((self.code, self.message))


class TaskError(PetsError):
    """A task in the store is malformed (bad manifest, weights, names or backbone)."""


class ConfigError(PetsError):
    """The model configuration (``config.pbtxt`` parameters) is invalid."""
