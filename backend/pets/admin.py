"""Task lifecycle over HTTP/gRPC: the logic of the ``pets_admin`` model, without Triton.

``backend/pets_admin/model.py`` (installed as ``<backend-dir>/pets_admin/model.py``) is a thin
shell over :class:`Admin`. Actions: ``register`` (a new name), ``update`` (an existing name),
``unregister``, ``list``, ``status``. A task is validated completely against the serving
backbone (the registry's own checks plus a trial load on CPU) *before* it is published with
the store's atomic :func:`~pets.taskstore.write_task`; a request sent after the call returned
is served with the change on every instance (each batch checks the store first), and idle
instances pick it up within a second (``Engine``'s refresh thread). Refused input leaves the
store unchanged.
Weights arrive as raw safetensors bytes; pickle is never read.
"""

from __future__ import annotations

import fcntl
import hmac
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from .backbone import load_backbone, resolve_checkpoint
from .errors import ConfigError, PetsError, TaskError
from .registry import TaskRegistry
from .taskstore import (
    MAX_MANIFEST_BYTES,
    WEIGHTS,
    TaskManifest,
    check_name,
    delete_task,
    list_tasks,
    read_manifest,
    weights_from_bytes,
    write_task,
)
from .validate import scratch_registry

ACTIONS = ("register", "update", "unregister", "list", "status")
TOKEN_ENV = "PETS_ADMIN_TOKEN"
MIN_TOKEN_LEN = 16
AdminCode = Literal["INVALID_ARG", "NOT_FOUND", "ALREADY_EXISTS", "UNAVAILABLE", "INTERNAL"]


class AdminError(PetsError):
    """A refused admin request; ``code`` is a ``pb_utils.TritonError`` attribute name."""

    def __init__(self, message: str, code: AdminCode = "INVALID_ARG") -> None:
        super().__init__(message)
        self.message, self.code = message, code


def config_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """``config.pbtxt`` ``parameters`` (as Triton hands them to ``initialize``) as strings."""
    raw = model_config.get("parameters") or {}
    return {k: str(v.get("string_value", "")) for k, v in raw.items()}


def load_token(params: Mapping[str, str], model_dir: Path, env: Mapping[str, str]) -> str | None:
    """The admin token: parameter ADMIN_TOKEN_FILE (relative to the model dir), else env
    PETS_ADMIN_TOKEN; None (admin disabled) when neither is set."""
    file = params.get("ADMIN_TOKEN_FILE", "")
    if file:
        path = Path(file) if Path(file).is_absolute() else model_dir / file
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"ADMIN_TOKEN_FILE={file!r} cannot be read ({exc}); write the "
                "token into that file or remove the parameter"
            ) from None
        source = f"ADMIN_TOKEN_FILE {path}"
    else:
        token = env.get(TOKEN_ENV, "").strip()
        source = f"${TOKEN_ENV}"
        if not token:
            return None
    if len(token) < MIN_TOKEN_LEN:
        raise ConfigError(
            f"the admin token from {source} has {len(token)} characters; use at "
            f"least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 16`)"
        )
    return token


