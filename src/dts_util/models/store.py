"""The model store: one folder that every client path is relative to.

Three promises live here:

- Paths from clients never escape the store's root, are bounded in length, and
  never name the server's own temporary files (anything starting ``.dts-``).
- Uploads go to a temporary file next to their target (a short name derived from
  a hash, so a legal 255-byte target name works) and are renamed into place only
  after the client finished the stream and the bytes checked out. A failed or
  cancelled upload leaves nothing behind, folders it created included, and never
  replaces an existing file.
- Uploads are bounded: per file, per store (quota), by a free-disk floor, and in
  how many run at once.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from dts_util.atomic_files import fsync_folder
from dts_util.client_text import quote
from dts_util.errors import (FileExists, InvalidPath, ModelLoadError, ModelNotFound, PathConflict, StartupError,
                             StoreFull, UploadCorrupt, UploadTooLarge)
from dts_util.limits import (DEFAULT_MAX_CONCURRENT_UPLOADS, DEFAULT_MAX_STORE_BYTES, DEFAULT_MAX_UPLOAD_BYTES,
                             DEFAULT_MIN_FREE_DISK_BYTES, MAX_PATH_CHARS, MAX_PATH_COMPONENT_BYTES)

log = logging.getLogger(__name__)

# No client path may have a component starting with this: the server's temporary files do.
RESERVED_PREFIX = ".dts-"
TEMP_PREFIX = RESERVED_PREFIX + "upload-"
MODEL_INDEX = "model_index.json"


def _has_control_characters(text: str) -> bool:
    return any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)


def prepare_store_folder(root: Path, create_parents: bool) -> Path:
    """Check (and if needed create) the store folder; a clear ``StartupError`` when it cannot be used.

    A mistyped ``--model-path`` must not silently become a new, empty store, so a
    missing folder is created only when its parent exists (or for the default
    location, which is ours to create).
    """
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise StartupError(f"model store {root} is a file, not a folder; point --model-path at a folder")
    if not root.exists():
        if not create_parents and not root.parent.is_dir():
            raise StartupError(f"model store {root} does not exist and neither does its parent folder; "
                               "check --model-path (a missing store is created only inside an existing folder)")
        try:
            root.mkdir(parents=create_parents, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create model store {root}: {exc.strerror}") from exc
        log.info("created model store %s", root)
    return root.resolve()


@dataclass(frozen=True)
class UploadPolicy:
    """Bounds on uploads.

    Args:
        max_file_bytes: the largest file one upload may write.
        max_store_bytes: total size of the store after an upload (0 = no quota).
        min_free_bytes: free disk space that must remain after an upload.
        max_concurrent: uploads that may run at once.
    """

    max_file_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_store_bytes: int = DEFAULT_MAX_STORE_BYTES
    min_free_bytes: int = DEFAULT_MIN_FREE_DISK_BYTES
    max_concurrent: int = DEFAULT_MAX_CONCURRENT_UPLOADS


class ModelStore:
    """A folder of models and uploaded files.

    Args:
        root: the folder; created (with its parents) if missing. The CLI checks a
            user-given folder first with ``prepare_store_folder``.
        policy: bounds on uploads.
    """

    def __init__(self, root: Path, policy: UploadPolicy | None = None) -> None:
        self.root = prepare_store_folder(Path(root), create_parents=True)
        self.policy = policy or UploadPolicy()
        self._lock = threading.Lock()
        self._active_uploads = 0
        self._inflight_bytes = 0

    # -- paths -------------------------------------------------------------------------------

    def resolve(self, name: str) -> Path:
        """Map a client path to a real path inside the store, or raise InvalidPath.

        Rejects empty, over-long, absolute and reserved names, control characters,
        any '..' component, and anything that resolves (symlinks too) outside the root.
        """
        if len(name) > MAX_PATH_CHARS:
            raise InvalidPath(f"file name {quote(name)} is too long; send at most {MAX_PATH_CHARS} characters")
        if not name or not name.strip():
            raise InvalidPath("file name is empty; give a path relative to the model store")
        if _has_control_characters(name):
            raise InvalidPath(f"file name {quote(name)} contains control characters (NUL, newline, ...)")
        posix = PurePosixPath(name.replace("\\", "/"))
        if posix.is_absolute() or (len(name) > 1 and name[1] == ":"):
            raise InvalidPath(f"file name {quote(name)} is absolute; give a path relative to the model store")
        if ".." in posix.parts:
            raise InvalidPath(f"file name {quote(name)} contains '..'; paths must stay inside the model store")
        for part in posix.parts:
            if len(part.encode("utf-8", "surrogatepass")) > MAX_PATH_COMPONENT_BYTES:
                raise InvalidPath(f"file name {quote(name)} has a component longer than "
                                  f"{MAX_PATH_COMPONENT_BYTES} bytes")
            if part.startswith(RESERVED_PREFIX):
                raise InvalidPath(f"file name {quote(name)}: names starting with {RESERVED_PREFIX!r} are "
                                  "reserved for the server's temporary files")
        try:
            path = (self.root / posix).resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
            raise InvalidPath(f"file name {quote(name)} cannot be resolved (a symlink loop?)") from exc
        if path != self.root and self.root not in path.parents:
            raise InvalidPath(f"file name {quote(name)} resolves outside the model store")
        if path == self.root:
            raise InvalidPath(f"file name {quote(name)} names the model store itself, not a file in it")
        return path

    def relative(self, path: Path) -> str:
        """``path`` as clients name it: relative to the store, never the server's absolute path."""
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return Path(path).name

    def exists(self, name: str) -> bool:
        """Whether ``name`` (validated as in resolve) is a file or folder in the store."""
        path = self.resolve(name)
        try:
            path.stat()
        except FileNotFoundError:
            return False
        except OSError as exc:  # ENOTDIR (a parent is a file), ELOOP, EACCES: it is not there for the client
            if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG):
                return False
            raise
        return True

    # -- models ------------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """Models GenerateImage can serve: folders in the diffusers layout (with model_index.json), and
        single-file checkpoints anywhere outside them, named by their path in the store."""
        from dts_util.models.checkpoint import CHECKPOINT_SUFFIXES, looks_like_checkpoint

        folders, files = [], []
        for folder, dirs, names in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            relative = Path(folder).relative_to(self.root)
            if MODEL_INDEX in names:
                folders.append(relative.as_posix())
                dirs[:] = []  # a diffusers folder's weight files are its parts, not models
                continue
            files += [Path(folder, n) for n in names if n.endswith(CHECKPOINT_SUFFIXES) and not n.startswith(".")]
        files = [f for f in files if looks_like_checkpoint(f)]
        return sorted(folders + [f.relative_to(self.root).as_posix() for f in files])

    def model_path(self, name: str) -> Path | None:
        """The folder (or checkpoint file) of model ``name`` if it is one, else None."""
        from dts_util.models.checkpoint import CHECKPOINT_SUFFIXES, looks_like_checkpoint

        path = self.resolve(name)
        if path.is_file() and path.name.endswith(CHECKPOINT_SUFFIXES) and looks_like_checkpoint(path):
            return path
        return path if (path / MODEL_INDEX).is_file() else None

    def canonical_model(self, name: str) -> tuple[str, Path]:
        """(canonical name, folder) of model ``name``, or ModelNotFound naming the models that are there.

        Every spelling of one folder (``m/.``, ``./m``, ``m\\``, a symlink to it) gets
        one canonical name, so a model is loaded once whatever a client calls it.
        """
        path = self.model_path(name)
        if path is None:
            available = ", ".join(self.model_names()) or "none"
            raise ModelNotFound(f"model {quote(name)} is not in the model store; available models: {available}")
        return self.relative(path), path

    def require_model(self, name: str) -> Path:
        """The folder of model ``name``, or ModelNotFound naming the models that are there."""
        return self.canonical_model(name)[1]

    # -- uploads -----------------------------------------------------------------------------

    def open_upload(self, name: str, overwrite: bool = False, declared_size: int = 0) -> "Upload":
        """Start an upload of ``name``; refuses at once what cannot succeed (too big, exists, store full)."""
        target = self.resolve(name)
        if target.is_dir():
            raise PathConflict(f"{quote(name)} is a folder in the model store; upload to a file name")
        if declared_size and not overwrite and target.is_file() and target.stat().st_size != declared_size:
            raise FileExists(_exists_message(name))
        if declared_size:
            self._check_file_size(name, declared_size)
        with self._lock:
            if self._active_uploads >= self.policy.max_concurrent:
                raise StoreFull(f"{self._active_uploads} uploads are already running (limit "
                                f"{self.policy.max_concurrent}, `serve --max-concurrent-uploads`); retry later")
            self._active_uploads += 1
        try:
            used = self._used_bytes() if self.policy.max_store_bytes else 0
            upload = Upload(self, name, target, overwrite, used)
            if declared_size:
                upload.check_room(declared_size)
            return upload
        except BaseException:
            with self._lock:
                self._active_uploads -= 1
            raise

    def _check_file_size(self, name: str, size: int) -> None:
        if size > self.policy.max_file_bytes:
            raise UploadTooLarge(f"upload {quote(name)} is over the server's limit of {self.policy.max_file_bytes} "
                                 "bytes per file; raise it with `dts-util serve --max-upload-bytes`")

    def _used_bytes(self) -> int:
        total = 0
        for folder, _, files in os.walk(self.root):
            for file in files:
                try:
                    total += os.lstat(os.path.join(folder, file)).st_size
                except OSError:
                    pass
        return total

    def _account(self, written: int) -> int:
        """Add ``written`` bytes to the in-flight total of all uploads; returns the new total."""
        with self._lock:
            self._inflight_bytes += written
            return self._inflight_bytes

    def _release(self, upload: "Upload") -> None:
        with self._lock:
            self._inflight_bytes -= upload.size
            self._active_uploads -= 1

    def sweep_temporary_files(self) -> int:
        """Remove what uploads (and built-in model writes) that died with an earlier server left; returns how many.

        An upload in progress holds a lock on its file, so a second server sharing
        this store never removes the live uploads of another.
        """
        removed = 0
        for folder, dirs, files in os.walk(self.root):
            for name in [d for d in dirs if d.startswith(RESERVED_PREFIX)]:
                dirs.remove(name)  # never descend into a temporary folder: remove it whole
                removed += _remove_abandoned_folder(Path(folder, name))
            removed += sum(_remove_unlocked(Path(folder, f)) for f in files if f.startswith(RESERVED_PREFIX))
        if removed:
            log.info("removed %d temporary file(s) of interrupted uploads from the model store", removed)
        return removed


def publish_folder(target: Path, fill: Callable[[Path], None],
                   complete: Callable[[Path], bool] = Path.is_dir) -> Path:
    """``target``, built by ``fill`` in a temporary folder beside it and renamed into place whole.

    Readers never see a half-written folder, an interrupted build leaves nothing under the
    target's name, and when two processes build it at once the loser's copy is discarded.
    ``complete`` says whether an existing ``target`` is finished (then nothing is built).
    """
    if complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{RESERVED_PREFIX}{target.name[:40]}-", dir=target.parent))
    # A lock on a file opened for writing (NFS grants exclusive locks on nothing else) tells another
    # server sweeping a shared store that this folder is alive.
    lock = os.open(tmp / BUILD_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fill(tmp)
        (tmp / BUILD_LOCK_FILE).unlink()  # not part of what is published (the grace covers the rename)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the folder is an ordinary one
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if complete(target):  # another process won the race
            return target
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    return target


def _exists_message(name: str) -> str:
    return (f"{quote(name)} already exists in the model store with different contents; "
            "send overwrite=true (`dts-util upload --overwrite`) to replace it")


# A temporary folder this young may be between its creation and its lock, or just past its lock
# file's removal before the rename: left alone.
_FOLDER_LOCK_GRACE_S = 60.0
BUILD_LOCK_FILE = f"{RESERVED_PREFIX}building.lock"


def _remove_abandoned_folder(path: Path) -> bool:
    """Remove a temporary folder unless a live process (holding its lock file) is still filling it."""
    try:
        if time.time() - path.stat().st_mtime < _FOLDER_LOCK_GRACE_S:
            return False
    except OSError:
        return False
    if not _lock_is_free(path / BUILD_LOCK_FILE):
        return False  # another server sharing this store is building it (or we cannot tell)
    shutil.rmtree(path, ignore_errors=True)
    return True


def _lock_is_free(path: Path) -> bool:
    """True when ``path`` is missing or no process holds a lock on it; False when one does or the file
    system cannot say. Opened for writing: NFS grants exclusive locks on nothing else."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _remove_unlocked(path: Path) -> bool:
    if not path.exists() or not _lock_is_free(path):
        return False  # a live upload holds it
    path.unlink(missing_ok=True)
    return True


