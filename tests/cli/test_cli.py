"""The dts-util CLI, driven through typer's CliRunner against a real server."""

from __future__ import annotations

import hashlib
import socket

import pytest
from typer.testing import CliRunner

from dts_util.cli import app

runner = CliRunner()
COMMANDS = ["serve", "test", "generate", "upload", "files-exist", "install", "build-engines", "engines list",
            "engines rm", "samplers"]


def _port(server) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(server.running.port)]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = runner.invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_test_command_says_hello(server) -> None:
    result = runner.invoke(app, ["test", *_port(server)])
    assert result.exit_code == 0 and "OK" in result.output and "HELLO" in result.output


def test_test_command_reports_nothing_listening() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    result = runner.invoke(app, ["test", "--port", str(free), "--timeout", "2"])
    assert result.exit_code == 1 and "nothing is listening" in result.output


def test_generate_writes_pngs_and_prints_info(server, tmp_path) -> None:
    result = runner.invoke(app, ["generate", "a castle", "--seed", "4", "--steps", "2", "--batch-count", "2",
                                 "--out", str(tmp_path), *_port(server)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4.png", "5.png"]
    assert '"sampler": "DPM++ 2M Karras"' in result.output


def test_samplers_lists_the_apps_samplers_and_generate_takes_them_with_a_seed_mode(server, tmp_path) -> None:
    from dts_util.pipeline.samplers import APP_SAMPLERS

    listed = runner.invoke(app, ["samplers"])
    assert listed.exit_code == 0 and all(name in listed.output for name in APP_SAMPLERS)
    result = runner.invoke(app, ["generate", "a castle", "--seed", "4", "--steps", "2", "--sampler", "UniPCAYS",
                                 "--seed-mode", "scale_alike", "--out", str(tmp_path), *_port(server)])
    assert result.exit_code == 0, result.output
    assert '"sampler": "UniPC AYS"' in result.output and '"seed_mode": "scale_alike"' in result.output


def test_generate_inpaints_an_init_image_with_a_mask(server, tmp_path) -> None:
    from PIL import Image

    Image.new("RGB", (96, 64), "navy").save(tmp_path / "in.png")
    mask = Image.new("L", (96, 64))
    mask.paste(255, (10, 10, 50, 40))
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "a boat", "--init-image", str(tmp_path / "in.png"), "--mask",
                                 str(tmp_path / "mask.png"), "--strength", "0.6", "--seed", "3", "--steps", "5",
                                 "--out", str(out), *_port(server)])
    assert result.exit_code == 0, result.output
    assert Image.open(out / "3.png").size == (96, 64)
    assert '"mode": "inpaint"' in result.output and '"denoising_steps": 3' in result.output
    assert '"mask_blur": 4' in result.output  # the CLI's default softens the edge
    unsized = runner.invoke(app, ["generate", "x", "--init-image", str(tmp_path / "in.png"), "--mask",
                                  str(tmp_path / "in.png"), "--width", "64", "--out", str(out), *_port(server)])
    assert unsized.exit_code == 0, unsized.output  # the mask is read as greyscale; the image is resized to 64x64
    orphan = runner.invoke(app, ["generate", "x", "--mask", str(tmp_path / "mask.png"), *_port(server)])
    assert orphan.exit_code == 1 and "--mask needs --init-image" in orphan.output


def test_generate_bad_input_is_one_line_error(server, tmp_path) -> None:
    result = runner.invoke(app, ["generate", "x", "--width", "100", "--out", str(tmp_path), *_port(server)])
    assert result.exit_code == 1 and "INVALID_ARGUMENT: width is 100" in result.output


def test_upload_and_files_exist(server, model_store, tmp_path) -> None:
    local = tmp_path / "lora.safetensors"
    local.write_bytes(b"\x01" * 3000)
    result = runner.invoke(app, ["upload", str(local), "--as", "cli/lora.safetensors", *_port(server)])
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(local.read_bytes()).hexdigest() in result.output
    assert (model_store.root / "cli/lora.safetensors").read_bytes() == local.read_bytes()
    found = runner.invoke(app, ["files-exist", "cli/lora.safetensors", *_port(server)])
    assert found.exit_code == 0 and "exists" in found.output
    missing = runner.invoke(app, ["files-exist", "cli/nope", "../x", *_port(server)])
    assert missing.exit_code == 1 and "missing" in missing.output and "invalid" in missing.output


def test_build_engines_list_and_rm(model_store, tmp_path) -> None:
    engines = tmp_path / "engines"
    common = ["--engine-dir", str(engines), "--model-path", str(model_store.root)]
    dry = runner.invoke(app, ["build-engines", "--resolution", "64x64", "--dry-run", *common])
    assert dry.exit_code == 0 and "unet 64x64 b2: to build" in dry.output
    built = runner.invoke(app, ["build-engines", "--resolution", "64x64", "--resolution", "128x64", *common])
    assert built.exit_code == 0, built.output
    assert built.output.count("built") >= 6 and "peak memory of this build" in built.output
    assert built.output.count("vae_encoder") == 2  # img2img's encoder is built by default
    again = runner.invoke(app, ["build-engines", "--resolution", "64x64", *common])
    assert again.exit_code == 0 and again.output.count("skipped") == 3
    listed = runner.invoke(app, ["engines", "list", *common])
    assert listed.exit_code == 0 and listed.output.count("usable") == 6
    removed = runner.invoke(app, ["engines", "rm", "--resolution", "128x64", "--yes", *common])
    assert removed.exit_code == 0 and removed.output.count("removed") == 3
    assert runner.invoke(app, ["engines", "list", *common]).output.count("usable") == 3
    from dts_util.engines.inventory import engine_status

    record = engine_status(engines, model_store.root)[0][0]
    record.engine_path.unlink()
    record.engine_path.mkdir()  # still there, but no file can be read from it
    listed = runner.invoke(app, ["engines", "list", *common])
    assert listed.output.count("usable") == 2 and "unreadable" in listed.output


def test_build_engines_unknown_model(model_store, tmp_path) -> None:
    result = runner.invoke(app, ["build-engines", "--model", "nope", "--engine-dir", str(tmp_path),
                                 "--model-path", str(model_store.root)])
    assert result.exit_code == 1 and "model 'nope' is not in" in result.output


def test_build_engines_tensorrt_unavailable_is_a_clear_error(model_store, tmp_path) -> None:
    from dts_util.engines.backends import tensorrt_available

    if tensorrt_available()[0]:
        pytest.skip("tensorrt is available here")
    result = runner.invoke(app, ["build-engines", "--backend", "tensorrt", "--engine-dir", str(tmp_path),
                                 "--model-path", str(model_store.root)])
    assert result.exit_code == 1 and "backend 'tensorrt' cannot run here" in result.output


def test_install_without_service_prepares_the_store(tmp_path) -> None:
    result = runner.invoke(app, ["install", "--no-service", "--model-path", str(tmp_path / "m"),
                                 "--engine-dir", str(tmp_path / "e")], env={"DTS_CONFIG_DIR": str(tmp_path / "c")})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "builtin-tiny-sd" / "model_index.json").is_file()