class Admin:
    """Validates and publishes tasks into one store for one backbone."""

    def __init__(
        self,
        store: Path,
        registry: TaskRegistry,
        token: str | None,
        max_upload_bytes: int = 512 << 20,
        trial_load: bool = True,
    ) -> None:
        self.store = store
        self.registry = registry  # scratch CPU registry: validation and trial loads only
        self._token = token
        self.max_upload_bytes = max_upload_bytes
        self.trial_load = trial_load

    @classmethod
    def from_parameters(
        cls, params: Mapping[str, str], model_dir: Path, env: Mapping[str, str] = os.environ
    ) -> Admin:
        """Parameters: BACKBONE and TASK_STORE (as the ``pets`` model's), ADMIN_TOKEN_FILE,
        MAX_UPLOAD_MB (default 512), TRIAL_LOAD (default 1)."""
        store = Path(params.get("TASK_STORE", "tasks"))
        store = store if store.is_absolute() else model_dir / store
        try:
            max_mb = int(params.get("MAX_UPLOAD_MB", "512"))
            trial = int(params.get("TRIAL_LOAD", "1"))
        except ValueError as exc:
            raise ConfigError(f"MAX_UPLOAD_MB / TRIAL_LOAD must be integers: {exc}") from None
        weights = load_backbone(resolve_checkpoint(params.get("BACKBONE", "default"), model_dir))
        return cls(
            store,
            scratch_registry(weights),
            load_token(params, model_dir, env),
            max_mb << 20,
            bool(trial),
        )

    @property
    def fingerprint(self) -> str:
        return self.registry.ctx.spec.fingerprint

    # ------------------------------------------------------------------------------ entry
    def handle(
        self,
        token: bytes | None,
        action: bytes | str | None,
        name: bytes | None = None,
        manifest: bytes | None = None,
        weights: bytes | None = None,
    ) -> dict[str, Any]:
        """Serve one admin request; raises :class:`AdminError` (never echoes the token)."""
        self._check_token(token)
        act = _text(action, "ACTION")
        if act not in ACTIONS:
            raise AdminError(f"ACTION {act[:40]!r} is unknown; use one of {', '.join(ACTIONS)}")
        if act == "list":
            return self.list()
        task = None if name is None or name == b"" else self._name(name)
        if act == "status":
            return self.status(task)
        if task is None:
            raise AdminError(f"ACTION {act} needs NAME (the task name)")
        if act == "unregister":
            return self.unregister(task)
        return self.publish(task, manifest, weights, create=act == "register")

    def _check_token(self, token: bytes | None) -> None:
        if self._token is None:
            raise AdminError(
                f"the admin API is disabled: no token is configured; set "
                f"{TOKEN_ENV} in tritonserver's environment or the "
                "ADMIN_TOKEN_FILE parameter of pets_admin",
                "UNAVAILABLE",
            )
        given = token if isinstance(token, bytes) else b""
        if not hmac.compare_digest(given, self._token.encode()):
            raise AdminError(
                "wrong or missing admin token (input TOKEN); send the token the "
                f"server was started with ({TOKEN_ENV} / ADMIN_TOKEN_FILE)"
            )

    @staticmethod
    def _name(raw: bytes) -> str:
        try:
            return check_name(_text(raw, "NAME"))
        except TaskError as exc:
            raise AdminError(str(exc)) from None

    # ------------------------------------------------------------------------------ actions
    def publish(
        self, name: str, manifest: bytes | None, weights: bytes | None, create: bool
    ) -> dict[str, Any]:
        """Validate completely, then publish atomically (register: new; update: existing)."""
        act = "register" if create else "update"
        if not manifest or not weights:
            raise AdminError(f"ACTION {act} needs MANIFEST (JSON) and WEIGHTS (safetensors bytes)")
        m = self._manifest(name, manifest)
        if len(weights) > self.max_upload_bytes:
            raise AdminError(
                f"WEIGHTS is {len(weights)} bytes, over MAX_UPLOAD_MB="
                f"{self.max_upload_bytes >> 20}; raise it in pets_admin's config or "
                "copy the task into the store with `pets create --weights`"
            )
        try:
            tensors = weights_from_bytes(weights)
            if self.trial_load:  # add() validates, then loads; give the scratch slots back
                self.registry.add(m, tensors)
                self.registry.remove(m.name)
            else:
                self.registry.validate(m, tensors)
        except TaskError as exc:
            raise AdminError(f"task {name!r} refused, the store is unchanged: {exc}") from None
        with self._locked():
            exists = os.path.lexists(self.store / name)
            if create and exists:
                raise AdminError(
                    f"task {name!r} already exists; use ACTION update to replace it",
                    "ALREADY_EXISTS",
                )
            if not create and not exists:
                raise AdminError(f"task {name!r} does not exist; use ACTION register", "NOT_FOUND")
            write_task(self.store, m, tensors)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return {
            "ok": True,
            "action": act,
            "name": name,
            "pet": m.pet_type,
            "version": m.version,
            "tensors": len(tensors),
            "bytes": nbytes,
        }

    def unregister(self, name: str) -> dict[str, Any]:
        with self._locked():
            try:
                delete_task(self.store, name)
            except TaskError:
                raise AdminError(
                    f"task {name!r} does not exist; ACTION list shows the registered tasks",
                    "NOT_FOUND",
                ) from None
        return {"ok": True, "action": "unregister", "name": name}

    def list(self) -> dict[str, Any]:
        tasks = []
        for name in list_tasks(self.store):
            try:
                m = self._read_manifest(name)
                tasks.append(
                    {
                        "name": name,
                        "pet": m.pet_type,
                        "version": m.version,
                        "head": m.head.to_json(),
                    }
                )
            except (TaskError, OSError, ValueError) as exc:
                tasks.append({"name": name, "pet": "INVALID", "error": str(exc)})
        return {"ok": True, "backbone": self.fingerprint, "tasks": tasks}

    def status(self, name: str | None) -> dict[str, Any]:
        if name is None:
            return {
                "ok": True,
                "backbone": self.fingerprint,
                "tasks": len(list_tasks(self.store)),
                "max_upload_bytes": self.max_upload_bytes,
            }
        folder = self.store / name
        if not os.path.lexists(folder):
            raise AdminError(f"task {name!r} does not exist", "NOT_FOUND")
        try:
            m = self._read_manifest(name)
            size = os.lstat(folder / WEIGHTS).st_size
        except (TaskError, OSError, ValueError) as exc:
            raise AdminError(
                f"task {name!r} is unreadable in the store: {exc}", "INTERNAL"
            ) from None
        return {"ok": True, "name": name, "manifest": m.to_json(), "weights_bytes": size}

    # ------------------------------------------------------------------------------ helpers
    def _manifest(self, name: str, raw: bytes) -> TaskManifest:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise AdminError(f"MANIFEST is {len(raw)} bytes, over {MAX_MANIFEST_BYTES}")
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdminError(f"MANIFEST is not valid JSON: {exc}") from None
        if isinstance(obj, dict):
            obj.setdefault("name", name)
            obj.setdefault("format_version", 1)
        try:
            m = TaskManifest.from_json(obj)
        except TaskError as exc:
            raise AdminError(f"MANIFEST refused: {exc}") from None
        if m.name != name:
            raise AdminError(
                f"MANIFEST names task {m.name!r} but NAME is {name!r}; make them equal"
            )
        return m

    def _read_manifest(self, name: str) -> TaskManifest:
        return read_manifest(self.store / name)  # no links followed (taskstore)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise check-then-write against other admin instances on the same store."""
        self.store.mkdir(parents=True, exist_ok=True)
        with (self.store / ".admin.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _text(raw: bytes | str | None, what: str) -> str:
    if raw is None:
        raise AdminError(f"input {what} is missing")
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AdminError(f"input {what} is not UTF-8 text") from None


def safetensors_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise tensors for the WEIGHTS input (client side helper)."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})
