"""Closed runs, peer side: the DHT's token authorizer, this peer's entry in the run's member list, and admission.

Run ``python -m peer.swarm.access new-join-key PATH`` to create a join key and print its allowlist line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import hivemind
from hivemind.p2p import PeerID
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import get_dht_time
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from peer.swarm.access_tokens import (
    RateLimitedWarning,
    identity_peer_id,
    members_key,
    read_private_key,
    token_expiry,
    verify_token,
    write_private_key,
)
from peer.swarm.clock import MAX_CLOCK_SKEW
from peer.swarm.join_client import JoinClient, JoinCredential, JoinRefused, JoinUnavailable
from peer.swarm.peer_identity import PeerIdentity
from peer.swarm.progress import local_public_key

logger = logging.getLogger(__name__)
RETRY_PERIOD = 5.0  # seconds between two attempts to renew a token while the monitor does not answer
# a token is renewed when less than half of its lifetime is left: a slow monitor or DHT (a loaded machine) then
# still has time before other members stop accepting it
REFRESH_FRACTION = 1 / 2


class RunAuthorizer(TokenAuthorizerBase):
    """hivemind's DHT authorizer for a closed run: every DHT request and response carries an authority-signed token.

    It runs inside the DHT's process. A token is renewed once less than half of its lifetime is left; while the
    monitor does not answer, the current token is used until it expires (with a retry every few seconds, so DHT
    requests never wait on the monitor each time).

    Args:
        run_id: the run's name (for log lines).
        authority_key: the run authority's public key (from the monitor's join answer).
        fetch_token: returns a fresh token of this process's key (a JoinClient, or the monitor's own Authority).
        first_token: the token received at admission, used until it needs renewal.
        refresh_margin: renew when fewer than this many seconds of validity are left.
    """

    def __init__(
        self,
        run_id: str,
        authority_key: RSAPublicKey,
        fetch_token: Callable[[], AccessToken],
        first_token: AccessToken,
        refresh_margin: float,
    ):
        super().__init__()
        self.run_id, self.authority_key, self.fetch_token = run_id, authority_key, fetch_token
        self.refresh_margin = refresh_margin
        self._local_access_token = first_token
        self._retry_at = 0.0
        self._refusals = RateLimitedWarning(logger)

    async def get_token(self) -> AccessToken:
        current = self._local_access_token
        usable = current is not None and self.is_token_valid(current)
        if usable and time.monotonic() < self._retry_at:
            return current
        try:
            return await asyncio.to_thread(self.fetch_token)
        except (JoinRefused, JoinUnavailable) as error:
            self._retry_at = time.monotonic() + RETRY_PERIOD
            if not usable:
                raise PermissionError(f"this peer's access token of run {self.run_id!r} expired: {error}") from error
            logger.warning(f"Could not renew the access token of run {self.run_id!r} (still valid for now): {error}")
            return current

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return verify_token(access_token, self.authority_key)

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        try:
            return token_expiry(access_token) - get_dht_time() < self.refresh_margin
        except ValueError:
            return True

    async def validate_request(self, request) -> bool:
        skew = request.auth.time - get_dht_time()
        valid = await super().validate_request(request)
        if valid:
            return valid
        # hivemind refuses a request from a skewed clock like one without a token: say which it was
        if abs(skew) > MAX_CLOCK_SKEW and self.is_token_valid(request.auth.client_access_token):
            direction = "ahead of" if skew > 0 else "behind"
            self._refusals(
                "clock",
                f"Refused a DHT request of a member of run {self.run_id!r} whose clock is {abs(skew):.0f} s "
                f"{direction} this one (at most {MAX_CLOCK_SKEW:.0f} s allowed): synchronize the clocks (NTP)",
            )
        else:
            self._refusals(
                "dht", f"Refused a DHT request from a process without a valid access token of run {self.run_id!r}"
            )
        return valid


class MembershipPublisher:
    """Keeps this process's token in the DHT's member list (``{run_id}_members``), so averagers admit this peer.

    A background thread renews the token before it expires and stores the new one. If the monitor refuses a renewal
    (the secret was rotated away, the key removed from the allowlist), ``on_expired`` is called once the token ends.

    Args:
        dht: this process's DHT node.
        run_id: the run's name.
        fetch_token: returns a fresh token (a JoinClient, or the monitor's Authority).
        first_token: the token received at admission.
        refresh_margin: renew when fewer than this many seconds of validity are left.
        on_expired: called (once, in the thread) when the token expired and could not be renewed.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        fetch_token: Callable[[], AccessToken],
        first_token: AccessToken,
        refresh_margin: float,
        on_expired: Callable[[], None] | None = None,
    ):
        self.dht, self.run_id, self.fetch_token, self.token = dht, run_id, fetch_token, first_token
        self.refresh_margin, self.on_expired = refresh_margin, on_expired
        self.period = min(max(refresh_margin / 4, 1.0), 30.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="access-token", daemon=True)
        self._failures = RateLimitedWarning(logger)
        self._published = False

    def start(self) -> MembershipPublisher:
        """Publish the token now (the averagers of other peers look it up), then keep it fresh in the background."""
        self._publish_if_needed()
        self._thread.start()
        return self

    def publish(self) -> bool:
        expiry = token_expiry(self.token)
        key, value = members_key(self.run_id), self.token.SerializeToString()
        # subkey = this process's signing key: only its owner can overwrite a member's entry
        return bool(self.dht.store(key, subkey=local_public_key(), value=value, expiration_time=expiry))

    def _publish_if_needed(self) -> None:
        # a DHT node keeps a subkey's value until a later expiration comes: only a new token needs storing
        if not self._published:
            self._published = self.publish()
        if not self._published:
            self._failures(
                "store", f"Could not store this peer's access token in the DHT; retrying in {self.period} s"
            )

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self._renew_if_due()
                self._publish_if_needed()
            except Exception as error:  # noqa: BLE001  (the DHT may be shutting down or time out: retry later)
                logger.debug(f"Could not publish the access token: {error!r}")

    def _renew_if_due(self) -> None:
        left = token_expiry(self.token) - get_dht_time()
        if left >= self.refresh_margin:
            return
        try:
            self.token, self._published = self.fetch_token(), False
            return
        except JoinRefused as error:
            logger.error(f"The monitor refused to renew this peer's access token of run {self.run_id!r}: {error}")
        except JoinUnavailable as error:
            logger.warning(f"Could not renew the access token of run {self.run_id!r} ({left:.0f} s left): {error}")
        if left <= 0 and self.on_expired is not None:
            on_expired, self.on_expired = self.on_expired, None
            on_expired()

    def stop(self) -> None:
        self._stop.set()


