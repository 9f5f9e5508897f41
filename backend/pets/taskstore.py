"""The task store: a directory with one folder per task.

Layout::

    <store>/<name>/manifest.json        # see TaskManifest
    <store>/<name>/weights.safetensors  # tensors named as in docs/task-store.md

Writers publish atomically: a task is written into a hidden temp folder beside its final
place and renamed into it (an update swaps folders with two renames), so readers never see
a half-written task. Only ``safetensors`` is read; nothing is ever unpickled.

Nothing inside the store is opened through a symbolic link: a task folder must be a real
directory and its two files regular files (``O_NOFOLLOW`` opens relative to the folder's own
descriptor, so a link swapped in between the check and the open is refused too). A link is
listed like any other entry and refused with its reason, so it is visible rather than
silently skipped. The store's own path (``TASK_STORE``) may be a link: the operator chose it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from .errors import LIBRARY_MESSAGE_LIMIT, TaskError, clip, short
from .heads import HeadConfig

FORMAT_VERSION = 1
MANIFEST, WEIGHTS = "manifest.json", "weights.safetensors"
MAX_NAME_LEN = 128  # characters of a task name
NAME_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.\-]{{0,{MAX_NAME_LEN - 1}}}$")
MAX_MANIFEST_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 4 << 30


def check_name(name: Any) -> str:
    """Return ``name`` if it is a valid task name, else raise :class:`TaskError`."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise TaskError(
            f"invalid task name {short(name)}: use 1-{MAX_NAME_LEN} letters, digits, '_', '-' "
            "or '.', starting with a letter or digit, without '..'"
        )
    return name


@dataclass
class TaskManifest:
    name: str
    pet_type: str
    hparams: dict[str, Any]
    head: HeadConfig
    backbone_fingerprint: str
    version: int = 1
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "pet": {"type": self.pet_type, **self.hparams},
            "head": self.head.to_json(),
            "backbone": {"fingerprint": self.backbone_fingerprint},
            "version": self.version,
            "created": self.created,
        }

    @staticmethod
    def from_json(obj: Any) -> TaskManifest:
        if not isinstance(obj, dict):
            raise TaskError(f"manifest must be a JSON object, got {type(obj).__name__}")
        if obj.get("format_version") != FORMAT_VERSION:
            raise TaskError(
                f"manifest format_version {short(obj.get('format_version'))}; this server "
                f"reads version {FORMAT_VERSION}"
            )
        pet = obj.get("pet")
        if not isinstance(pet, dict) or not isinstance(pet.get("type"), str):
            raise TaskError("manifest needs 'pet': {'type': <pet type>, ...hyper-parameters}")
        backbone = obj.get("backbone")
        if not isinstance(backbone, dict) or not isinstance(backbone.get("fingerprint"), str):
            raise TaskError("manifest needs 'backbone': {'fingerprint': <backbone fingerprint>}")
        version = obj.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool):
            raise TaskError(f"manifest version must be an integer, got {short(version)}")
        created = obj.get("created", 0.0)
        if (
            not isinstance(created, (int, float))
            or isinstance(created, bool)
            or not math.isfinite(created)
        ):
            raise TaskError(f"manifest created must be a Unix time (seconds), got {short(created)}")
        hparams = {k: v for k, v in pet.items() if k != "type"}
        return TaskManifest(
            name=check_name(obj.get("name")),
            pet_type=pet["type"],
            hparams=hparams,
            head=HeadConfig.parse(obj.get("head")),
            backbone_fingerprint=backbone["fingerprint"],
            version=version,
            created=float(created),
        )


def read_task(folder: Path) -> tuple[TaskManifest, dict[str, torch.Tensor]]:
    """Read and structurally check one task folder (PET-specific checks come later).

    Opens nothing through a symbolic link (see the module docstring)."""
    dfd = _open_folder(folder)
    try:
        manifest = _manifest_at(dfd, folder)
        wfd = _open_file(dfd, folder, WEIGHTS)
        try:
            return manifest, _read_weights_fd(wfd, str(folder / WEIGHTS))
        finally:
            os.close(wfd)
    finally:
        os.close(dfd)


