"""Generate the TLS and SuperNode-authentication material a Flower 1.41 deployment needs.

Writes, with ``cryptography`` only (no openssl):

- ``ca.pem`` / ``ca.key``: a self-signed certificate authority;
- ``superlink.pem`` / ``superlink.key``: the SuperLink server certificate, signed by the
  CA, with the given subject alternative names (``flower-superlink --ssl-ca-certfile
  ca.pem --ssl-certfile superlink.pem --ssl-keyfile superlink.key``);
- ``sites/NAME/auth.key`` / ``sites/NAME/auth.pub``: one EC P-384 key pair per site in
  OpenSSH format, the format ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` accept (flwr checks for an EC key on a NIST curve);
- ``superexec.secret``: the shared secret of the SuperLink and a separate ServerApp
  executor (``flower-superexec --superexec-auth-secret-file``, process isolation).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedadapt import atomic
from fedadapt.layout import (AUTH_KEY, AUTH_PUB, CA_CERT, CA_KEY, SITES_DIR, SUPEREXEC_SECRET,
                             SUPERLINK_CERT, SUPERLINK_KEY)

DEFAULT_SANS = ("localhost", "127.0.0.1")
_SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class CertPaths:
    """Where ``generate`` wrote its files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    site_keys: dict  # site name -> (private key path, public key path)
    superexec_secret: Path | None = None


def _validate(sites: tuple[str, ...], sans: tuple[str, ...], days: int) -> None:
    if not sites:
        raise ValueError("sites: give at least one site name, e.g. --sites a,b,c")
    for s in sites:
        if not _SITE_RE.match(s):
            raise ValueError(f"sites: {s!r} is not a valid site name; use letters, digits, "
                             "'-', '_' or '.'")
    if len(set(sites)) != len(sites):
        raise ValueError(f"sites: duplicate names in {list(sites)}")
    if not sans:
        raise ValueError("san: give at least one subject alternative name, e.g. localhost")
    if days < 1:
        raise ValueError(f"days: must be >= 1, got {days}")


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    atomic.write_bytes(path, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()), mode=0o600)


def generate(out_dir: str | Path, sites: tuple[str, ...], sans: tuple[str, ...] = DEFAULT_SANS,
             days: int = 365) -> CertPaths:
    """Create a CA, a SuperLink certificate with ``sans`` and one auth key pair per site.

    Raises:
        ValueError: on an empty/invalid site list, no SANs or a non-positive validity.
    """
    sites, sans = tuple(sites), tuple(sans)
    _validate(sites, sans, days)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    start, end = now - _dt.timedelta(minutes=5), now + _dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedadapt CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                            False, False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))

    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
                .issuer_name(ca_name).public_key(srv_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName([_san_entry(s) for s in sans]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))

    paths = CertPaths(out / CA_CERT, out / CA_KEY, out / SUPERLINK_CERT,
                      out / SUPERLINK_KEY, {}, out / SUPEREXEC_SECRET)
    atomic.write_text(paths.superexec_secret, secrets.token_hex(32), mode=0o600)
    atomic.write_bytes(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths.ca_key, ca_key)
    atomic.write_bytes(paths.server_cert, srv_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths.server_key, srv_key)

    for site in sites:
        d = out / SITES_DIR / site
        d.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP384R1())
        priv, pub = d / AUTH_KEY, d / AUTH_PUB
        atomic.write_bytes(priv, key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()), mode=0o600)
        atomic.write_bytes(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                              serialization.PublicFormat.OpenSSH)
                           + f" fedadapt-{site}\n".encode())
        paths.site_keys[site] = (priv, pub)
    return paths
