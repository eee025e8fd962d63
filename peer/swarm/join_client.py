"""Closed runs: a peer asks the monitor for an access token over HTTP, proving a run secret or a join key.

The monitor's answer carries its clock, so a peer learns at admission that its clock is off, with the figure, rather
than later from other members refusing its requests as "without a valid access token".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from peer.swarm.access_tokens import (
    decode_token,
    encode_token,
    join_message,
    read_private_key,
    read_secrets,
    verify_token,
)
from peer.swarm.clock import MAX_CLOCK_SKEW
from peer.swarm.peer_identity import PeerIdentity

logger = logging.getLogger(__name__)
JOIN_TIMEOUT = 5.0  # seconds for one HTTP join request: the DHT waits on it, so it must stay short
SKEW_WARNING = 5.0  # seconds of clock skew worth telling the operator about; tokens still work
# Members check each other's request times to within 60 s (hivemind's TokenAuthorizerBase): two peers each within
# half that of the monitor's clock are within it of each other, whichever way their clocks are off.
SKEW_LIMIT = MAX_CLOCK_SKEW / 2
SYNC_ADVICE = "synchronize this machine's clock (NTP, e.g. timedatectl set-ntp true)"


class JoinRefused(RuntimeError):
    """The monitor answered and refused to admit this peer (wrong credential, open run, changed authority)."""


class JoinUnavailable(OSError):
    """The monitor did not answer a join request (down, unreachable, timed out, not a monitor)."""


class ClockSkewed(JoinRefused):
    """This machine's clock is so far from the monitor's that other members would refuse this peer's requests."""


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


def join_request(
    credential: JoinCredential, identity: PeerIdentity, private_key: RSAPrivateKey, timestamp: int
) -> dict:
    """The body of POST /api/join: the RSA key and peer id the token is to name, the time, the credential's proof,
    and the proofs that the sender holds both keys (peer/swarm/peer_identity.py says why)."""
    public_key, peer_id = private_key.get_public_key().to_bytes(), identity.peer_id.to_base58()
    return claim_body(credential, public_key, peer_id, timestamp, private_key, identity)


def claim_body(
    credential, public_key: bytes, peer_id: str, timestamp: int, private_key: RSAPrivateKey, identity: PeerIdentity
) -> dict:
    """A join body claiming ``public_key`` and ``peer_id``, its proofs signed by ``private_key`` and ``identity``. An
    honest peer claims the keys it signs with (join_request); tests forge a claim of another peer's keys with it."""
    message = join_message(public_key, peer_id, timestamp)
    return {
        "peer_id": peer_id,
        "public_key": public_key.decode(),
        "timestamp": timestamp,
        **credential.proof(message),
        "key_signature": private_key.sign(message).decode(),
        "peer_key": base64.b64encode(identity.public_key).decode(),
        "peer_signature": identity.sign(message),
    }


class JoinClient:
    """Asks the monitor (POST {join_url}/api/join) for an access token of this process's key and peer id.

    Thread-safe and usable from the DHT's process (after fork). The first answer pins the authority's key: a later
    answer signed by another key (the monitor lost its run dir) is refused, as other peers would not accept it.

    Args:
        join_url: the monitor's HTTP address, e.g. http://monitor:8080.
        credential: how this peer proves it may join.
        identity: this peer's libp2p identity, whose peer id the token names.
        private_key: the RSA key the token names (default: this process's hivemind key, which signs DHT requests).
        clock: this machine's clock (unix seconds); tests give it an offset to play a skewed machine.
    """

    def __init__(
        self,
        join_url: str,
        credential: JoinCredential,
        identity: PeerIdentity,
        private_key: RSAPrivateKey | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.url = join_url.rstrip("/") + "/api/join"
        self.credential, self.identity, self.clock = credential, identity, clock
        self.peer_id = identity.peer_id.to_base58()
        self.private_key = private_key or RSAPrivateKey.process_wide()
        self.public_key = self.private_key.get_public_key().to_bytes()
        self.authority_key: RSAPublicKey | None = None
        self.ttl: float | None = None
        self.skew: float | None = None  # the monitor's clock minus this one, as of the last answer
        self._warned_skew: float | None = None

    def __call__(self) -> AccessToken:
        sent_at = self.clock()
        answer = self._post(join_request(self.credential, self.identity, self.private_key, int(sent_at)))
        received_at = self.clock()
        try:
            token, authority_key = (
                decode_token(answer["token"]),
                RSAPublicKey.from_bytes(answer["authority_key"].encode()),
            )
            ttl = float(answer["ttl"])
        except (KeyError, TypeError, ValueError) as error:
            raise JoinUnavailable(f"{self.url} did not answer like an albert-swarm monitor: {error!r}") from error
        self._check_clock(answer, sent_at, received_at)  # first: a skewed clock also makes the token look expired
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

    def _check_clock(self, answer: dict, sent_at: float, received_at: float) -> None:
        """Compare the monitor's clock with this one: warn past SKEW_WARNING, refuse past SKEW_LIMIT (ClockSkewed).

        The monitor read its clock somewhere within the round trip, so the skew is known to within half of it: only
        the part that is certain counts, and a slow answer never makes a good clock look skewed.
        """
        monitor_time = answer.get("monitor_time") if isinstance(answer, dict) else None
        if (
            not isinstance(monitor_time, (int, float))
            or isinstance(monitor_time, bool)
            or not math.isfinite(monitor_time)
        ):
            return  # a monitor from before the field existed: its join check still bounds the skew to 60 s
        round_trip = max(received_at - sent_at, 0.0)
        self.skew = monitor_time - (sent_at + received_at) / 2
        certain = max(abs(self.skew) - round_trip / 2, 0.0)
        direction = "behind" if self.skew > 0 else "ahead of"
        figure = f"this machine's clock is {abs(self.skew):.1f} s {direction} the monitor's"
        if certain > SKEW_LIMIT:
            raise ClockSkewed(
                f"{figure} (measured over a {round_trip * 1000:.0f} ms round trip); members refuse requests more "
                f"than {MAX_CLOCK_SKEW:.0f} s off their own clock, so over {SKEW_LIMIT:.0f} s of skew other peers "
                f"would refuse this one as 'without a valid access token': {SYNC_ADVICE} and start this peer again"
            )
        if certain <= SKEW_WARNING:
            if self._warned_skew is not None:
                logger.info(f"This machine's clock is back within {SKEW_WARNING:.0f} s of the monitor's")
            self._warned_skew = None
        elif self._warned_skew is None or abs(self.skew - self._warned_skew) >= 1.0:  # once per change
            self._warned_skew = self.skew
            logger.warning(f"{figure}: tokens still work up to {SKEW_LIMIT:.0f} s of skew, but {SYNC_ADVICE}")

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

    Downloaders are not swarm members: they join with a throwaway key and identity, and send the token they get as
    ``Authorization: Bearer TOKEN``. JoinRefused / JoinUnavailable as for a peer's join.
    """
    client = JoinClient(monitor_url, credential, PeerIdentity.generate(), private_key=RSAPrivateKey())
    return "Bearer " + encode_token(client())
