"""The join string: the one token an organiser hands out (initial peers, run id, run key fingerprint).

Shape: ``albert1.<payload>.<checksum>``. ``albert1`` names the format and its version; the payload is unpadded
base64url of compact JSON; the checksum is the first 8 hex digits of the payload's sha256, so a mistyped or truncated
string is "damaged", never a join to some other place. Only [A-Za-z0-9._-]: one word for a shell, a .env file or a
YAML value, with nothing to quote.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass

from hivemind.utils.multiaddr import Multiaddr

from peer.swarm.config import is_run_id
from peer.swarm.run_key import normalize_fingerprint

PREFIX = "albert"
VERSION = 1
CHECKSUM_CHARS = 8
MAX_JOIN_CHARS = 8192  # a handful of multiaddrs; anything longer is not a join string
MAX_RUN_ID_CHARS = 128


class JoinStringError(ValueError):
    """A join string that cannot be read; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class JoinString:
    """What a peer needs to find and trust a run.

    Args:
        run_id: the run's id.
        run_key: fingerprint of the run key (64 hex digits) whose signature the run's manifest must carry.
        initial_peers: multiaddrs to bootstrap from; the first ones are the monitor's, which serves the manifest.
    """

    run_id: str
    run_key: str
    initial_peers: tuple[str, ...]

    def encode(self) -> str:
        payload = {"r": self.run_id, "k": self.run_key, "p": list(self.initial_peers)}
        text = json.dumps(payload, separators=(",", ":")).encode()
        body = base64.urlsafe_b64encode(text).decode().rstrip("=")
        return f"{PREFIX}{VERSION}.{body}.{_checksum(body)}"

    @classmethod
    def decode(cls, text: str) -> JoinString:
        """Parse a join string as pasted (surrounding spaces and quotes are forgiven); JoinStringError if unusable."""
        text = text.strip().strip("'\"")
        if len(text) > MAX_JOIN_CHARS:
            raise JoinStringError(f"a join string is at most {MAX_JOIN_CHARS} characters, this one has {len(text)}")
        parts = text.split(".")
        if not parts[0].startswith(PREFIX):
            raise JoinStringError(
                f"{text[:24]!r}... is not a join string (one starts with '{PREFIX}{VERSION}.'): copy the line the "
                "monitor printed after '--join', or its RUN_DIR/join.txt"
            )
        if parts[0] != f"{PREFIX}{VERSION}":
            raise JoinStringError(
                f"this join string is of format {parts[0]!r}; this peer reads '{PREFIX}{VERSION}': install the "
                "albert-swarm version the organiser names"
            )
        if len(parts) != 3 or _checksum(parts[1]) != parts[2]:
            raise JoinStringError(
                "the join string is damaged (its checksum does not match): copy it again, whole, from the organiser"
            )
        return cls._from_payload(parts[1])

    @classmethod
    def _from_payload(cls, body: str) -> JoinString:
        try:
            payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            run_id, run_key, peers = payload["r"], payload["k"], payload["p"]
        except (binascii.Error, ValueError, TypeError, KeyError) as error:
            # the checksum matched, so the monitor that wrote it is at fault, not the copy
            raise JoinStringError(f"the join string's content is unreadable ({error!r}): ask the organiser") from error
        if not isinstance(run_id, str) or not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
            raise JoinStringError("the join string's content has the wrong shape: ask the organiser")
        if not is_run_id(run_id) or len(run_id) > MAX_RUN_ID_CHARS or not run_id.isprintable():
            raise JoinStringError(
                f"the join string's run id {run_id[:40]!r} is not a run id (1-{MAX_RUN_ID_CHARS} printable characters, "
                "no '.', '/' or space): ask the organiser"
            )
        if not peers:
            raise JoinStringError("the join string names no initial peer: ask the organiser")
        for peer in peers:
            problem = _initial_peer_problem(peer)
            if problem:
                raise JoinStringError(f"the join string's initial peer {peer[:80]!r} {problem}: ask the organiser")
        return cls(run_id, normalize_fingerprint(str(run_key)), tuple(peers))


def _initial_peer_problem(text: str) -> str | None:
    """What makes one initial peer of a join string unusable (a string anyone can checksum may carry anything)."""
    try:
        maddr = Multiaddr(text)  # decodes every component, the /p2p/ peer ids too
    except Exception as error:  # noqa: BLE001 - its parse errors have no common base but Exception
        return f"is not a multiaddr with a valid peer id ({type(error).__name__})"
    if "p2p" not in maddr:
        return "names no peer id (/p2p/...)"
    return None


def _checksum(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()[:CHECKSUM_CHARS]
