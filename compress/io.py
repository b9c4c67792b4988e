"""Atomic writes and content hashes.

Every artifact is written to a temporary file in the destination folder and renamed into place, so an
interrupted run never leaves a half-written file that looks whole; a rename within one file system is atomic.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError
from runtimes.base import sha256_file  # noqa: F401  (one hasher for artifacts, engines and bundles)

LOCK_NAME = ".lock"  # in a run or training directory: held (flock) by the process working in it


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure remove it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are for sharing and deploying
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError:
        raise
    except Exception as e:
        cause = _os_error(e, path)
        if cause is None:
            raise
        raise cause from e  # a full disk is a full disk, whichever library was writing
    finally:
        tmp_path.unlink(missing_ok=True)


def _os_error(error: BaseException, path: Path) -> OSError | None:
    """The operating-system error behind a writer's own exception: torch chains it, safetensors (Rust) names it
    as "(os error N)" in its message; None when there is none."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError):
            return OSError(seen.errno, seen.strerror, str(path))
        seen = seen.__cause__ or seen.__context__
    match = re.search(r"\(os error (\d+)\)", str(error))
    if match:
        number = int(match.group(1))
        return OSError(number, os.strerror(number), str(path))
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
