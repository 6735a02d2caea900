"""What every command group of the ``dts-util`` command line shares: the Typer apps, the consoles, the
options several commands take, and one-line errors.

The client commands (``test``, ``generate``, ``upload``, ``files-exist``) take the same nine connection
options; ``client_options`` adds them to a command and hands it a ready ``connect()``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

# gRPC's core logs TLS handshake details at INFO by default; users see our one-line errors instead.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from dts_util.config import DEFAULT_PORT

app = typer.Typer(help="dts-util: a Draw Things gRPC image-generation server with compiled engines.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False)
engines_app = typer.Typer(help="Manage built engines (list, remove).", no_args_is_help=True)
app.add_typer(engines_app, name="engines")
tls_app = typer.Typer(help="TLS certificates: a private CA, a server certificate, client certificates.",
                      no_args_is_help=True)
app.add_typer(tls_app, name="tls")
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the terminal width
# soft_wrap: long lines (hashes, paths) stay whole when piped into files and scripts.
out = Console(soft_wrap=True)

SERVE, BUILD, CLIENT, SECURITY, LIMITS = "Serve", "Build", "Client", "Security", "Limits"
HostOpt = Annotated[str, typer.Option(help="Server host to connect to.", rich_help_panel=CLIENT)]

PortOpt = Annotated[int, typer.Option(help="Server port.", rich_help_panel=CLIENT)]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for the server's answer.", rich_help_panel=CLIENT)]
TokenOpt = Annotated[Optional[str], typer.Option(
    help="Bearer token for a server that needs one. Prefer $DTS_AUTH_TOKEN or --token-file: argv is visible "
         "to other users.", envvar="DTS_AUTH_TOKEN", show_envvar=True, show_default="none",
    rich_help_panel=CLIENT)]
TokenFileOpt = Annotated[Optional[Path], typer.Option(help="File holding the bearer token.", show_default="none",
                                                      rich_help_panel=CLIENT)]
TlsOpt = Annotated[bool, typer.Option(help="Connect with TLS (implied by --ca and --client-cert).",
                                      rich_help_panel=CLIENT)]
CaOpt = Annotated[Optional[Path], typer.Option(help="CA certificate (PEM) that signed the server's certificate.",
                                               show_default="the system's trusted CAs", rich_help_panel=CLIENT)]
ClientCertOpt = Annotated[Optional[Path], typer.Option(help="Client certificate (PEM) for mutual TLS.",
                                                       show_default="none", rich_help_panel=CLIENT)]
ClientKeyOpt = Annotated[Optional[Path], typer.Option(help="Key (PEM) of --client-cert.", show_default="none",
                                                      rich_help_panel=CLIENT)]
ModelDirOpt = Annotated[Optional[Path], typer.Option(
    "--model-path", help="Model store folder.", show_default="$DTS_MODEL_DIR or the user data dir")]
EngineDirOpt = Annotated[Optional[Path], typer.Option(
    help="Engine cache folder.", show_default="$DTS_ENGINE_DIR, engines/ of a checkout, or the user cache dir")]


class LogLevel(str, Enum):
    debug = "debug"
    info = "info"
    warning = "warning"


def setup_logging(level: LogLevel, rich: bool) -> None:
    if rich:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err, rich_tracebacks=True, show_path=False)
        fmt = "%(message)s"
    else:  # the server's logs stay plain text, one line per record, for files and journald
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=level.value.upper(), handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print_table(table) -> None:
    """Tables print at full width when piped, instead of being cut to 80 columns."""
    (out if out.is_terminal else Console(width=240)).print(table)


def fail(message: str) -> typer.Exit:
    from rich.markup import escape

    # Escaped: server messages name things like "FLUX.2 [klein]", which rich would take for markup and drop.
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code=1)


def rpc_error(exc: Exception, target: str) -> typer.Exit:
    import grpc

    from dts_util.client import explain_rpc_error

    if isinstance(exc, grpc.RpcError):
        return fail(explain_rpc_error(exc, target))
    return fail(str(exc))


@dataclass(frozen=True)
class Connection:
    """Where and how a client command reaches the server (the nine connection options)."""

    host: str
    port: int
    timeout: float
    token: Optional[str]
    token_file: Optional[Path]
    tls: bool
    ca: Optional[Path]
    client_cert: Optional[Path]
    client_key: Optional[Path]

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def connect(self):
        """A connected client; bad token or TLS files are one-line errors."""
        from dts_util.client import Client, Security
        from dts_util.errors import StartupError
        from dts_util.security.tokens import read_token_file

        if (self.client_cert is None) != (self.client_key is None):
            raise fail("mutual TLS needs both --client-cert and --client-key")
        try:
            token = read_token_file(self.token_file) if self.token_file is not None else self.token
            security = Security(token=(token or "").strip(), tls=self.tls, ca=self.ca, client_cert=self.client_cert,
                                client_key=self.client_key)
            return Client(self.target, self.timeout, security)
        except (StartupError, OSError) as exc:
            raise fail(str(exc))


_CONNECTION_OPTIONS: tuple[tuple[str, Any, Any], ...] = (
    ("host", HostOpt, "localhost"), ("port", PortOpt, DEFAULT_PORT), ("timeout", TimeoutOpt, None),
    ("token", TokenOpt, None), ("token_file", TokenFileOpt, None), ("tls", TlsOpt, False), ("ca", CaOpt, None),
    ("client_cert", ClientCertOpt, None), ("client_key", ClientKeyOpt, None),
)


def client_options(timeout: float) -> Callable[[Callable], Callable]:
    """Give a client command the connection options (``timeout`` seconds by default) as a ``connection:
    Connection`` argument: the command declares its own options only."""
    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(**values: Any) -> Any:
            options = {name: values.pop(name) for name, _, _ in _CONNECTION_OPTIONS}
            return command(connection=Connection(**options), **values)

        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "connection"]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                   default=timeout if name == "timeout" else default)
                 for name, annotation, default in _CONNECTION_OPTIONS]
        wrapper.__signature__ = inspect.Signature(own + added)
        return wrapper

    return decorate


def default_config_dir() -> Path:
    """Where install keeps the token and TLS files: $DTS_CONFIG_DIR, else the user config dir."""
    if env := os.environ.get("DTS_CONFIG_DIR"):
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_config_dir("dts-util"))
