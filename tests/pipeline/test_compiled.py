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
