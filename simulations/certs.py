"""Key material for a FedHydra deployment, made with the `cryptography` package (no openssl).

    CERTS/
      ca.crt, ca.key            a private certificate authority (self-signed, 10 years)
      server.pem, server.key    the SuperLink's (and its public front's) TLS certificate, signed by the CA,
                                with SAN IP:127.0.0.1, DNS:localhost and every public host asked for (a
                                host missing from an existing certificate gets a new one from the same CA)
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
        if set(hosts) <= set(san_hosts(out.server_cert)):
            return out
        if not (folder / "ca.key").is_file():
            raise ValueError(f"{out.server_cert} does not name {sorted(set(hosts) - set(san_hosts(out.server_cert)))} "
                             f"and {folder / 'ca.key'} is missing to issue one that does")
        # A new public host: a new server certificate from the same CA (devices keep their ca.crt).

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


def san_hosts(cert_path: str | os.PathLike) -> list[str]:
    """The IP addresses and DNS names in a certificate's SubjectAlternativeName."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)


def write_node_key(private: str | os.PathLike, comment: str) -> NodeKey:
    """A new EC P-384 key pair for SuperNode authentication: `private` (OpenSSH, mode 0600) and `private`.pub
    (OpenSSH, with `comment`). Refuses to overwrite an existing key: a device's identity is its key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = Path(private).expanduser().resolve()
    out = NodeKey(private, private.with_name(private.name + ".pub"))
    for path in (out.private, out.public):
        if path.exists():
            raise FileExistsError(f"{path} exists: a device keeps its key (delete it to make a new identity)")
    key = ec.generate_private_key(ec.SECP384R1())
    _write(out.private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()), private=True)
    _write(out.public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b" " + comment.encode() + b"\n")
    return out


def ensure_node_key(folder: str | os.PathLike, name: str) -> NodeKey:
    """SuperNode `name`'s authentication key pair in `folder`/nodes, generated when absent."""
    nodes = Path(folder).expanduser().resolve() / "nodes"
    out = NodeKey(nodes / name, nodes / f"{name}.pub")
    if out.private.is_file() and out.public.is_file():
        return out
    out.public.unlink(missing_ok=True)  # half a pair (a crash between the two writes) is made again
    out.private.unlink(missing_ok=True)
    return write_node_key(out.private, name)
