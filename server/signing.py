"""Ed25519 keys and signatures for release bundles (RFC 8032, via ``cryptography``).

The private key is a PEM file (PKCS#8, unencrypted) created with mode 0600; the public
key is a PEM file beside it (``<key>.pub``). A signature is over the exact bytes of a
file, so nothing is re-serialised between signing and verifying.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class SigningError(ValueError):
    """A key file is missing, unreadable or not an Ed25519 key."""


def public_path(private_key: str | Path) -> Path:
    """Where the public key of ``private_key`` is kept: ``<private key>.pub``."""
    p = Path(private_key)
    return p.with_name(p.name + ".pub")


def generate_key(path: str | Path) -> Path:
    """Write a new Ed25519 private key (mode 0600) and its public key (``.pub``).

    Raises:
        SigningError: If ``path`` exists already (a key is never overwritten).
    """
    path = Path(path)
    if path.exists():
        raise SigningError(f"key file {path} exists; refusing to overwrite a signing key "
                           f"(choose another path or delete it yourself)")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)  # whatever the umask
    public_path(path).write_bytes(public_pem(key.public_key()))
    return path


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def public_raw_hex(key: Ed25519PublicKey) -> str:
    """The 32 raw public-key bytes in hex (what a manifest names its signer by)."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key PEM.

    Raises:
        SigningError: If the file is missing, group/world-readable, or not Ed25519.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"signing key {path} is unreadable ({exc}); create one with "
                           f"`fedadapt release keygen {path}`") from exc
    if os.stat(path).st_mode & 0o077:
        raise SigningError(f"signing key {path} is readable by others (mode "
                           f"{oct(os.stat(path).st_mode & 0o777)}); run `chmod 600 {path}`")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} holds a {type(key).__name__}, expected an Ed25519 key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key PEM (or the public half of a private key PEM).

    Raises:
        SigningError: If the file is missing or not an Ed25519 key.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"public key {path} is unreadable ({exc})") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        return load_private_key(path).public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path} holds a {type(key).__name__}, expected an Ed25519 key")
    return key


def public_key_from_hex(raw_hex: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(raw_hex))
    except ValueError as exc:
        raise SigningError(f"not a 32-byte Ed25519 public key in hex: {raw_hex!r}") from exc


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


def verify(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is ``key``'s signature of ``data``."""
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
