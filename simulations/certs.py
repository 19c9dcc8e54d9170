"""Key material for a FedHydra deployment, made with the `cryptography` package (no openssl).

    CERTS/
      ca.crt, ca.key            a private certificate authority (self-signed, 10 years)
      server.pem, server.key    the SuperLink's TLS certificate, signed by the CA, with
                                SAN IP:127.0.0.1 and DNS:localhost (plus any extra hosts asked for)
      nodes/node-<i>            SuperNode i's authentication key: EC P-384, OpenSSH private key
      nodes/node-<i>.pub        its public key (OpenSSH), registered on the SuperLink with
                                `flwr supernode register`

Flower 1.41 verifies the SuperLink's certificate against `ca.crt` (SuperNodes'
`--root-certificates`, the CLI connection's `root-certificates`) and, with
`--enable-supernode-auth`, lets in only SuperNodes whose public key was registered through the
Control API; a SuperNode signs its requests with its private key.

Existing files are reused, so a folder given with `fedhydra deploy --certs DIR` keeps its CA
and node identities across runs. Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from fedhydra.common.files import write_atomic

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class ServerCerts:
    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    private: Path
    public: Path


def _write(path: Path, data: bytes, private: bool = False) -> None:
    write_atomic(path, data, mode=0o600 if private else 0o644)


def _san(hosts) -> list:
    from cryptography import x509

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def ensure_server_certs(folder: str | os.PathLike, hosts=DEFAULT_HOSTS) -> ServerCerts:
    """The CA and the SuperLink certificate in `folder`, generated when absent."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder).expanduser().resolve()
    out = ServerCerts(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    if out.ca_cert.is_file() and out.server_cert.is_file() and out.server_key.is_file():
        return out

    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    pem = serialization.Encoding.PEM
    no_pw = serialization.NoEncryption()

    if out.ca_cert.is_file() and (folder / "ca.key").is_file():
        ca_cert = x509.load_pem_x509_certificate(out.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedHydra deployment CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + _dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384())
        )
        _write(folder / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_pw), private=True)
        _write(out.ca_cert, ca_cert.public_bytes(pem))

    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedHydra SuperLink")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + _dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(out.server_key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_pw), private=True)
    _write(out.server_cert, cert.public_bytes(pem))
    return out


def ensure_node_key(folder: str | os.PathLike, name: str) -> NodeKey:
    """SuperNode `name`'s authentication key pair in `folder`/nodes, generated when absent."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    nodes = Path(folder).expanduser().resolve() / "nodes"
    out = NodeKey(nodes / name, nodes / f"{name}.pub")
    if out.private.is_file() and out.public.is_file():
        return out
    key = ec.generate_private_key(ec.SECP384R1())
    _write(out.private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()), private=True)
    _write(out.public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b" " + name.encode() + b"\n")
    return out
