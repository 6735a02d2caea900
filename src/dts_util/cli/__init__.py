"""The ``dts-util`` command line, one module per command group.

Each command parses its options, sets up logging, and only then imports the heavy
implementation (torch, diffusers, onnxruntime), so ``dts-util --help`` and the client
commands start fast. User errors print one line and exit 1.

- ``serving``: ``serve``, ``install``;
- ``client``: ``test``, ``generate``, ``upload``, ``files-exist``, ``samplers``;
- ``engines``: ``build-engines``, ``engines list``, ``engines rm``;
- ``tls``: ``tls init``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from dts_util import __version__
from dts_util.cli import client, engines, serving, tls  # noqa: F401 - each registers its commands on the app
from dts_util.cli.common import app, out

__all__ = ["app"]


@app.callback(invoke_without_command=True)
def main(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    if version:
        out.print(f"dts-util {__version__}")
        raise typer.Exit()
