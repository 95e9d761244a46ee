"""Ed25519 signatures for device bundles (`pipeline pack --sign KEY`), through the optional `cryptography` package.

The signature covers SHA256SUMS, which lists the sha256 of every other file in the bundle, so one
changed byte anywhere makes either a checksum or the signature fail. The device runner verifies it
with `--verify-key PUB` (its own copy of the check: it imports nothing from `pipeline`).
Install with `pip install 'pipeline[sign]'`. Keys: `openssl genpkey -algorithm ed25519 -out key.pem`
and `openssl pkey -in key.pem -pubout -out key.pub.pem`, or `write_keypair` below.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError


class SigningError(PipelineError):
    """A signing key that cannot be read or used, or `cryptography` missing."""

    exit_code = 2


def _ed25519():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SigningError("signing needs the `cryptography` package: pip install 'pipeline[sign]'") from None
    return ed25519, serialization


def sign(data: bytes, key_path: Path) -> bytes:
    """The Ed25519 signature of `data` with the PEM private key at `key_path`."""
    try:  # the key first: a wrong path is the user's first thing to fix, with or without `cryptography`
        pem = Path(key_path).read_bytes()
    except OSError as exc:
        raise SigningError(f"{key_path}: cannot read the signing key: {exc.strerror}") from None
    ed25519, serialization = _ed25519()
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{key_path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningError(f"{key_path}: not an Ed25519 key ({type(key).__name__})")
    return key.sign(data)


def write_keypair(private: Path, public: Path) -> None:
    """A new Ed25519 key pair as PEM files (the private one unencrypted, mode 0600)."""
    ed25519, serialization = _ed25519()
    key = ed25519.Ed25519PrivateKey.generate()
    Path(private).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    Path(private).chmod(0o600)
    Path(public).write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
