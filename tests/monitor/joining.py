"""Join requests as peer/swarm/join_client.py posts them, built in memory: a secret or a join key, without files."""

from __future__ import annotations

import hashlib
import hmac

from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from peer.swarm.join_client import claim_body, join_request
from peer.swarm.peer_identity import PeerIdentity


class SecretCredential:
    """JoinCredential's proof with the run secret held in memory."""

    def __init__(self, secret: str):
        self.secret = secret

    def proof(self, message: bytes) -> dict:
        return {"hmac": hmac.new(self.secret.encode(), message, hashlib.sha256).hexdigest()}


class JoinKeyCredential:
    """JoinCredential's proof with an allowlisted join key held in memory."""

    def __init__(self, join_key: RSAPrivateKey):
        self.join_key = join_key

    def proof(self, message: bytes) -> dict:
        public_key = self.join_key.get_public_key().to_bytes().decode()
        return {"join_key": public_key, "signature": self.join_key.sign(message).decode()}


def signed_join(identity: PeerIdentity, key: RSAPrivateKey, credential) -> dict:
    """A join request of ``identity``'s peer id and ``key``, proving ``credential`` and both keys, stamped now."""
    return join_request(credential, identity, key, int(get_dht_time()))


def forged_join(signer: PeerIdentity, key: RSAPrivateKey, secret: str, public_key: bytes, peer_id: str) -> dict:
    """A member holding the run secret claims ``public_key`` and ``peer_id`` (another member's), signing with the keys
    it holds: the HMAC is right, a proof of a key it does not hold cannot be."""
    return claim_body(SecretCredential(secret), public_key, peer_id, int(get_dht_time()), key, signer)
