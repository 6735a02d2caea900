"""The model store: one folder that every client path is relative to.

Two promises live here. Paths from clients never escape the store's root, and
uploads are written to a hidden temporary file that is renamed into place only
once the whole stream arrived and checked out, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path, PurePosixPath

from dts_util.errors import InvalidPath, InvalidRequest, ModelNotFound, UploadCorrupt, UploadTooLarge

# Temporary upload files start with this, so listings can skip them.
PARTIAL_PREFIX = ".partial-"
MODEL_INDEX = "model_index.json"


class ModelStore:
    """A folder of models and uploaded files.

    Args:
        root: the folder; created if missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def resolve(self, name: str) -> Path:
        """Map a client path to a real path inside the store, or raise InvalidPath.

        Rejects empty names, absolute paths, any '..' component, NUL bytes and
        anything that resolves (through symlinks too) outside the root.
        """
        if not name or not name.strip():
            raise InvalidPath("file name is empty; give a path relative to the model store")
        if "\x00" in name:
            raise InvalidPath(f"file name {name!r} contains a NUL byte")
        posix = PurePosixPath(name.replace("\\", "/"))
        if posix.is_absolute() or (len(name) > 1 and name[1] == ":"):
            raise InvalidPath(f"file name {name!r} is absolute; give a path relative to the model store")
        if ".." in posix.parts:
            raise InvalidPath(f"file name {name!r} contains '..'; paths must stay inside the model store")
        path = (self.root / posix).resolve()
        if path != self.root and self.root not in path.parents:
            raise InvalidPath(f"file name {name!r} resolves outside the model store")
        if path == self.root:
            raise InvalidPath(f"file name {name!r} names the model store itself, not a file in it")
        return path

    def exists(self, name: str) -> bool:
        """Whether ``name`` (validated as in resolve) is a file or folder in the store."""
        return self.resolve(name).exists()

    def model_names(self) -> list[str]:
        """Models GenerateImage can serve: folders in the diffusers layout (with model_index.json)."""
        names = []
        for index in sorted(self.root.glob(f"**/{MODEL_INDEX}")):
            folder = index.parent
            if any(part.startswith(".") for part in folder.relative_to(self.root).parts):
                continue
            names.append(folder.relative_to(self.root).as_posix())
        return names

    def model_path(self, name: str) -> Path | None:
        """The folder of model ``name`` if it is a loadable diffusers folder, else None."""
        path = self.resolve(name)
        return path if (path / MODEL_INDEX).is_file() else None

    def require_model(self, name: str) -> Path:
        """The folder of model ``name``, or ModelNotFound naming the models that are there."""
        path = self.model_path(name)
        if path is None:
            available = ", ".join(self.model_names()) or "none"
            raise ModelNotFound(f"model {name!r} is not in the model store; available models: {available}")
        return path

    def open_upload(self, name: str, max_bytes: int) -> "Upload":
        """Start an upload of ``name``; bytes go to a temporary file next to the target."""
        return Upload(name, self.resolve(name), max_bytes)


class Upload:
    """One file being written: ``write`` chunks, then ``commit`` or ``abort``.

    Nothing appears at the target path until ``commit`` succeeds; an existing
    file is replaced only then, atomically.
    """

    def __init__(self, name: str, target: Path, max_bytes: int) -> None:
        if target.is_dir():
            raise InvalidRequest(f"{name!r} is a folder in the model store; upload to a file name")
        target.parent.mkdir(parents=True, exist_ok=True)
        self.name, self.target, self.max_bytes = name, target, max_bytes
        fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=f"-{target.name}", dir=target.parent)
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(tmp)
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self.max_bytes:
            raise UploadTooLarge(
                f"upload {self.name!r} is over the server's limit of {self.max_bytes} bytes; "
                "raise it with `dts-util serve --max-upload-bytes`"
            )
        self._file.write(chunk)
        self._sha.update(chunk)
        self.size += len(chunk)

    def commit(self, expected_sha256: str = "", expected_size: int = 0) -> str:
        """Check the declared size and hash, then rename into place. Returns the SHA-256 hex."""
        digest = self._sha.hexdigest()
        if expected_size and expected_size != self.size:
            raise UploadCorrupt(f"upload {self.name!r}: received {self.size} bytes, "
                                f"but total_size said {expected_size}; nothing was kept")
        if expected_sha256 and expected_sha256.lower() != digest:
            raise UploadCorrupt(f"upload {self.name!r}: SHA-256 of the received bytes is {digest}, "
                                f"but sha256 said {expected_sha256}; nothing was kept")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self._tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; stored files follow the umask
        os.replace(self._tmp, self.target)
        return digest

    def abort(self) -> None:
        """Drop the temporary file; the target (if any) stays untouched."""
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def read_model_index(folder: Path) -> dict:
    """The parsed model_index.json of a diffusers folder."""
    return json.loads((folder / MODEL_INDEX).read_text())