@dataclass
class RunAccess:
    """This process's access to a closed run: its peer id, its token source and first token, the authority's key.

    Args:
        run_id: the run's name.
        peer_id: the libp2p id the tokens name (from ``identity_path``).
        identity_path: the identity file the DHT must use to have that id.
        fetch_token: returns a fresh token (a JoinClient, or the monitor's Authority).
        first_token: the token received at admission.
        authority_key: the run authority's public key.
        ttl: lifetime of the tokens the authority issues, in seconds.
    """

    run_id: str
    peer_id: PeerID
    identity_path: str
    fetch_token: Callable[[], AccessToken]
    first_token: AccessToken
    authority_key: RSAPublicKey
    ttl: float
    publisher: MembershipPublisher | None = None

    @property
    def refresh_margin(self) -> float:
        return self.ttl * REFRESH_FRACTION

    def authorizer(self) -> RunAuthorizer:
        """The DHT's authorizer (give it to the DHT, which runs it in its own process)."""
        return RunAuthorizer(self.run_id, self.authority_key, self.fetch_token, self.first_token, self.refresh_margin)

    def check_identity(self, dht: hivemind.DHT) -> None:
        if dht.peer_id != self.peer_id:
            raise RuntimeError(f"the DHT runs as {dht.peer_id}, but the access token names {self.peer_id}")

    def publish_membership(self, dht: hivemind.DHT, on_expired: Callable[[], None] | None = None) -> None:
        """List this process as a run member in the DHT and keep its token fresh there until ``close``."""
        self.check_identity(dht)
        self.publisher = MembershipPublisher(
            dht, self.run_id, self.fetch_token, self.first_token, self.refresh_margin, on_expired
        ).start()

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.stop()


def admit_peer(run_id: str, join_url: str, credential: JoinCredential, identity_path: str) -> RunAccess:
    """Ask the monitor to admit this peer (JoinRefused: it said no; JoinUnavailable: it did not answer)."""
    identity_peer_id(identity_path)  # creates the file if missing
    identity = PeerIdentity.load(identity_path)
    peer_id = identity.peer_id
    client = JoinClient(join_url, credential, identity)
    token = client()
    logger.info(f"Admitted to closed run {run_id!r} as {peer_id} (access tokens live {client.ttl:.0f} s)")
    return RunAccess(run_id, peer_id, identity_path, client, token, client.authority_key, client.ttl)


def leave_when_token_expired() -> None:
    """A peer whose access was revoked leaves like on SIGTERM: it saves a backup and exits."""
    logger.error("This peer's access token expired and the monitor does not renew it: leaving the run")
    os.kill(os.getpid(), signal.SIGTERM)


def new_join_key(path: str) -> str:
    """Create a join key file (RSA, owner-readable only) and return the line to add to the monitor's allowlist."""
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists: refusing to overwrite a join key")
    key = RSAPrivateKey()
    write_private_key(path, key)
    return key.get_public_key().to_bytes().decode()


def main(argv: list[str]) -> int:
    """``python -m peer.swarm.access new-join-key PATH``: print the allowlist line of a new join key."""
    if len(argv) != 2 or argv[0] not in ("new-join-key", "allowlist-line"):
        print("usage: python -m peer.swarm.access new-join-key PATH | allowlist-line PATH", file=sys.stderr)
        return 2
    try:
        if argv[0] == "new-join-key":
            print(new_join_key(argv[1]))
        else:
            print(read_private_key(argv[1]).get_public_key().to_bytes().decode())
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
