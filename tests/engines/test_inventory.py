"""`engines rm --all`: ONNX exports and every backend's caches go, engines of other models stay."""

from __future__ import annotations

from pathlib import Path

from dts_util.engines.inventory import remove_exports


def test_exports_and_the_caches_each_backend_declares_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "sd15-0123456789ab"
    folders = [root / "onnx/unet-fp32", root / "onnxruntime-1.32.0/cpu-x/fused/unet-fp32",
               root / "openvino-2026.4/cpu-x/openvino-cache", root / "aotinductor-torch2.13.0/cpu-x/.inductor-cache"]
    for folder in folders:
        folder.mkdir(parents=True)
    kept = root / "aotinductor-torch2.13.0/cpu-x/unet-fp32-512x512-b2.pt2"
    kept.write_bytes(b"engine")
    other = tmp_path / "other-0123456789ab/onnx/unet-fp32"
    other.mkdir(parents=True)
    assert remove_exports(tmp_path, "sd15") == 4
    assert not any(folder.exists() for folder in folders) and kept.exists() and other.exists()
