"""The run key: the Ed25519 key a monitor keeps in its run dir to sign what it vouches for.

It signs the run record (which model, which protocol) and every checkpoint manifest (which files, with which sha256).
Its fingerprint, the sha256 of the raw 32-byte public key in hex, is what the organiser hands out beside the initial
peers; a peer or a downloader that is given it trusts nothing signed by another key. Ed25519 (from `cryptography`,
already a dependency of hivemind) rather than the RSA keys hivemind uses for the DHT: signatures are 64 bytes and a
user without this project checks one with stock `openssl pkeyutl -verify -rawin`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

logger = logging.getLogger(__name__)
PUBLIC_HEX_CHARS = 64  # 32 raw bytes
SIGNATURE_HEX_CHARS = 128  # 64 raw bytes


class RunKey:
    """A run's signing key.

    Args:
        private_key: the Ed25519 private key.
    """

    def __init__(self, private_key: Ed25519PrivateKey):
        self._private_key = private_key
        raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_hex = raw.hex()
        self.fingerprint = fingerprint_of(self.public_hex)

    @classmethod
    def load_or_create(cls, path: str | Path) -> RunKey:
        """The key in `path` (PEM, PKCS#8), or a new one written there, readable by the owner only."""
        path = Path(path)
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError, OSError) as error:
                raise ValueError(f"{path} is not a run key ({error}); move it away to make a new one") from error
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 run key")
            return cls(key)
        key = Ed25519PrivateKey.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
        logger.info(f"Created the run key in {path} (fingerprint {fingerprint_of(cls(key).public_hex)})")
        return cls(key)

    def sign(self, message: bytes) -> str:
        """The hex Ed25519 signature of `message`."""
        return self._private_key.sign(message).hex()


def fingerprint_of(public_hex: str) -> str:
    """The fingerprint of a run key given as hex of its raw public key: sha256 of those 32 bytes, in hex."""
    return hashlib.sha256(bytes.fromhex(public_hex)).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """A fingerprint as typed by a user (spaces, a 'sha256:' prefix, upper case) in canonical form; ValueError."""
    cleaned = text.strip().lower().removeprefix("sha256:").replace(":", "").replace(" ", "")
    if len(cleaned) != 64 or any(char not in "0123456789abcdef" for char in cleaned):
        raise ValueError(f"a run key fingerprint is 64 hex digits (sha256), got {text!r}")
    return cleaned


def verify_signature(public_hex: str, message: bytes, signature_hex: str) -> bool:
    """True if `signature_hex` is the run key's signature of `message`; False for any malformed input."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        key.verify(bytes.fromhex(signature_hex), message)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
