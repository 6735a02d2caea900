"""dts-util: a Draw Things gRPC image-generation server with compiled engines."""

__version__ = "0.1.0"

import os as _os

# dts-util never downloads anything: every config it needs ships in the package. Set before diffusers or
# huggingface_hub is imported, this turns any would-be download into a local-files-only error.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Read before torch is imported: Inductor sets this variable itself on first use, after which a
# user's own choice (which --torch-compile must respect) could no longer be told from torch's default.
USER_INDUCTOR_CACHE_DIR = _os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
