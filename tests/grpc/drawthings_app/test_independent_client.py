"""The app's configuration as an independent implementation writes it: flatc's Python code for the app's schema,
shipped in the ``drawthings-py`` package (installed by tools/setup.sh). Only that generated file is loaded, so the
package's own dependencies are not needed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from dts_util.grpc.drawthings_app.configuration import parse
from tests.grpc.drawthings_app.app_client import generate, result_pixels, stub
from tests.grpc.drawthings_app.test_app_protocol import MODEL, SEED_REQUEST, _png_pixels


@pytest.fixture(scope="module")
def flatc_config():
    spec = importlib.util.find_spec("drawthings_py")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("drawthings-py is not installed (tools/setup.sh installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "generated/dt_grpc/config_generated.py"
    module_spec = importlib.util.spec_from_file_location("drawthings_config_generated", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _pack(module, **fields) -> bytes:
    import flatbuffers

    config = module.GenerationConfigurationT()
    for name, value in fields.items():
        setattr(config, name, value)
    builder = flatbuffers.Builder(0)
    builder.Finish(config.Pack(builder))
    return bytes(builder.Output())


def test_every_field_dts_util_reads_is_where_flatc_writes_it(flatc_config) -> None:
    lora = flatc_config.LoRAT()
    lora.file, lora.weight = "style_lora_f16.ckpt", 0.45
    data = _pack(flatc_config, startWidth=12, startHeight=8, seed=4242, steps=31, guidanceScale=5.5, strength=0.35,
                 model="sd_v1.5_f16.ckpt", sampler=flatc_config.SamplerType.EulerA, batchCount=3, batchSize=2,
                 hiresFix=True, hiresFixStartWidth=6, hiresFixStartHeight=4, hiresFixStrength=0.55, clipSkip=2,
                 maskBlur=3.0, loras=[lora], upscaler="realesrgan_x2plus_f16.ckpt", teaCache=True)
    config = parse(data)
    assert (config.width, config.height, config.seed, config.steps) == (768, 512, 4242, 31)
    assert (config.guidance_scale, config.strength, config.model) == (5.5, pytest.approx(0.35), "sd_v1.5_f16.ckpt")
    assert (config.sampler, config.batch_count, config.batch_size) == ("Euler a", 3, 2)
    assert (config.hires_fix, config.hires_fix_width, config.hires_fix_height) == (True, 384, 256)
    assert config.hires_fix_strength == pytest.approx(0.55) and config.clip_skip == 2 and config.mask_blur == 3.0
    assert [(l.file, l.weight) for l in config.loras] == [("style_lora_f16.ckpt", pytest.approx(0.45))]
    assert config.unsupported == ("TeaCache",)
    assert config.ignored == ("an upscaler (realesrgan_x2plus_f16.ckpt)",)  # skipped, as gRPCServerCLI does


def test_defaults_left_out_by_flatc_read_as_the_schema_says(flatc_config) -> None:
    config = parse(_pack(flatc_config, startWidth=8, startHeight=8))
    assert (config.batch_count, config.batch_size, config.clip_skip, config.hires_fix_strength) == (1, 1, 1,
                                                                                                   pytest.approx(0.7))
    assert config.sampler == "DPM++ 2M Karras" and config.loras == () and config.unsupported == ()


def test_a_generation_configured_by_flatcs_code_gives_the_seed_protocols_pixels(flatc_config, server, client) -> None:
    data = _pack(flatc_config, startWidth=2, startHeight=2, seed=7, steps=4, guidanceScale=7.0, strength=1.0,
                 model=MODEL, sampler=flatc_config.SamplerType.EulerA)
    channel, app_stub = stub(server.target)
    with channel:
        _, images = generate(app_stub, prompt="a harbour", negativePrompt="fog", configuration=data)
    assert np.array_equal(result_pixels(images[0]), _png_pixels(client.generate(**SEED_REQUEST).images[0]))
