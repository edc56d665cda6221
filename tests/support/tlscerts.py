"""Test certificates made at test time with `cryptography` (an asyncssh dependency): a CA, a
server certificate it signs, and self-signed ones; ECDSA P-256, PEM files, keys mode 0600."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Issued:
    cert: Path
    key: Path
    der: bytes

    @property
    def sha256(self) -> bytes:
        import hashlib

        return hashlib.sha256(self.der).digest()


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Issued:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return Issued(cert_path, key_path, cert.public_bytes(serialization.Encoding.DER))


def make_cert(
    directory: Path,
    stem: str,
    *,
    names: tuple[str, ...] = ("exit.test",),
    ips: tuple[str, ...] = ("127.0.0.1",),
    issuer: Optional[Issued] = None,
    ca: bool = False,
) -> Issued:
    """A certificate for ``names``/``ips`` signed by ``issuer`` (None: self-signed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    if issuer is None:
        issuer_name, signing_key = _name(stem), key
    else:
        issuer_cert = x509.load_pem_x509_certificate(issuer.cert.read_bytes())
        loaded = serialization.load_pem_private_key(issuer.key.read_bytes(), None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        issuer_name, signing_key = issuer_cert.subject, loaded
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(stem))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    else:
        alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        alt += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(signing_key, hashes.SHA256())
    return _write(directory, stem, cert, key)


@dataclass
class Pki:
    """A CA, a server certificate it issued, and an unrelated CA (the wrong one)."""

    ca: Issued
    server: Issued
    other_ca: Issued
    self_signed: Issued


def make_pki(directory: Path) -> Pki:
    ca = make_cert(directory, "ca", ca=True)
    server = make_cert(directory, "exit", issuer=ca)
    other = make_cert(directory, "other-ca", ca=True)
    self_signed = make_cert(directory, "self-signed")
    return Pki(ca, server, other, self_signed)
