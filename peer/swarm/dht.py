"""Joining the swarm's DHT: the one way both the trainer and the monitor start their hivemind node."""

from __future__ import annotations

from collections.abc import Iterable

import hivemind
from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils.auth import AuthorizerBase

from peer.hivemind_gaps.message_bound import bound_p2p_messages
from peer.swarm.config import SwarmConfig
from peer.swarm.join_errors import check_multiaddrs, explain
from peer.swarm.reachability import serve_dial_back


class SwarmJoinError(RuntimeError):
    """The DHT could not start or could not reach any initial peer; the message is one line: cause, then fix."""

    exit_code = 3  # of albert-peer (peer/lifecycle.py ExitCode.SWARM_UNREACHABLE) and albert-monitor alike


def build_dht(
    swarm: SwarmConfig,
    record_validators: Iterable[RecordValidatorBase] = (),
    authorizer: AuthorizerBase | None = None,
    identity_path: str | None = None,
) -> hivemind.DHT:
    """Start this process's DHT node (and its p2pd daemon) and join the swarm through ``swarm.initial_peers``.

    A closed run passes its ``authorizer`` and an ``identity_path`` made just before (so the peer id the access
    token names is known before the DHT starts); hivemind's check that such an identity is unused is then skipped.
    """
    problem = check_multiaddrs(swarm)
    if problem is not None:
        raise SwarmJoinError(f"could not start the p2p daemon: {problem}")
    if identity_path is None:
        identity = {"identity_path": swarm.identity_path}
    else:
        identity = {"identity_path": identity_path, "check_if_identity_free": False}
    bound_p2p_messages()  # before the DHT and the averagers fork: every process of the node reads bounded messages
    try:
        dht = hivemind.DHT(
            initial_peers=swarm.initial_peers,
            start=True,
            client_mode=swarm.client_mode,
            host_maddrs=swarm.host_maddrs,
            announce_maddrs=swarm.announce_maddrs or None,
            use_relay=swarm.use_relay,
            use_auto_relay=swarm.use_auto_relay,
            record_validators=list(record_validators),
            authorizer=authorizer,
            **identity,
        )
    except Exception as error:
        raise SwarmJoinError(explain(error, swarm)) from error
    dht.run_coroutine(serve_dial_back)  # every node answers "can you reach me?" (peer/swarm/reachability.py)
    return dht


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """Multiaddrs other peers can pass as --initial-peers to join through this one."""
    return [str(maddr) for maddr in dht.get_visible_maddrs()]
