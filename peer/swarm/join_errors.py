"""Why a node could not start its p2p daemon or join the swarm, said in one line that names the cause and the fix.

hivemind reports these failures as ``P2PDaemonError("Daemon failed to start: <p2pd's last line>")`` or a bootstrap
``RuntimeError``; the texts matched here are the ones p2pd and hivemind 1.1.12 really print (tests/peer/
test_join_errors.py provokes each). p2pd says only "failed to connect to bootstrap peers", so for that case the
initial peers are probed over plain TCP to tell a closed port from a dropped one, a wrong peer id or a bad host name.
"""

from __future__ import annotations

import importlib.resources
import re
import socket

from hivemind import hivemind_cli
from hivemind.utils.multiaddr import Multiaddr

from peer.swarm.config import SwarmConfig

PROBE_TIMEOUT = 3.0  # seconds to wait for a TCP answer from an initial peer's host
EXAMPLE_LISTEN = "/ip4/0.0.0.0/tcp/31337"


def check_multiaddrs(swarm: SwarmConfig) -> str | None:
    """The first multiaddr flag hivemind cannot use, explained with its fix; None if all parse.

    Checked before hivemind starts: an invalid --announce-maddrs makes hivemind's DHT process raise an error that
    cannot be sent back to the parent (its StringParseError does not unpickle), and DHT() then waits forever.
    """
    flags = {"--initial-peers": swarm.initial_peers, "--host-maddrs": swarm.host_maddrs}
    flags["--announce-maddrs"] = swarm.announce_maddrs
    for flag, maddrs in flags.items():
        for text in maddrs:
            try:
                maddr = Multiaddr(text)
            except Exception as error:  # noqa: BLE001 - its parse errors have no common base but Exception
                return f"{flag} {text!r} is not a valid multiaddr ({error}); fix: write it like {EXAMPLE_LISTEN}"
            if flag == "--initial-peers" and "p2p" not in maddr:
                return (
                    f"--initial-peers {text!r} lacks the peer id (/p2p/...); fix: copy the whole address the "
                    "monitor prints on its --initial-peers line"
                )
            if flag == "--announce-maddrs" and "tcp" in maddr and maddr["tcp"] == "0":
                return f"--announce-maddrs {text!r} has port 0; fix: announce the fixed port you listen on"
    return None


def explain(error: BaseException, swarm: SwarmConfig) -> str:
    """One line: what failed (from hivemind's or p2pd's own report) and what to do about it."""
    text = " ".join(str(error).split())  # p2pd's report may hold newlines; the line must stay one line
    for explainer in (_daemon_missing, _listen_failure, _bad_multiaddr, _identity_taken, _startup_timeout):
        line = explainer(text, swarm)
        if line:
            return f"could not start the p2p daemon: {line}"
    if "failed to connect to bootstrap peers" in text:
        return f"could not join the swarm: {_unreachable_peers(swarm)}"
    if "none of the initial_peers responded to a ping" in text:
        return (
            f"could not join the swarm: the initial peers ({', '.join(swarm.initial_peers)}) accepted the connection but not the DHT's "
            "requests; fix: check that they are this run's monitor or peers, that both sides run the same "
            "albert-swarm version, and, in a closed run, that this peer was admitted (--join-url)"
        )
    return (
        f"could not join the swarm: {text or type(error).__name__}; fix: run again with GOLOG_LOG_LEVEL=debug to "
        "see the p2p daemon's own log"
    )


def _daemon_missing(text: str, swarm: SwarmConfig) -> str | None:
    reinstall = "reinstall hivemind (pip install --force-reinstall hivemind==1.1.12) or the albert-swarm image"
    if "p2pd binary not found" in text:
        path = re.search(r"not found at (\S+?)\.? ", text)
        return f"hivemind's p2pd daemon is missing ({path[1] if path else 'p2pd'}); fix: {reinstall}"
    if "Permission denied" in text and "Failed to start p2pd" in text:
        where = p2pd_path()  # hivemind's message does not say which file
        return f"hivemind's p2pd daemon at {where} is not executable; fix: chmod +x {where}, or {reinstall}"
    if "binary format incompatible" in text:
        return f"hivemind's p2pd daemon was built for another platform; fix: {reinstall}"
    return None


def p2pd_path() -> str:
    """Where hivemind runs its p2pd daemon from (the binary its wheel ships)."""
    return str(importlib.resources.files(hivemind_cli) / "p2pd")


