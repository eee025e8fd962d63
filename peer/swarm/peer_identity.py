"""A peer's libp2p identity key, and the proof that a join request comes from the peer id it names.

A closed run's access token binds a libp2p peer id to the RSA key that signs the peer's DHT records, and the monitor
keys its members' votes (monitor/revocation.py) and the dashboard's suspicion column by that binding. A join request
therefore proves both halves: a signature by the RSA key it names, and one by the identity key whose hash is the peer
id it names (the identity's public key travels with the request: an RSA peer id is only its hash). Without them a
member holding the run secret could claim another member's key or peer id, and take over that member's votes.

Identity files are what hivemind's ``P2P.generate_identity`` writes: a libp2p ``PrivateKey`` protobuf around an RSA
key in DER.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

import multihash
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.protobuf.message import DecodeError
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

# the scheme hivemind's RSAPrivateKey signs with (PSS, SHA-256), so either kind of key signs a join the same way
PADDING = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
MAX_KEY_BYTES = 2048  # a 4096-bit RSA public key's protobuf is ~550 bytes


class PeerIdentity:
    """The RSA key of a libp2p identity: its peer id, its public key as libp2p encodes it, and signatures."""

    def __init__(self, private_key: rsa.RSAPrivateKey):
        self._private_key = private_key

    @classmethod
    def load(cls, path: str | Path) -> PeerIdentity:
        """The identity in a file hivemind wrote (ValueError naming the file if it holds no RSA identity)."""
        try:
            stored = crypto_pb2.PrivateKey.FromString(Path(path).read_bytes())
            if stored.key_type != crypto_pb2.KeyType.RSA:
                raise ValueError(f"key type {stored.key_type}, not RSA")
            key = serialization.load_der_private_key(stored.data, password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise TypeError(f"a {type(key).__name__}, not RSA")
        except (DecodeError, ValueError, TypeError) as error:
            raise ValueError(f"{path} is not a libp2p RSA identity file: {error}") from error
        return cls(key)

    @classmethod
    def generate(cls) -> PeerIdentity:
        """A throwaway identity (a downloader's, which never runs a DHT)."""
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @property
    def public_key(self) -> bytes:
        """The libp2p ``PublicKey`` protobuf: what the peer id is the SHA-256 multihash of."""
        der = self._private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()

    @property
    def peer_id(self) -> PeerID:
        return peer_id_of(self.public_key)

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self._private_key.sign(message, PADDING, hashes.SHA256())).decode()


def peer_id_of(public_key: bytes) -> PeerID:
    """The libp2p peer id of an RSA public key protobuf (hivemind's PeerID.from_identity, from the public half)."""
    return PeerID(multihash.encode(hashlib.sha256(public_key).digest(), "sha2-256"))


def peer_proof_problem(peer_id: str, encoded_key: str, message: bytes, signature: str) -> str | None:
    """Why ``signature`` does not prove that ``message`` comes from ``peer_id`` (whose public key protobuf is
    ``encoded_key``, base64), or None if it does."""
    try:
        public_key = base64.b64decode(encoded_key, validate=True)
        if len(public_key) > MAX_KEY_BYTES:
            return "'peer_key' is too long"
        if peer_id_of(public_key).to_base58() != peer_id:
            return f"'peer_key' is not the key of peer id {peer_id}"
        stored = crypto_pb2.PublicKey.FromString(public_key)
        if stored.key_type != crypto_pb2.KeyType.RSA:
            return "'peer_key' is not an RSA key (this monitor admits hivemind's RSA identities)"
        key = serialization.load_der_public_key(stored.data)
        if not isinstance(key, rsa.RSAPublicKey):
            return "'peer_key' is not an RSA key"
        key.verify(base64.b64decode(signature, validate=True), message, PADDING, hashes.SHA256())
    except (binascii.Error, DecodeError, ValueError, TypeError):
        return "'peer_key' or 'peer_signature' is malformed"
    except InvalidSignature:
        return f"'peer_signature' is not a signature of this request by the key of peer id {peer_id}"
    return None
