"""`serve --torch-compile`: the eager UNet under torch.compile gives the eager images."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dts_util.pipeline.params import GenerationRequest
from dts_util.service import ImageService


def _image(service: ImageService, request: GenerationRequest) -> np.ndarray:
    model, resolved = service.prepare(request)
    output = service.generate(model, resolved, lambda: False)
    return np.asarray(Image.open(io.BytesIO(output.images[0])), dtype=np.int16)


REQUEST = dict(prompt="a bridge", seed=8, steps=3, width=64, height=64)
WARM_START = """
import base64, json, sys
from pathlib import Path
from dts_util.config import ServerConfig
from dts_util.pipeline.params import GenerationRequest
from dts_util.service import ImageService
from torch._dynamo.utils import counters

store, engines, request = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
config = ServerConfig(model_dir=store, engine_dir=engines, port=0, device="cpu", torch_compile=True,
                      compile_resolutions=((64, 64),))
service = ImageService(config)
service.warm_up()
cache = dict(counters["inductor"])
model, resolved = service.prepare(GenerationRequest(**request))
png = service.generate(model, resolved, lambda: False).images[0]
print(json.dumps({"cache": cache, "png": base64.b64encode(png).decode()}))
"""


def test_a_restarted_server_compiles_from_the_cache_and_matches_eager(base_config, model_store, tmp_path) -> None:
    """Warm-up compiles the configured shape before serving, and the compiled UNet gives eager's image; a second
    server process finds the compiled graphs in the engine dir's cache instead of compiling them again."""
    import base64
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}  # as a fresh server has it

    def start() -> tuple[dict, np.ndarray]:
        result = subprocess.run([sys.executable, "-c", WARM_START, str(model_store.root), str(tmp_path),
                                 json.dumps(REQUEST)], capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        printed = json.loads(result.stdout.strip().splitlines()[-1])
        image = Image.open(io.BytesIO(base64.b64decode(printed["png"])))
        return printed["cache"], np.asarray(image, dtype=np.int16)

    first, compiled = start()
    assert first.get("fxgraph_cache_miss", 0) > 0 and (tmp_path / "torch-compile-cache").is_dir()
    eager = _image(ImageService(base_config), GenerationRequest(**REQUEST))
    assert np.abs(compiled - eager).max() <= 3
    second, _ = start()
    assert second.get("fxgraph_cache_hit", 0) >= first["fxgraph_cache_miss"]
    assert second.get("fxgraph_cache_miss", 0) == 0


def test_a_compiled_wrapper_is_freed_with_its_module() -> None:
    """Unloading or evicting a model frees its compiled UNet too (the wrapper is not kept in a global table)."""
    import gc
    import weakref

    import torch

    from dts_util.pipeline.compiled import compiled_module

    module = torch.nn.Linear(4, 4)
    wrapper = compiled_module(module)
    assert compiled_module(module) is wrapper  # one wrapper per module: compiled graphs are reused
    module_ref, wrapper_ref = weakref.ref(module), weakref.ref(wrapper)
    del module, wrapper
    gc.collect()
    assert module_ref() is None and wrapper_ref() is None