class Upload:
    """One file being written: ``write`` chunks, then ``finish`` + ``publish``, or ``abort``.

    Nothing appears at the target path until ``publish``; an existing file is
    replaced only with ``overwrite``, and then atomically; without it, a file that appears
    between ``finish`` and ``publish`` (another upload's) is never replaced. ``finish`` does the slow
    part (checks, fsync, comparing with an existing file) so that ``publish`` is a
    single rename the caller can run right after its last check that the client is
    still there.
    """

    def __init__(self, store: ModelStore, name: str, target: Path, overwrite: bool, used_bytes: int) -> None:
        self.store, self.name, self.target, self.overwrite = store, name, target, overwrite
        self.size = 0
        self.unchanged = False  # an identical file was already there: nothing to publish
        self._used_at_start = used_bytes
        self._created = _make_parents(store, name, target.parent)
        token = hashlib.sha256(f"{name}\0{secrets.token_hex(16)}".encode("utf-8", "surrogatepass")).hexdigest()
        self._tmp = target.parent / f"{TEMP_PREFIX}{token[:20]}"
        try:
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError:
            self._remove_created_folders()
            raise
        fcntl.flock(fd, fcntl.LOCK_EX)  # tells a sweeping server sharing this store that we are alive
        self._file = os.fdopen(fd, "wb")
        self._sha = hashlib.sha256()
        self._closed = False

    def check_room(self, extra: int) -> None:
        """Refuse when ``extra`` more bytes would pass the store quota or the free-disk floor."""
        policy = self.store.policy
        if policy.max_store_bytes:
            inflight = self.store._account(0)
            if self._used_at_start + inflight + extra > policy.max_store_bytes:
                raise StoreFull(f"upload {quote(self.name)} would take the model store over its quota of "
                                f"{policy.max_store_bytes} bytes (`serve --max-store-bytes`); delete files or "
                                "raise the quota")
        free = shutil.disk_usage(self._tmp.parent).free
        if free - extra < policy.min_free_bytes:
            raise StoreFull(f"upload {quote(self.name)} would leave less than {policy.min_free_bytes} bytes free on "
                            "the server's disk (`serve --min-free-disk`); free some space")

    def write(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self.store.policy.max_file_bytes:
            self.store._check_file_size(self.name, self.size + len(chunk))
        self.check_room(len(chunk))
        self._file.write(chunk)
        self._sha.update(chunk)
        self.size += len(chunk)
        self.store._account(len(chunk))

    def finish(self, expected_sha256: str = "", expected_size: int = 0) -> str:
        """Check the declared size and hash and make the bytes durable. Returns the SHA-256 hex.

        Raises FileExists when a different file is at the target and overwrite was
        not asked for; an identical file there sets ``unchanged`` (an idempotent re-upload).
        """
        digest = self._sha.hexdigest()
        if expected_size and expected_size != self.size:
            raise UploadCorrupt(f"upload {quote(self.name)}: received {self.size} bytes, "
                                f"but total_size said {expected_size}; nothing was kept")
        if expected_sha256 and expected_sha256.lower() != digest:
            raise UploadCorrupt(f"upload {quote(self.name)}: SHA-256 of the received bytes is {digest}, "
                                f"but sha256 said {quote(expected_sha256, 64)}; nothing was kept")
        self._file.flush()
        os.fsync(self._file.fileno())
        if not self.overwrite and self.target.is_file():
            if self.target.stat().st_size == self.size and _sha256_of(self.target) == digest:
                self.unchanged = True
            else:
                raise FileExists(_exists_message(self.name))
        return digest

    def commit(self, expected_sha256: str = "", expected_size: int = 0) -> str:
        """``finish`` then ``publish``, for callers with no client to check on in between."""
        digest = self.finish(expected_sha256, expected_size)
        self.publish()
        return digest

    def publish(self) -> None:
        """Put the file in place. Without overwrite it is linked under the target's name, which fails rather than
        replace a file another upload published since ``finish`` looked (FileExists, or ``unchanged`` when that file
        holds the same bytes); with overwrite it is renamed over the target, atomically. Call after ``finish``."""
        self._close()
        if not self.unchanged:
            os.chmod(self._tmp, 0o666 & ~_umask())  # stored files follow the umask, like any other
            if self.overwrite:
                os.replace(self._tmp, self.target)
            else:
                self._link_into_place()
            self._created = []
            fsync_folder(self.target.parent)
        self._tmp.unlink(missing_ok=True)
        self.store._release(self)

    def _link_into_place(self) -> None:
        """A hard link cannot replace an existing name: of two uploads racing for one new name exactly one wins."""
        try:
            os.link(self._tmp, self.target, follow_symlinks=False)
        except FileExistsError:
            if self.target.is_file() and self.target.stat().st_size == self.size \
                    and _sha256_of(self.target) == self._sha.hexdigest():
                self.unchanged = True  # the same bytes won the race: an idempotent re-upload
                return
            raise FileExists(_exists_message(self.name)) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
            self._claim_and_rename()  # a file system without hard links

    def _claim_and_rename(self) -> None:
        """Claim the name with an exclusively created placeholder, then rename over it: racing uploads through
        this store still cannot replace each other's file."""
        try:
            os.close(os.open(self.target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except FileExistsError:
            raise FileExists(_exists_message(self.name)) from None
        os.replace(self._tmp, self.target)

    def abort(self) -> None:
        """Drop the temporary file and the folders this upload created; the target stays untouched."""
        if self._closed and not self._tmp.exists():
            return
        self._close()
        self._tmp.unlink(missing_ok=True)
        self._remove_created_folders()
        self.store._release(self)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._file.close()

    def _remove_created_folders(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: something else was put there meanwhile
        self._created = []


def _make_parents(store: ModelStore, name: str, folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; returns those created (outermost first) for cleanup."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    if not folder.is_dir():
        raise PathConflict(f"cannot upload {quote(name)}: {quote(store.relative(folder))} is a file in the model "
                           "store, not a folder")
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                raise PathConflict(f"cannot upload {quote(name)}: {quote(store.relative(path))} is a file") from None
            continue
        except OSError:
            for made in reversed(created):
                made.rmdir()
            raise
        created.append(path)
    return created


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def read_json_file(path: Path, shown_as: str) -> dict:
    """Parse a model's JSON file; a FAILED_PRECONDITION naming it as ``shown_as`` (relative to the store) if bad."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{shown_as} is missing from the model store") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{shown_as} cannot be read ({type(exc).__name__})") from None
    except ValueError as exc:
        raise ModelLoadError(f"{shown_as} is not valid JSON ({exc}); fix or replace that file") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{shown_as} holds a JSON {type(data).__name__}, not an object; fix or replace it")
    return data


def read_model_index(folder: Path, name: str) -> dict:
    """The parsed model_index.json of the diffusers folder of model ``name``."""
    return read_json_file(folder / MODEL_INDEX, f"{name}/{MODEL_INDEX}")
