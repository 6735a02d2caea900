"""Server configuration and default locations."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from dts_util.limits import (DEFAULT_HTTP_TIMEOUT_S, DEFAULT_MAX_CONCURRENT_UPLOADS, DEFAULT_MAX_LOADED_MODELS, DEFAULT_MAX_STORE_BYTES,
                             DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_MIN_FREE_DISK_BYTES, DEFAULT_UPLOAD_IDLE_TIMEOUT_S)

DEFAULT_PORT = 7859
# Where the server listens: every interface when a token guards it, loopback otherwise.
ADDRESS_WITH_AUTH = "0.0.0.0"
LOOPBACK_ADDRESS = "127.0.0.1"
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost", "[::1]"}
BUILTIN_MODEL_NAME = "builtin-tiny-sd"


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


def is_loopback(address: str) -> bool:
    """Whether listening on ``address`` keeps the server reachable from this machine only."""
    import ipaddress

    if address in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


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
        max_store_bytes: total size of the model store uploads may fill (0 = no quota).
        min_free_disk_bytes: free disk space uploads must leave.
        max_concurrent_uploads: uploads allowed at once.
        upload_idle_timeout: seconds an upload may go without data before it is aborted.
        max_loaded_models: models kept in memory at once (least recently used ones go first).
        device: where generations run: "auto" (every CUDA GPU, else the CPU), or devices such as
            "cpu" or "cuda:0,cuda:1"; one worker per device (see ``resolve_devices``).
        dtype: eager weights' dtype: auto (fp16 on CUDA, fp32 on the CPU), fp32, fp16 or bf16.
        png_compression: "fast" (fpng, lossless, ~10x zlib's speed) or a zlib level 0-9 (smaller, slower).
        build_missing: queue a background engine build for shapes that had none.
        torch_compile: wrap the eager UNet in torch.compile (caches kept under ``engine_dir``).
        compile_resolutions: (width, height) pairs compiled while warming up, before health says SERVING
            (empty: the default model's native size).
        channels_last: eager UNet and VAE in channels-last memory layout.
        auth_token: bearer token every RPC but health checking must carry ("" = none).
        allow_no_auth: listen beyond loopback without a token (``--no-auth``).
        tls_cert / tls_key: PEM files to serve TLS with (both or neither).
        tls_client_ca: PEM CA bundle; when set, clients must present a certificate it signed.
        http_port: also serve the HTTP APIs (A1111's /sdapi/v1, OpenAI's /v1/images) on this port of the same
            address, with the same token and certificate (0 = no HTTP).
        http_timeout: seconds an HTTP client may take to send its request, or to take a response.
    """

    model_dir: Path
    engine_dir: Path
    default_model: str = BUILTIN_MODEL_NAME
    address: str = LOOPBACK_ADDRESS
    port: int = DEFAULT_PORT
    max_queue: int = 8
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_store_bytes: int = DEFAULT_MAX_STORE_BYTES
    min_free_disk_bytes: int = DEFAULT_MIN_FREE_DISK_BYTES
    max_concurrent_uploads: int = DEFAULT_MAX_CONCURRENT_UPLOADS
    upload_idle_timeout: float = DEFAULT_UPLOAD_IDLE_TIMEOUT_S
    max_loaded_models: int = DEFAULT_MAX_LOADED_MODELS
    device: str = "auto"
    dtype: str = "auto"
    png_compression: str = "fast"
    metrics_port: int = 0
    metrics_address: str = LOOPBACK_ADDRESS
    build_missing: bool = False
    torch_compile: bool = False
    compile_resolutions: tuple[tuple[int, int], ...] = ()
    channels_last: bool = False
    fp8: bool = False  # the eager denoiser's linear layers in float8 (torchao; CUDA, compute capability 8.9+)
    # HTTP/2 streams one connection may have open at once (advertised to clients; past it a call is refused with
    # UNAVAILABLE, which clients may retry). High, since gRPC's Python client does not queue behind a low one.
    max_concurrent_streams: int = 10_000
    # Ping an idle connection after this many seconds and drop it when the ping is not answered within as many
    # again: a client that vanished without closing (a phone leaving Wi-Fi) is noticed and its generation stopped.
    keepalive_seconds: float = 20.0
    max_generation_seconds: float = 0.0  # one generation's wall time (0 = no cap); past it DEADLINE_EXCEEDED
    auth_token: str = field(default="", repr=False)
    allow_no_auth: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    advertise: bool = False  # announce the server to the Draw Things app over mDNS
    advertise_name: str = ""  # what the app shows ("" = the host name)
    http_port: int = 0
    http_timeout: float = DEFAULT_HTTP_TIMEOUT_S

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not 0 <= self.http_port <= 65535:
            raise ValueError(f"--http-port must be in 0..65535, got {self.http_port}")
        if self.http_port and self.http_port == self.port:
            raise ValueError(f"--http-port {self.http_port} is the gRPC --port; give HTTP a port of its own")
        if not 0 < self.http_timeout <= 3600:
            raise ValueError(f"--http-timeout must be in (0, 3600] seconds, got {self.http_timeout}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        for name in ("max_upload_bytes", "max_concurrent_uploads", "max_loaded_models", "upload_idle_timeout",
                     "max_concurrent_streams", "keepalive_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_store_bytes", "min_free_disk_bytes", "max_generation_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.png_compression != "fast" and self.png_compression not in tuple("0123456789"):
            raise ValueError(f"--png-compression {self.png_compression}: give fast or a zlib level 0-9")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")
        if not self.auth_token and not self.allow_no_auth and not is_loopback(self.address):
            raise ValueError(f"refusing to listen on {self.address} without authentication: anyone who can reach "
                             "it could write to the model store. Set a token (--auth-token-file or "
                             "DTS_AUTH_TOKEN), or pass --no-auth if the network is trusted")

    @property
    def upload_policy(self):
        from dts_util.models.store import UploadPolicy

        return UploadPolicy(max_file_bytes=self.max_upload_bytes, max_store_bytes=self.max_store_bytes,
                            min_free_bytes=self.min_free_disk_bytes, max_concurrent=self.max_concurrent_uploads)


def check_dtype(dtype: str, device: str) -> None:
    """Refuse an eager dtype the device cannot compute well: bf16 on a CPU without AVX512_BF16/AMX
    runs far slower than fp32, and fp16 on the CPU is both slow and lossy."""
    from dts_util.errors import StartupError

    if dtype not in ("auto", "fp32", "fp16", "bf16"):
        raise StartupError(f"--dtype {dtype}: choose auto, fp32, fp16 or bf16")
    if device.startswith("cuda"):
        return
    from dts_util.engines.device import cpu_has_bf16

    if dtype == "bf16" and not cpu_has_bf16():
        raise StartupError("--dtype bf16 needs a CPU with AVX512_BF16 or AMX; this one has neither (use fp32)")
    if dtype == "fp16":
        raise StartupError("--dtype fp16 is for CUDA devices; on the CPU use fp32, or bf16 where supported")


def check_fp8(enabled: bool, device: str) -> None:
    """``--fp8`` runs the denoiser's matmuls in float8 with torchao: that needs fp8 tensor cores (compute
    capability 8.9: Ada, Hopper and newer) and torchao; anywhere else it is refused at start-up."""
    if not enabled:
        return
    from dts_util.errors import StartupError

    if not device.startswith("cuda"):
        raise StartupError(f"--fp8 needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+: L4, RTX 40, "
                           f"H100, ...); {device} has none. Leave --fp8 off, or serve on such a GPU")
    import torch

    index = int(device.split(":", 1)[1]) if ":" in device else 0
    capability = torch.cuda.get_device_capability(index)
    if capability < (8, 9):
        raise StartupError(f"--fp8 needs compute capability 8.9 or newer; {device} has {capability[0]}.{capability[1]}")
    try:
        import torchao.quantization  # noqa: F401 - only whether it imports
    except ImportError:
        raise StartupError("--fp8 quantizes with torchao, which is not installed: pip install torchao") from None


MAX_WORKERS = 16


def resolve_devices(spec: str) -> list[str]:
    """``serve --devices``: "auto" (every CUDA GPU torch sees, else the CPU), or a comma list such as
    "cuda:0,cuda:1" or "cpu". One worker runs per entry; "cpu" may repeat (several CPU workers share
    the cores, useful mostly for tests), a GPU may not."""
    from dts_util.errors import StartupError

    if spec.strip() == "auto":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{index}" for index in range(count)] or ["cpu"]
    devices = [entry.strip() for entry in spec.split(",") if entry.strip()]
    if not devices or len(devices) > MAX_WORKERS:
        raise StartupError(f"--devices {spec!r}: give auto, or 1 to {MAX_WORKERS} comma-separated devices such as "
                           "cpu or cuda:0,cuda:1")
    resolved = []
    for device in devices:
        if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
            raise StartupError(f"--devices: {device!r} is not a device; use cpu, cuda or cuda:N")
        device = resolve_device(device)
        resolved.append("cuda:0" if device == "cuda" else device)
    gpus = [device for device in resolved if device != "cpu"]
    if len(gpus) != len(set(gpus)):
        raise StartupError(f"--devices {spec!r} names a GPU twice; one worker drives each GPU")
    return resolved


def resolve_device(device: str) -> str:
    """Turn "auto" into "cuda" when torch sees a GPU, else "cpu"; refuse a CUDA device torch cannot use."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            from dts_util.errors import StartupError

            raise StartupError(f"--devices {device} was asked for, but torch sees no CUDA GPU (torch "
                               f"{torch.__version__}); use --devices cpu or install a CUDA build of torch")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            from dts_util.errors import StartupError

            raise StartupError(f"--devices {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
