"""Bearer tokens: where the server reads its token, how clients send it, how it is compared.

The token never travels through argv (``ps`` shows every process's arguments to
every user): the server reads it from a file that only its owner may read
(``--auth-token-file``, mode 0600) or from the ``DTS_AUTH_TOKEN`` environment
variable. Clients send ``authorization: Bearer <token>`` metadata; the server
compares it in constant time.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from dts_util.errors import StartupError

TOKEN_ENV = "DTS_AUTH_TOKEN"
METADATA_KEY = "authorization"
SCHEME = "Bearer "
# Long enough to be unguessable, short enough for any header.
MIN_TOKEN_CHARS, MAX_TOKEN_CHARS = 16, 4096


def _check_token(token: str, source: str) -> str:
    token = token.strip()
    if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
        raise StartupError(f"the token from {source} has {len(token)} characters; use {MIN_TOKEN_CHARS} to "
                           f"{MAX_TOKEN_CHARS} (`dts-util install` or `openssl rand -hex 32` makes one)")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise StartupError(f"the token from {source} must be printable ASCII without spaces")
    return token


def read_token_file(path: Path) -> str:
    """The token in ``path``; refuses a file that other users could read."""
    try:
        info = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise StartupError(f"cannot read the token file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise StartupError(f"the token file {path} is not text") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StartupError(f"the token file {path} can be read by other users (mode "
                           f"{stat.S_IMODE(info.st_mode):o}); run `chmod 600 {path}`")
    return _check_token(text, str(path))


def server_token(token_file: Path | None) -> str:
    """The server's token: from ``token_file``, else $DTS_AUTH_TOKEN, else "" (none configured)."""
    if token_file is not None:
        return read_token_file(token_file)
    if env := os.environ.get(TOKEN_ENV):
        return _check_token(env, f"${TOKEN_ENV}")
    return ""


def write_new_token(path: Path) -> str:
    """Create ``path`` holding a fresh random token, readable by its owner only."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.replace(tmp, path)
    return token


def authorization_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries ``token``."""
    return ((METADATA_KEY, SCHEME + token),)


class TokenChecker:
    """Checks the ``authorization`` metadata of a call against the server's token, in constant time."""

    def __init__(self, token: str) -> None:
        self._expected = (SCHEME + token).encode()

    def why_refused(self, metadata: tuple | None) -> str | None:
        """None when the call carries the token, else what is wrong (said without echoing what was sent)."""
        sent = [value for key, value in (metadata or ()) if key == METADATA_KEY]
        if not sent:
            return ("this server needs a token: send `authorization: Bearer <token>` metadata "
                    "(dts-util clients: --token or $DTS_AUTH_TOKEN)")
        value = sent[0].encode() if isinstance(sent[0], str) else bytes(sent[0])
        if len(sent) > 1 or not hmac.compare_digest(value, self._expected):
            return "the bearer token is not valid for this server"
        return None
