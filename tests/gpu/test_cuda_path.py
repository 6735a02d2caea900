"""The CUDA path, executed: run by tools/device_check.sh on a GPU (``pytest -m gpu``).

Eager fp16 through a real server on an SD1.5-size model, the compiled path, an AOTInductor engine
built and served, and an SDXL-size VAE decode with the upcast. In the check's dry run
(``DTS_GPU_DRY_RUN=1``, what CI runs) the same tests run on the CPU with the built-in model and small
sizes, so none of them can rot unnoticed.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dts_util.engines.builder import build, plan
from dts_util.engines.manager import EngineManager
from tests.conftest import GPU_DRY_RUN, ServerThread

pytestmark = pytest.mark.gpu
DEVICE = "cpu" if GPU_DRY_RUN or not torch.cuda.is_available() else "cuda"
# Full sizes on the GPU; the dry run keeps every step, at sizes a 2-core CPU does in seconds.
SD15_SIZE, STEPS = (128, 4) if DEVICE == "cpu" else (512, 20)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


@pytest.fixture(scope="module")
def gpu_store(model_store, tmp_path_factory) -> tuple[Path, str]:
    """The store and model these tests serve: an SD1.5-architecture model with random weights on the GPU
    (DTS_GPU_MODEL_DIR lets the check's benchmark reuse it), the built-in model in the dry run."""
    if DEVICE == "cpu":
        return model_store.root, "builtin-tiny-sd"
    from tests.tools import load_tool

    root = Path(os.environ.get("DTS_GPU_MODEL_DIR") or tmp_path_factory.mktemp("gpu-models"))
    root.mkdir(parents=True, exist_ok=True)
    return root, load_tool("bench_engines").ensure_sd15(root)


@pytest.fixture(scope="module")
def gpu_config(base_config, gpu_store):
    root, name = gpu_store
    return replace(base_config, model_dir=root, default_model=name, device=DEVICE)


def test_eager_generation_through_a_real_server_in_fp16(gpu_config) -> None:
    with ServerThread(gpu_config) as server, server.client(timeout=600) as client:
        images, info = client.generate_stream(prompt="a lighthouse at dusk", seed=3, steps=STEPS,
                                              width=SD15_SIZE, height=SD15_SIZE)
        model = server.service.model("")
        expected = torch.float16 if DEVICE == "cuda" else torch.float32
        assert model.dtype == expected and model.unet().dtype == expected
        assert model.vae().dtype == torch.float32  # force_upcast (diffusers' default): decoded in fp32
        # Inpainting on the GPU: the fp16 UNet with the fp32 VAE's encoder, seeded CPU generators.
        mask = Image.new("L", (SD15_SIZE, SD15_SIZE))
        mask.paste(255, (0, 0, SD15_SIZE // 2, SD15_SIZE))
        buffer = io.BytesIO()
        mask.save(buffer, "PNG")
        inpainted, inpaint_info = client.generate_stream(prompt="a lighthouse at dusk", seed=3, steps=STEPS,
                                                         init_image=images[0], mask=buffer.getvalue())
    pixels = _pixels(images[0])
    assert pixels.shape == (SD15_SIZE, SD15_SIZE, 3) and pixels.std() > 1  # not black, not NaN-flat
    assert json.loads(info)["backends"]["unet"] == "eager"
    kept = _pixels(inpainted[0])[:, SD15_SIZE // 2:]
    assert np.array_equal(kept, pixels[:, SD15_SIZE // 2:])  # the kept half is the input's
    assert json.loads(inpaint_info)["backends"]["vae_encoder"] == "eager"


def test_the_compiled_path_matches_eager(base_config, tmp_path) -> None:
    config = replace(base_config, device=DEVICE, engine_dir=tmp_path)
    request = dict(prompt="a bridge", seed=8, steps=3, width=64, height=64)
    with ServerThread(config) as server, server.client(timeout=600) as client:
        eager = _pixels(client.generate(**request).images[0])
    with ServerThread(replace(config, torch_compile=True, compile_resolutions=((64, 64),))) as server:
        with server.client(timeout=600) as client:
            compiled = _pixels(client.generate(**request).images[0])
    from dts_util import USER_INDUCTOR_CACHE_DIR

    assert USER_INDUCTOR_CACHE_DIR or (tmp_path / "torch-compile-cache").is_dir()
    diff = np.abs(compiled - eager)
    assert diff.mean() <= (0.5 if DEVICE == "cuda" else 0.05) and diff.max() <= (32 if DEVICE == "cuda" else 3)


def test_an_aotinductor_engine_is_built_and_served(base_config, model_store, tmp_path) -> None:
    from dts_util.models.loader import load_model

    cpu_model = load_model("builtin-tiny-sd", model_store.model_path("builtin-tiny-sd"), "cpu")
    # The UNet and decoder only: an encoder package would add a compile to a check that must fit one call.
    jobs = plan(cpu_model, tmp_path, [(128, 128)], [1], backend_name="aotinductor", device=DEVICE,
                components=("unet", "vae_decoder"))
    assert {job.precision for job in jobs if job.component.name == "unet"} == \
        {"fp16" if DEVICE == "cuda" else "fp32"}
    results = [build(job, cpu_model, tmp_path) for job in jobs]
    assert [r.status for r in results] == ["built", "built"], [r.error for r in results]
    config = replace(base_config, device=DEVICE, engine_dir=tmp_path)
    with ServerThread(config, EngineManager(tmp_path)) as server, server.client(timeout=600) as client:
        reply = client.generate(prompt="a harbour", seed=2, steps=4, width=128, height=128)
    backends = json.loads(reply.info)["backends"]
    assert backends["unet"] == "aotinductor" and backends["vae_decoder"] == "aotinductor"
    assert _pixels(reply.images[0]).std() > 1


def test_an_sdxl_size_decode_is_upcast_and_finite(model_store) -> None:
    """SDXL's VAE config asks for force_upcast: in an fp16 model the VAE still decodes in fp32."""
    from importlib import resources

    from diffusers import AutoencoderKL

    from dts_util.models.loader import LoadedModel, inspect_model
    from dts_util.pipeline.components import EagerVaeDecoder

    shipped = resources.files("dts_util.models").joinpath("configs", "sdxl_base", "vae", "config.json")
    vae_config = json.loads(shipped.read_text())
    info = inspect_model("builtin-tiny-sd", model_store.model_path("builtin-tiny-sd"))
    info = replace(info, family="sdxl", vae_config=vae_config)
    model = LoadedModel(info, DEVICE, torch.float16 if DEVICE == "cuda" else torch.float32)
    assert vae_config["force_upcast"] and model.vae_dtype == torch.float32
    config = {k: v for k, v in vae_config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(config).to(DEVICE, model.vae_dtype).eval()
    side = 32 if DEVICE == "cpu" else 128  # 1024x1024 on the GPU
    latent = torch.randn(1, 4, side, side, device=DEVICE, dtype=model.dtype)
    image = EagerVaeDecoder(vae)(latent=latent / vae_config["scaling_factor"])
    assert image.dtype == torch.float32 and image.shape == (1, 3, side * 8, side * 8)
    assert torch.isfinite(image).all()
