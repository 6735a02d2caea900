"""Files and folders written whole: under a temporary name of their own, synced, then renamed into place.

Several servers may share a model store and an engine cache, and write the same file at the same
moment (an engine's manifest, the weights-fingerprint cache, TensorRT's timing cache). A fixed
temporary name would let one rename the other's half-written file away; a unique one leaves every
reader a complete file, whichever writer lands last. The file is synced before the rename and the
folder after it, so a crash leaves the old file or the new one, never an empty one. Temporary names
start with ``.partial-``; ``sweep_partials`` removes the ones an interrupted writer left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

PARTIAL_PREFIX = ".partial-"
# A leftover is only swept once nobody can still be writing it: builds take minutes, not hours.
STALE_PARTIAL_SECONDS = 6 * 3600


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the file system allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (by any means, e.g. a library's ``save``); when the block ends
    without an error it is synced and renamed onto ``path``, otherwise removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{PARTIAL_PREFIX}{path.name[:60]}-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp creates it owner-only
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` in one rename; nothing is left behind if anything fails."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` (UTF-8) to ``path`` in one rename; nothing is left behind if anything fails."""
    write_bytes_atomic(path, text.encode("utf-8"), mode)


_RENAME_EXCHANGE = 2  # renameat2(2)'s flag: swap two names atomically (Linux 3.15+)
_AT_FDCWD = -100


def replace_folder(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target``, replacing a folder there without a moment in which ``target`` is missing:
    the two are exchanged atomically where the kernel can (renameat2), else the old one is moved aside first. The
    old folder is removed afterwards."""
    if not target.exists():
        new.rename(target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now names the old folder
    else:
        aside = target.with_name(f"{PARTIAL_PREFIX}old-{target.name[:60]}-{os.getpid()}-{time.monotonic_ns()}")
        target.rename(aside)
        new.rename(target)
        shutil.rmtree(aside, ignore_errors=True)
    fsync_folder(target.parent)


def _exchange(first: Path, second: Path) -> bool:
    library = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(library, use_errno=True), "renameat2", None) if library else None
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # a file system or kernel without the exchange: the fallback
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(second))


def sweep_partials(root: Path, older_than: float = STALE_PARTIAL_SECONDS) -> int:
    """Remove ``.partial-*`` files and folders under ``root`` untouched for ``older_than`` seconds (writers that
    were killed); returns how many were removed."""
    if not root.is_dir():
        return 0
    cutoff, removed = time.time() - older_than, 0
    for path in root.rglob(f"{PARTIAL_PREFIX}*"):
        try:
            if path.lstat().st_mtime > cutoff:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
        except OSError:
            continue
    return removed
