"""Throwaway certificates for TLS tests, made with the `openssl` command line tool."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_DAYS = "2"


@dataclass(frozen=True)
class Certificates:
    """A CA, a server certificate for 127.0.0.1 signed by it, and a client certificate."""

    cacert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def client_certificate(
    directory: Path, certificates: Certificates, stem: str, *, common_name: str | None
) -> tuple[Path, Path]:
    """Another client certificate from the CA of `certificates` (made in `directory`), with
    the Common Name given or none at all (its subject then names only an organization)."""
    ca_key = certificates.cacert.with_name(certificates.cacert.name.replace("-ca.pem", "-ca.key"))
    subject = f"/CN={common_name}" if common_name else f"/O={stem}"
    return _signed(directory, stem, ca_key, certificates.cacert, server=False, subject=subject)


def make_certificates(directory: Path, name: str = "test") -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, cacert = directory / f"{name}-ca.key", directory / f"{name}-ca.pem"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", _DAYS,
        "-keyout", ca_key, "-out", cacert, "-subj", f"/CN={name} test CA",
    )  # fmt: skip
    server_cert, server_key = _signed(directory, f"{name}-server", ca_key, cacert, server=True)
    client_cert, client_key = _signed(directory, f"{name}-client", ca_key, cacert, server=False)
    return Certificates(cacert, server_cert, server_key, client_cert, client_key)


def _signed(
    directory: Path,
    stem: str,
    ca_key: Path,
    cacert: Path,
    *,
    server: bool,
    subject: str | None = None,
) -> tuple[Path, Path]:
    key, request, cert = (directory / f"{stem}.{ext}" for ext in ("key", "csr", "pem"))
    extensions = directory / f"{stem}.ext"
    # etcd's JSON gateway dials etcd's own gRPC port with the server certificate as its client
    # certificate, so with client-cert-auth on, the server certificate must serve as both.
    usage = "serverAuth, clientAuth" if server else "clientAuth"
    names = "subjectAltName = IP:127.0.0.1, DNS:localhost\n" if server else ""
    extensions.write_text(f"extendedKeyUsage = {usage}\n{names}")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", request,
        "-subj", subject or f"/CN={stem}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", request, "-CA", cacert, "-CAkey", ca_key, "-CAcreateserial",
        "-days", _DAYS, "-out", cert, "-extfile", extensions,
    )  # fmt: skip
    return cert, key


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)
