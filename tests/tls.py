"""Certificates the tests make themselves: a CA, broker and client certificates.

Everything is written as files, the way an operator hands them to Kafka and to the
clients: PEM for the clients (CA, certificate, unencrypted PKCS#8 key) and a PKCS#12
keystore for the broker, which Java reads without conversion.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEYSTORE_PASSWORD = "keystore-secret"


@dataclass(frozen=True, slots=True)
class Issued:
    cert: Path  # PEM: the certificate, then the CA's
    key: Path  # PEM: unencrypted PKCS#8
    keystore: Path  # PKCS#12 of both, protected by KEYSTORE_PASSWORD


class TestCA:
    """A self-signed CA under `root`; `issue` signs certificates for brokers and clients."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, root: Path, name: str = "captionstream test CA") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_file = root / "ca.pem"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, *, server: bool) -> Issued:
        """A certificate for `common_name`: a broker's names 127.0.0.1 and localhost."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            names: list[x509.GeneralName] = [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        base = self.root / common_name.replace(" ", "-")
        issued = Issued(
            cert=base.with_suffix(".crt.pem"),
            key=base.with_suffix(".key.pem"),
            keystore=base.with_suffix(".p12"),
        )
        pem = serialization.Encoding.PEM
        issued.cert.write_bytes(cert.public_bytes(pem) + self.cert.public_bytes(pem))
        issued.key.write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        issued.keystore.write_bytes(
            pkcs12.serialize_key_and_certificates(
                common_name.encode(),
                key,
                cert,
                [self.cert],
                serialization.BestAvailableEncryption(KEYSTORE_PASSWORD.encode()),
            )
        )
        return issued


def keystore_properties(issued: Issued, ca: TestCA) -> dict[str, str]:
    """A broker listener's TLS settings: its keystore, and the CA it trusts for clients."""
    return {
        "ssl.keystore.type": "PKCS12",
        "ssl.keystore.location": str(issued.keystore),
        "ssl.keystore.password": KEYSTORE_PASSWORD,
        "ssl.key.password": KEYSTORE_PASSWORD,
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(ca.cert_file),
    }
