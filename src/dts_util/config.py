"""Server configuration and default locations."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 7859
DEFAULT_ADDRESS = "0.0.0.0"
BUILTIN_MODEL_NAME = "builtin-tiny-sd"
# A batch of 2048x2048 PNGs is larger than gRPC's 4 MiB default message limit.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def _checkout_root() -> Path | None:
    """The repository root when running from a source checkout, else None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").exists() and (root / "engines").is_dir() else None


def default_model_dir() -> Path:
    """Model store: $DTS_MODEL_DIR, else the user's data dir (e.g. ~/.local/share/dts-util/models)."""
    if env := os.environ.get("DTS_MODEL_DIR"):
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("dts-util")) / "models"


def default_engine_dir() -> Path:
    """Engine cache: $DTS_ENGINE_DIR, else ``engines/`` of a checkout, else the user's cache dir."""
    if env := os.environ.get("DTS_ENGINE_DIR"):
        return Path(env)
    if (root := _checkout_root()) is not None:
        return root / "engines"
    import platformdirs

    return Path(platformdirs.user_cache_dir("dts-util")) / "engines"


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``dts-util serve`` needs; validated on construction.

    Args:
        model_dir: the model store, root of every client path.
        engine_dir: where engines and their manifests live.
        default_model: model used when a request names none.
        address / port: where to listen.
        max_queue: generations allowed to wait behind the running one.
        max_upload_bytes: largest file UploadFile accepts.
        device: torch device for eager components ("auto" picks cuda when present).
        build_missing: queue a background engine build for shapes that had none.
        torch_compile: wrap eager UNet/VAE in torch.compile.
    """

    model_dir: Path
    engine_dir: Path
    default_model: str = BUILTIN_MODEL_NAME
    address: str = DEFAULT_ADDRESS
    port: int = DEFAULT_PORT
    max_queue: int = 8
    max_upload_bytes: int = 16 * 1024**3
    device: str = "auto"
    build_missing: bool = False
    torch_compile: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_upload_bytes <= 0:
            raise ValueError(f"max_upload_bytes must be > 0, got {self.max_upload_bytes}")


def resolve_device(device: str) -> str:
    """Turn "auto" into "cuda" when torch sees a GPU, else "cpu"."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
