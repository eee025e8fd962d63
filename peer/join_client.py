"""Closed runs: a peer asks the monitor for an access token over HTTP, proving a run secret or a join key."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import multihash
from hivemind.p2p import PeerID
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from peer.access_tokens import decode_token, encode_token, join_message, read_private_key, read_secrets, verify_token

JOIN_TIMEOUT = 5.0  # seconds for one HTTP join request: the DHT waits on it, so it must stay short


class JoinRefused(RuntimeError):
    """The monitor answered and refused to admit this peer (wrong credential, open run, changed authority)."""


class JoinUnavailable(OSError):
    """The monitor did not answer a join request (down, unreachable, timed out, not a monitor)."""


@dataclass
class JoinCredential:
    """What a peer proves to the monitor to be admitted: a shared run secret or an allowlisted join key.

    Args:
        secret_file: file whose first secret line is the run secret; re-read at every request (rotation).
        join_key_file: RSA private key whose public key is in the monitor's allowlist.
    """

    secret_file: str | None = None
    join_key_file: str | None = None

    def proof(self, message: bytes) -> dict:
        """The credential's fields of a join request; the secret itself never leaves the peer."""
        if self.secret_file:
            secret = read_secrets(self.secret_file)[0]
            return {"hmac": hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()}
        key = read_private_key(self.join_key_file)
        return {"join_key": key.get_public_key().to_bytes().decode(), "signature": key.sign(message).decode()}


class JoinClient:
    """Asks the monitor (POST {join_url}/api/join) for an access token of this process's key and peer id.

    Thread-safe and usable from the DHT's process (after fork). The first answer pins the authority's key: a later
    answer signed by another key (the monitor lost its run dir) is refused, as other peers would not accept it.

    Args:
        join_url: the monitor's HTTP address, e.g. http://monitor:8080.
        credential: how this peer proves it may join.
        peer_id: this peer's libp2p id, which the token names.
        private_key: the RSA key the token names (default: this process's hivemind key, which signs DHT requests).
    """

    def __init__(self, join_url: str, credential: JoinCredential, peer_id: PeerID, private_key=None):
        self.url = join_url.rstrip("/") + "/api/join"
        self.credential, self.peer_id = credential, peer_id.to_base58()
        self.public_key = (private_key or RSAPrivateKey.process_wide()).get_public_key().to_bytes()
        self.authority_key: RSAPublicKey | None = None
        self.ttl: float | None = None

    def __call__(self) -> AccessToken:
        timestamp = int(time.time())
        body = {"peer_id": self.peer_id, "public_key": self.public_key.decode(), "timestamp": timestamp}
        body.update(self.credential.proof(join_message(self.public_key, self.peer_id, timestamp)))
        answer = self._post(body)
        try:
            token, authority_key = (
                decode_token(answer["token"]),
                RSAPublicKey.from_bytes(answer["authority_key"].encode()),
            )
            ttl = float(answer["ttl"])
        except (KeyError, TypeError, ValueError) as error:
            raise JoinUnavailable(f"{self.url} did not answer like an albert-swarm monitor: {error!r}") from error
        if self.authority_key is not None and authority_key.to_bytes() != self.authority_key.to_bytes():
            raise JoinRefused("the monitor's authority key changed (did it lose its run dir?): restart this peer")
        if (
            token.username != self.peer_id
            or token.public_key != self.public_key
            or not verify_token(token, authority_key)
        ):
            raise JoinRefused("the monitor answered with a token that is not valid for this peer")
        self.authority_key, self.ttl = authority_key, ttl
        return token

    def _post(self, body: dict) -> dict:
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=JOIN_TIMEOUT) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise JoinRefused(_http_error_reason(error)) from error
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise JoinUnavailable(f"the monitor at {self.url} did not answer: {error}") from error


def _http_error_reason(error: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(error.read()).get("detail")
    except (ValueError, AttributeError, OSError):
        detail = None
    return f"{detail or error.reason} (HTTP {error.code})"


def http_access_token(monitor_url: str, credential: JoinCredential) -> str:
    """An access token for the HTTP API of a closed run (checkpoints, per-peer rows, history), as a header value.

    Downloaders are not swarm members: they join with a throwaway key and peer id, and send the token they get as
    ``Authorization: Bearer TOKEN``. JoinRefused / JoinUnavailable as for a peer's join.
    """
    key = RSAPrivateKey()
    digest = multihash.encode(hashlib.sha256(key.get_public_key().to_bytes()).digest(), "sha2-256")
    client = JoinClient(monitor_url, credential, PeerID(digest), private_key=key)
    return "Bearer " + encode_token(client())
