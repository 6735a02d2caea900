"""TLS commands: a private CA, a server certificate, client certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dts_util.cli.common import default_config_dir, fail, out, tls_app


@tls_app.command("init")
def tls_init(
    out_dir: Annotated[Optional[Path], typer.Option("--dir", help="Folder for the PEM files.",
                                                    show_default="<config dir>/tls")] = None,
    host: Annotated[Optional[list[str]], typer.Option(help="Host name or IP address the server certificate is "
                                                           "valid for; repeatable.",
                                                      show_default="localhost, 127.0.0.1, ::1, this host's names")]
    = None,
    client: Annotated[bool, typer.Option(help="Also make a client certificate for mutual TLS.")] = False,
    force: Annotated[bool, typer.Option(help="Replace existing server (and client) certificates.")] = False,
) -> None:
    """Create a private CA and a server certificate (plus a client one with --client) using `cryptography`."""
    from dts_util.security.tls import create_tls_files, default_hosts

    folder = out_dir or default_config_dir() / "tls"
    hosts = list(dict.fromkeys([*(host or []), *default_hosts()]))
    try:
        files = create_tls_files(folder, hosts, client=client, force=force)
    except (OSError, ValueError) as exc:
        raise fail(str(exc))
    out.print(f"wrote a CA and a server certificate for {', '.join(hosts)} to {folder}")
    out.print(f"server:  dts-util serve --tls-cert {files.server_cert} --tls-key {files.server_key}"
              + (f" --tls-client-ca {files.ca_cert}" if client else ""))
    mutual = f" --client-cert {files.client_cert} --client-key {files.client_key}" if client else ""
    out.print(f"clients: dts-util test --host <server> --ca {files.ca_cert}{mutual}  (copy ca.pem to each client)")
