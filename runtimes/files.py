"""Files written whole or not at all, and their content hashes: the one helper every package writes through.

``atomic_path`` yields a temporary name beside the destination and renames it into place only when the writer
finished; a rename within one file system is atomic, so an interrupted run never leaves a half-written file that
looks whole. It lives in the ``runtimes`` leaf because engines are written here, and ``export`` and ``compress``
import it from here (the leaves never import ``compress``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure remove it.

    The file gets the permissions of a normally created one (``mkstemp`` makes 0600; artifacts are for sharing
    and deploying). A writer's own exception that hides a full disk or a read-only folder is re-raised as the
    ``OSError`` it is, naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
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


def write_bytes_atomic(path: Path, data) -> Path:
    """``data`` (bytes, or anything with the buffer protocol: a serialized engine) into ``path``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(memoryview(data))
    return path


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (artifacts, engines and bundle files are hashed the same way)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
