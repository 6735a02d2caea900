"""The CLI's side of the HTTP APIs: `install --http-port` writes it into the command, and bad settings stop
`serve` with one line before anything listens."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from dts_util.cli import app
from dts_util.config import ServerConfig

runner = CliRunner()


def test_install_enables_http(tmp_path: Path, model_store) -> None:
    result = runner.invoke(app, ["install", "--no-service", "--http-port", "7861", "--model-path",
                                 str(model_store.root), "--engine-dir", str(tmp_path / "e")],
                           env={"DTS_CONFIG_DIR": str(tmp_path / "c")})
    assert result.exit_code == 0, result.output
    assert "--http-port 7861" in " ".join(result.output.split()) and "/sdapi/v1" in result.output


@pytest.mark.parametrize("fields, words", [({"http_port": 7859}, "port of its own"),
                                           ({"http_port": 70000}, "0..65535"), ({"http_timeout": 0}, "--http-timeout")])
def test_bad_http_settings_are_refused(tmp_path: Path, fields: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ServerConfig(model_dir=tmp_path, engine_dir=tmp_path, port=7859, **fields)


def test_serve_help_names_the_http_options() -> None:
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert "--http-port" in result.output and "--http-timeout" in result.output