def read_manifest(folder: Path) -> TaskManifest:
    """Only the manifest of a task folder (same checks and no-link rule as :func:`read_task`)."""
    dfd = _open_folder(folder)
    try:
        return _manifest_at(dfd, folder)
    finally:
        os.close(dfd)


def _manifest_at(dfd: int, folder: Path) -> TaskManifest:
    mfd = _open_file(dfd, folder, MANIFEST)
    try:
        if os.fstat(mfd).st_size > MAX_MANIFEST_BYTES:
            raise TaskError(f"{folder / MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
        with os.fdopen(mfd, "rb", closefd=False) as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(mfd)
    try:
        manifest = TaskManifest.from_json(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TaskError(f"{folder / MANIFEST} is not valid JSON: {exc}") from exc
    if manifest.name != folder.name:
        raise TaskError(f"manifest name {manifest.name!r} differs from its folder {folder.name!r}")
    return manifest


def _open_folder(folder: Path) -> int:
    """A descriptor of ``folder``, which must be a real directory (not a link to one)."""
    try:
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if folder.is_symlink():
            raise TaskError(
                f"task folder {folder} is a symbolic link; the store opens nothing through a "
                "link: move or copy the task's folder into the store"
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise TaskError(
                f"{folder} is not a folder; a task is a folder with {MANIFEST} and {WEIGHTS}"
            ) from None
        raise TaskError(f"task folder {folder} cannot be opened: {exc.strerror}") from None


def _open_file(dfd: int, folder: Path, name: str) -> int:
    """Open ``folder/name`` relative to the folder's descriptor; a regular file, no link."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
    except FileNotFoundError:
        raise TaskError(f"task folder {folder} needs {MANIFEST} and {WEIGHTS}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TaskError(
                f"{folder / name} is a symbolic link; the store opens nothing through a "
                "link: copy the file itself into the task folder"
            ) from None
        raise TaskError(f"{folder / name} cannot be opened: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TaskError(f"{folder / name} is not a regular file")
    return fd


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking its declared header against the file size.

    For files an operator names (``pets create --weights``, importers): links are followed.
    Task folders in a store are read by :func:`read_task`, which follows none."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _read_weights_fd(fd, str(path))
    finally:
        os.close(fd)


def _read_weights_fd(fd: int, where: str) -> dict[str, torch.Tensor]:
    """Check and load the safetensors file open as ``fd`` (``where`` names it in errors)."""
    size = os.fstat(fd).st_size

    def read(n: int) -> bytes:
        return os.read(fd, n)

    os.lseek(fd, 0, os.SEEK_SET)
    _check_layout(where, size, os.read(fd, 8), read)
    proc = f"/proc/self/fd/{fd}"  # the very file open as fd (Linux), mapped, not copied
    try:
        if os.path.exists(proc):
            with safe_open(proc, framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return safetensors_load(fh.read())
    except Exception as exc:  # safetensors raises several types for corrupt data
        raise TaskError(
            f"{where} could not be read as safetensors: {clip(str(exc), LIBRARY_MESSAGE_LIMIT)}"
        ) from exc


def weights_from_bytes(data: bytes, where: str = "WEIGHTS") -> dict[str, torch.Tensor]:
    """Parse safetensors bytes (e.g. uploaded through the admin model) with the same checks
    as :func:`read_weights`; ``where`` names the source in error messages."""
    view = memoryview(data)
    pos = 8

    def read(n: int) -> bytes:
        nonlocal pos
        pos += n
        return bytes(view[pos - n : pos])

    _check_layout(where, len(data), bytes(view[:8]), read)
    try:
        return safetensors_load(bytes(data))
    except Exception as exc:  # safetensors raises several types for corrupt data
        raise TaskError(
            f"{where} could not be read as safetensors: {clip(str(exc), LIBRARY_MESSAGE_LIMIT)}"
        ) from exc


def _check_layout(where: str, size: int, head: bytes, read: Callable[[int], bytes]) -> None:
    """Check a safetensors header (``head`` = its first 8 bytes) against the total size."""
    if size > MAX_WEIGHTS_BYTES:
        raise TaskError(f"{where} is {size} bytes, over the {MAX_WEIGHTS_BYTES}-byte task limit")
    if len(head) < 8:
        raise TaskError(f"{where} is truncated ({size} bytes): not a safetensors file")
    header_len = int.from_bytes(head, "little")
    if header_len > min(size - 8, 100 << 20):
        raise TaskError(
            f"{where} declares a {header_len}-byte header in a {size}-byte file: "
            "not a safetensors file (pickle checkpoints are never loaded)"
        )
    try:
        header = json.loads(read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TaskError(f"{where} has a corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise TaskError(f"{where} has a corrupt safetensors header: expected a JSON object")
    try:
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise TaskError(f"{where} has a corrupt safetensors header: {exc!r}") from exc
    if 8 + header_len + end != size:
        raise TaskError(
            f"{where} is truncated or padded: header describes "
            f"{8 + header_len + end} bytes, file has {size}"
        )


def write_task(store: Path, manifest: TaskManifest, tensors: dict[str, torch.Tensor]) -> Path:
    """Publish a task atomically (create or replace). Returns its folder."""
    name = check_name(manifest.name)
    store.mkdir(parents=True, exist_ok=True)
    final = store / name
    tmp = store / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
        _stamp(tmp / MANIFEST)
        if os.path.lexists(final):
            old = store / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            if old.is_symlink():  # a link replaced by a real task: never follow it
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _touch_generation(store)
    return final


def delete_task(store: Path, name: str) -> None:
    """Remove a task atomically (rename away, then delete)."""
    folder = store / check_name(name)
    if not os.path.lexists(folder):
        raise TaskError(f"no task {name!r} in {store}")
    gone = store / f".del-{name}-{uuid.uuid4().hex[:8]}"
    os.rename(folder, gone)
    if gone.is_symlink():  # the link goes, never what it points at
        gone.unlink()
    else:
        shutil.rmtree(gone, ignore_errors=True)
    _touch_generation(store)


def list_tasks(store: Path) -> list[str]:
    """Names of the store's task entries: every entry not starting with ``.`` (the writers'
    temporary folders) that is a folder or a symbolic link. Links and folders without a
    manifest are listed so that readers refuse them visibly (:func:`read_task`)."""
    if not store.is_dir():
        return []
    out = []
    for p in store.iterdir():
        if p.name.startswith("."):
            continue
        try:
            mode = os.lstat(p).st_mode
        except FileNotFoundError:  # removed while listing
            continue
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            out.append(p.name)
    return sorted(out)


def entry_mtime(store: Path, name: str) -> int:
    """The change stamp of entry ``name``: its manifest's mtime (ns), or, for an entry
    without a readable manifest (a link, a bare folder), the entry's own; links are never
    followed. Raises FileNotFoundError when the entry is gone."""
    folder = store / name
    if not folder.is_symlink():
        try:
            return os.lstat(folder / MANIFEST).st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            pass
    return os.lstat(folder).st_mtime_ns


def store_state(store: Path) -> dict[str, int]:
    """name -> :func:`entry_mtime`: a cheap snapshot to detect changes."""
    out = {}
    for name in list_tasks(store):
        try:
            out[name] = entry_mtime(store, name)
        except FileNotFoundError:  # removed between listing and stat
            continue
    return out


def _touch_generation(store: Path) -> None:
    gen = store / ".generation"
    tmp = store / f".generation-{uuid.uuid4().hex[:8]}"
    tmp.write_text(f"{time.time_ns()}\n")
    _stamp(tmp)
    os.replace(tmp, gen)


def _stamp(path: Path) -> None:
    """Give ``path`` a full-precision, practically unique mtime.

    Readers detect changes by mtime (``store_state``, ``.generation``); file systems stamp
    with a coarse clock (one tick is 1-10 ms on many kernels), so two writes in one tick
    would otherwise look identical and the second change would be missed.
    """
    now = time.time_ns()
    os.utime(path, ns=(now, now))
