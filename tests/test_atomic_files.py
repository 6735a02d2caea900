"""Files and folders written whole: atomic writes, a folder replaced without a gap, abandoned leftovers swept."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from dts_util.atomic_files import PARTIAL_PREFIX, atomic_path, replace_folder, sweep_partials, write_text_atomic


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    write_text_atomic(target, "new", mode=0o600)
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o600


def test_a_replaced_folder_is_never_missing(tmp_path: Path) -> None:
    target = tmp_path / "export"
    target.mkdir()
    (target / "model.onnx").write_text("v0")
    missing, stop = [], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not (target / "model.onnx").is_file():
                missing.append(time.monotonic())

    watcher = threading.Thread(target=watch)
    watcher.start()
    for version in range(1, 30):
        new = tmp_path / f"{PARTIAL_PREFIX}{version}"
        new.mkdir()
        (new / "model.onnx").write_text(f"v{version}")
        replace_folder(new, target)
    stop.set()
    watcher.join()
    assert (target / "model.onnx").read_text() == "v29" and not missing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_only_old_leftovers_are_swept(tmp_path: Path) -> None:
    old_file, old_folder = tmp_path / f"{PARTIAL_PREFIX}a", tmp_path / "sub" / f"{PARTIAL_PREFIX}export"
    young = tmp_path / f"{PARTIAL_PREFIX}b"
    old_folder.mkdir(parents=True)
    (old_folder / "model.onnx").write_text("x")
    for path in (old_file, young):
        path.write_text("x")
    keep = tmp_path / "engine.onnx"
    keep.write_text("x")
    long_ago = time.time() - 7 * 3600
    for path in (old_file, old_folder):
        os.utime(path, (long_ago, long_ago))
    assert sweep_partials(tmp_path) == 2
    assert young.exists() and keep.exists() and not old_file.exists() and not old_folder.exists()
