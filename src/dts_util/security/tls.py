"""TLS material: a private CA, a server certificate and client certificates, made with ``cryptography``.

``dts-util tls init`` writes them into one folder:

- ``ca.pem`` / ``ca-key.pem``: the private certificate authority. Clients trust
  ``ca.pem`` (``--ca``); the key stays on the server machine.
- ``server.pem`` / ``server-key.pem``: for ``serve --tls-cert/--tls-key``; valid for
  localhost, this machine's host name and any ``--host`` given.
- ``client.pem`` / ``client-key.pem`` (with ``--client``): for mutual TLS
  (``serve --tls-client-ca ca.pem``; clients pass ``--client-cert/--client-key``).

Keys are ECDSA P-256 and are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

CA_DAYS, LEAF_DAYS = 3650, 825
FILES = {"ca": ("ca.pem", "ca-key.pem"), "server": ("server.pem", "server-key.pem"),
         "client": ("client.pem", "client-key.pem")}


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the files ``create_tls_files`` wrote."""

    folder: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path | None = None
    client_key: Path | None = None


def default_hosts() -> list[str]:
    """Names a server certificate should be valid for on this machine."""
    hosts = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    fqdn = socket.getfqdn()
    return list(dict.fromkeys([*hosts, fqdn]))


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _builder(subject_cn: str, issuer, public_key, days: int):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
            .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))


def _make_ca():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dts-util private CA")])
    cert = (_builder("dts-util private CA", name, key.public_key(), CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _san(hosts: list[str]):
    from cryptography import x509

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _make_leaf(ca_cert, ca_key, common_name: str, hosts: list[str] | None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if hosts is not None else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_builder(common_name, ca_cert.subject, key.public_key(), LEAF_DAYS)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if hosts is not None:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _load_ca(folder: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_name, key_name = FILES["ca"]
    cert = x509.load_pem_x509_certificate((folder / cert_name).read_bytes())
    key = serialization.load_pem_private_key((folder / key_name).read_bytes(), password=None)
    return cert, key


def create_tls_files(folder: Path, hosts: list[str], client: bool = False, force: bool = False) -> TlsFiles:
    """Write a CA (or reuse the one in ``folder``), a server certificate for ``hosts`` and, with
    ``client``, a client certificate; refuses to replace server files unless ``force``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = (folder / n for n in FILES["ca"])
    server_cert_path, server_key_path = (folder / n for n in FILES["server"])
    if server_cert_path.exists() and not force:
        raise FileExistsError(f"{server_cert_path} exists; pass --force to make new certificates")
    if ca_cert_path.exists() and ca_key_path.exists():
        ca_cert, ca_key = _load_ca(folder)  # keep the CA clients already trust
    else:
        ca_cert, ca_key = _make_ca()
        _write_private(ca_key_path, _key_pem(ca_key))
        _write_public(ca_cert_path, _cert_pem(ca_cert))
    cert, key = _make_leaf(ca_cert, ca_key, hosts[0], hosts)
    _write_private(server_key_path, _key_pem(key))
    _write_public(server_cert_path, _cert_pem(cert))
    files = TlsFiles(folder, ca_cert_path, server_cert_path, server_key_path)
    if client:
        client_cert_path, client_key_path = (folder / n for n in FILES["client"])
        cert, key = _make_leaf(ca_cert, ca_key, "dts-util client", None)
        _write_private(client_key_path, _key_pem(key))
        _write_public(client_cert_path, _cert_pem(cert))
        files = TlsFiles(folder, ca_cert_path, server_cert_path, server_key_path, client_cert_path, client_key_path)
    return files


def server_credentials(cert: Path, key: Path, client_ca: Path | None):
    """gRPC server credentials; with ``client_ca``, clients must present a certificate it signed."""
    import grpc

    from dts_util.errors import StartupError

    try:
        pair = (key.read_bytes(), cert.read_bytes())
        roots = client_ca.read_bytes() if client_ca is not None else None
    except OSError as exc:
        raise StartupError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
    for what, data in (("--tls-cert", pair[1]), ("--tls-key", pair[0]), ("--tls-client-ca", roots)):
        if data is not None and b"-----BEGIN" not in data:
            raise StartupError(f"{what} is not a PEM file")
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=roots is not None)
