"""Model store: paths never escape the root; uploads are atomic."""

from __future__ import annotations

import pytest

from dts_util.errors import InvalidPath, UploadCorrupt, UploadTooLarge
from dts_util.models.store import RESERVED_PREFIX, ModelStore, UploadPolicy


@pytest.mark.parametrize("name", ["", "  ", "/etc/passwd", "..", "a/../..", "../x", "a\x00b", "C:\\x", "\\\\srv\\x",
                                  "."])
def test_unsafe_names_are_rejected(tmp_path, name: str) -> None:
    with pytest.raises(InvalidPath):
        ModelStore(tmp_path).resolve(name)


def test_nested_names_resolve_inside(tmp_path) -> None:
    store = ModelStore(tmp_path)
    assert store.resolve("a/b/c.bin") == tmp_path.resolve() / "a/b/c.bin"


def test_upload_commit_and_abort(tmp_path) -> None:
    store = ModelStore(tmp_path, UploadPolicy(max_file_bytes=100, min_free_bytes=0))
    upload = store.open_upload("m/x.bin")
    upload.write(b"hello")
    assert not (tmp_path / "m/x.bin").exists()
    upload.commit()
    assert (tmp_path / "m/x.bin").read_bytes() == b"hello"
    upload = store.open_upload("m/x.bin", overwrite=True)
    upload.write(b"other")
    upload.abort()
    assert (tmp_path / "m/x.bin").read_bytes() == b"hello"
    assert not list(tmp_path.rglob(f"{RESERVED_PREFIX}*"))


def test_upload_limits_and_checks(tmp_path) -> None:
    store = ModelStore(tmp_path, UploadPolicy(max_file_bytes=4, min_free_bytes=0))
    upload = store.open_upload("x.bin")
    with pytest.raises(UploadTooLarge):
        upload.write(b"12345")
    upload.abort()
    upload = store.open_upload("x.bin")
    upload.write(b"abc")
    with pytest.raises(UploadCorrupt, match="received 3 bytes, but total_size said 4"):
        upload.commit(expected_size=4)
    upload.abort()
    assert not (tmp_path / "x.bin").exists()


def test_model_names_skip_partial_and_hidden_folders(tmp_path) -> None:
    for folder in ("good", ".dts-upload-x", "nested/deep"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "model_index.json").write_text("{}")
    assert ModelStore(tmp_path).model_names() == ["good", "nested/deep"]
