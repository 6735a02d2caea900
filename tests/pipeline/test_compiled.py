"""`serve --torch-compile`: the eager UNet under torch.compile gives the eager images."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
from PIL import Image

from dts_util.pipeline.params import GenerationRequest
from dts_util.service import ImageService


def _image(service: ImageService, request: GenerationRequest) -> np.ndarray:
    model, resolved = service.prepare(request)
    output = service.generate(model, resolved, lambda: False)
    return np.asarray(Image.open(io.BytesIO(output.images[0])), dtype=np.int16)


def test_torch_compile_matches_eager(base_config) -> None:
    request = GenerationRequest(prompt="a bridge", seed=8, steps=3, width=64, height=64)
    eager = _image(ImageService(base_config), request)
    compiled = _image(ImageService(replace(base_config, torch_compile=True)), request)
    assert np.abs(compiled - eager).max() <= 3


WARM_START = """
import json, sys
from pathlib import Path
from dts_util.config import ServerConfig
from dts_util.service import ImageService
from torch._dynamo.utils import counters

store, engines = Path(sys.argv[1]), Path(sys.argv[2])
config = ServerConfig(model_dir=store, engine_dir=engines, port=0, device="cpu", torch_compile=True,
                      compile_resolutions=((64, 64),))
ImageService(config).warm_up()
print(json.dumps(dict(counters["inductor"])))
"""


def test_a_restarted_server_compiles_from_the_cache_in_the_engine_dir(model_store, tmp_path) -> None:
    """Warm-up compiles the configured shape before serving; a second server process finds the compiled
    graphs in the engine dir's cache instead of compiling them again."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}  # as a fresh server has it

    def start() -> dict:
        result = subprocess.run([sys.executable, "-c", WARM_START, str(model_store.root), str(tmp_path)],
                                capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    first = start()
    assert first.get("fxgraph_cache_miss", 0) > 0 and (tmp_path / "torch-compile-cache").is_dir()
    second = start()
    assert second.get("fxgraph_cache_hit", 0) >= first["fxgraph_cache_miss"]
    assert second.get("fxgraph_cache_miss", 0) == 0
