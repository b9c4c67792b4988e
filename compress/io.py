"""Atomic writes, content hashes and the run directory's lock.

Every artifact is written through ``runtimes.files.atomic_path`` (a temporary file in the destination folder,
renamed into place), so an interrupted run never leaves a half-written file that looks whole; the helpers here
are conveniences on it for text, JSON and torch objects.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError
from runtimes.files import atomic_path, sha256_file  # noqa: F401  (one atomic writer and one hasher for all)

LOCK_NAME = ".lock"  # in a run or training directory: held (flock) by the process working in it


def atomic_write(path: Path, writer: Callable[[Path], Any]) -> Path:
    with atomic_path(path) as tmp:
        writer(tmp)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # through a Python file, so a full disk surfaces as the OSError it is
            torch.save(obj, f)

    return atomic_write(path, write)


def torch_load_weights(path: Path) -> Any:
    """``torch.load`` of ``path`` onto the CPU with the weights-only unpickler (no code runs), without torch's
    warnings: garbage after a pickle's first byte reads to it as an unknown protocol, and the caller's one-line
    error says what the file is instead. Raises what ``torch.load`` raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or an empty dict when there is no such file (a marker not written yet)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def exclusive(directory: Path, *, what: str) -> Iterator[None]:
    """Hold ``directory`` for this process: an OS lock (``flock``) on ``directory/.lock``, released on exit or
    when the process dies (even by SIGKILL), so no stale lock outlives its holder.

    A second process gets an ``InputError`` naming the PID that holds it, before it has touched anything.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise InputError(f"cannot write the run directory {directory}: {e.strerror}; choose a writable --out with free "
                         "space") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise InputError(f"{directory} is in use by another {what} (PID {holder}); wait for it to finish, or choose "
                         "another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock; the file stays, empty of meaning once nobody holds it