def _listen_failure(text: str, swarm: SwarmConfig) -> str | None:
    match = re.search(r"listen (tcp\d?|udp\d?) (\S+): bind: ([^\]]+)", text)
    if match is None:
        return None
    address, reason = match[2], match[3].strip()
    port = address.rsplit(":", 1)[-1]
    if "address already in use" in reason:
        return (
            f"port {port} of --host-maddrs is in use by another program (p2pd could not listen on {address}); "
            "fix: stop that program or choose another port in --host-maddrs (tcp/0 picks a free one)"
        )
    if "cannot assign requested address" in reason:
        host = address.rsplit(":", 1)[0]
        return (
            f"{host} in --host-maddrs is not an address of this machine; fix: listen on {EXAMPLE_LISTEN} and "
            "put the public address in --announce-maddrs"
        )
    if "permission denied" in reason:
        return f"listening on port {port} needs root; fix: choose a port above 1023 in --host-maddrs"
    return f"p2pd could not listen on {address} ({reason}); fix: change --host-maddrs"


def _bad_multiaddr(text: str, swarm: SwarmConfig) -> str | None:
    match = re.search(r'failed to parse multiaddr "([^"]*)": (.*)', text)
    if match is None:
        return None
    maddr, reason = match[1], match[2].strip()
    flag = next(
        (f for f, values in _flags(swarm).items() if maddr in values or any(v.startswith(maddr) for v in values)),
        "a multiaddr flag",
    )
    return f"{flag} {maddr!r} is not a valid multiaddr ({reason}); fix: write it like {EXAMPLE_LISTEN}"


def _identity_taken(text: str, swarm: SwarmConfig) -> str | None:
    match = re.search(r"Identity from `([^`]*)` is already taken", text)
    if match is None:
        return None
    return (
        f"another running peer already uses the identity in {match[1]}; fix: stop it, or give this peer its own "
        "--identity-path"
    )


def _startup_timeout(text: str, swarm: SwarmConfig) -> str | None:
    match = re.search(r"Daemon failed to start in ([\d.]+) seconds", text)
    if match is None:
        return None
    return (
        f"the p2p daemon did not start within {float(match[1]):.0f} s (an overloaded machine, or a broken IPv6 "
        f"setup); fix: try again, and listen on IPv4 only with --host-maddrs {EXAMPLE_LISTEN}"
    )


def _flags(swarm: SwarmConfig) -> dict[str, list[str]]:
    return {
        "--initial-peers": swarm.initial_peers,
        "--host-maddrs": swarm.host_maddrs,
        "--announce-maddrs": swarm.announce_maddrs,
    }


def _unreachable_peers(swarm: SwarmConfig) -> str:
    causes = [f"{maddr}: {probe_initial_peer(maddr)}" for maddr in swarm.initial_peers]
    return (
        f"no initial peer answered ({'; '.join(causes)}); fix: copy the --initial-peers line the monitor prints "
        "(or its /api/status) again, check that the monitor runs and that no firewall blocks its port"
    )


def probe_initial_peer(text: str) -> str:
    """What a plain TCP connection to an initial peer's host and port shows, as the likely cause of p2pd's failure."""
    maddr = Multiaddr(text)
    host_protocol = next((name for name in ("ip4", "ip6", "dns", "dns4", "dns6") if name in maddr), None)
    if host_protocol is None or "tcp" not in maddr:
        return "not a TCP address (only /ip4, /ip6 or /dns with /tcp can be probed)"
    host, port = maddr[host_protocol], int(maddr["tcp"])
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        return f"the host name {host!r} does not resolve ({error.strerror}): a typo?"
    family, _, _, _, address = addresses[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(PROBE_TIMEOUT)
        try:
            sock.connect(address)
        except ConnectionRefusedError:
            return f"nobody listens on {host} port {port} (connection refused): wrong port, or the node is down"
        except TimeoutError:
            return (
                f"no answer from {host} port {port} in {PROBE_TIMEOUT:.0f} s: a firewall drops it, or the host is down"
            )
        except OSError as error:
            return f"{host} port {port} cannot be reached ({error.strerror})"
    return (
        f"a program listens on {host} port {port} but it is not the peer {maddr['p2p']}: a wrong "
        "or mistyped peer id, or the node restarted with a new identity"
    )
