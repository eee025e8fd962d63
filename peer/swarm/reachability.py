"""Can the swarm reach this node? A swarm peer dials it back on a fresh connection and says which address worked.

Every node serves the dial-back RPC on its DHT's p2p daemon (``serve_dial_back``, run inside the DHT process). The
asker sends only its TCP ports; the helper dials the asker's own peer id at the IP the request came from (never
another host, so the RPC cannot aim connections at third parties), through a throwaway p2pd that has no connection
to the asker yet: its libp2p handshake proves that this very peer answers there. One dial-back runs at a time, at
most one per asker a minute and RATE_LIMIT a minute in all; requests over MAX_MESSAGE bytes are refused unread.
hivemind's p2pd offers no AutoNAT status to ask instead (hivemind.P2P.create only switches the service on).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import hivemind
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from peer.swarm.config import SwarmConfig
from peer.swarm.manifest_protocol import one_line

logger = logging.getLogger(__name__)

HANDLER = "albert_swarm.dial_back"
MAX_RESULTS = 8  # addresses a helper reports on (a peer listens on a few)
MAX_MESSAGE = 4096  # bytes of a request or an answer
MAX_PORTS = 4
DIAL_TIMEOUT = 10.0  # seconds for the throwaway p2pd to start and reach the asker
PER_ASKER_INTERVAL = 60.0
RATE_LIMIT = 10  # dial-backs per minute, all askers together
ASK_TIMEOUT = 3 * DIAL_TIMEOUT + 10.0
MAX_HELPERS = 3


async def serve_dial_back(dht: hivemind.DHT, node) -> None:
    """Register the dial-back handler on this DHT's p2p daemon (pass to ``dht.run_coroutine``)."""
    await node.p2p.add_binary_stream_handler(HANDLER, DialBackService().handle)


class DialBackService:
    """The helper's side: check the request, dial the asker back at its observed IP, answer with the results."""

    def __init__(self):
        self._busy = asyncio.Lock()
        self._last_by_asker: dict[PeerID, float] = {}
        self._recent: deque[float] = deque()

    async def handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await self._answer(info, reader)
        except (TimeoutError, ValueError, TypeError, asyncio.IncompleteReadError) as error:
            answer = {"refused": f"bad request: {error}"}
        try:
            await write_message(writer, answer)
        except OSError:
            pass  # the asker left; nothing to tell
        finally:
            writer.close()

    async def _answer(self, info, reader: asyncio.StreamReader) -> dict:
        request = await asyncio.wait_for(read_message(reader), DIAL_TIMEOUT)
        ports = request.get("ports")
        if not isinstance(ports, list) or not ports or not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
            raise ValueError("ports must be a non-empty list of TCP ports")
        host = observed_host(Multiaddr(str(info.addr)))
        if host is None:
            return {"refused": f"the request came over {info.addr}, not a direct IP connection"}
        refusal = self._rate_limited(info.peer_id)
        if refusal:
            return {"refused": refusal}
        async with self._busy:
            targets = [f"{host}/tcp/{port}/p2p/{info.peer_id}" for port in sorted(set(ports))[:MAX_PORTS]]
            return {"results": [await dial(target) for target in targets]}

    def _rate_limited(self, asker: PeerID) -> str | None:
        now = time.monotonic()
        if self._busy.locked():
            return "busy with another dial-back; ask another peer"
        if now - self._last_by_asker.get(asker, -PER_ASKER_INTERVAL) < PER_ASKER_INTERVAL:
            return f"one dial-back per peer every {PER_ASKER_INTERVAL:.0f} s"
        while self._recent and now - self._recent[0] > 60.0:
            self._recent.popleft()
        if len(self._recent) >= RATE_LIMIT:
            return f"more than {RATE_LIMIT} dial-backs this minute; ask another peer"
        self._recent.append(now)
        if len(self._last_by_asker) > 10_000:  # bounded: forget the oldest askers first
            del self._last_by_asker[next(iter(self._last_by_asker))]
        self._last_by_asker[asker] = now
        return None


def observed_host(addr: Multiaddr) -> str | None:
    """``/ip4/1.2.3.4`` (or ip6) of the connection a request came over; None for a relayed one."""
    if "p2p-circuit" in addr:
        return None
    for protocol in ("ip4", "ip6"):
        if protocol in addr:
            return f"/{protocol}/{addr[protocol]}"
    return None


async def dial(target: str) -> dict:
    """Reach ``target`` (an address with the asker's peer id) from a fresh p2pd with no connection to it yet."""
    address = target.rsplit("/p2p/", 1)[0]
    try:
        probe = await P2P.create(
            initial_peers=[target],
            dht_mode="client",
            no_listen=True,
            auto_nat=False,
            nat_port_map=False,  # a prober must not open ports on the helper's router
            use_relay=False,  # a relayed connection would not show that the address itself is reachable
            startup_timeout=DIAL_TIMEOUT,
        )
    except Exception as error:  # noqa: BLE001 - any failure to reach the target is the answer
        return {"maddr": address, "reachable": False, "error": dial_error(error)}
    await probe.shutdown()
    return {"maddr": address, "reachable": True, "error": ""}


def dial_error(error: BaseException) -> str:
    """p2pd's report of a failed dial, without its time stamp."""
    text = " ".join(str(error).split())
    if "failed to connect to bootstrap peers" in text:
        return "no connection to this peer id at that address"
    if "failed to start in" in text:
        return f"no answer within {DIAL_TIMEOUT:.0f} s"
    return text[-200:]


async def write_message(writer: asyncio.StreamWriter, message: dict) -> None:
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    writer.write(len(data).to_bytes(4, "big") + data)
    await writer.drain()


async def read_message(reader: asyncio.StreamReader) -> dict:
    """One length-prefixed JSON object; a length over MAX_MESSAGE is refused before anything is read."""
    length = int.from_bytes(await reader.readexactly(4), "big")
    if length > MAX_MESSAGE:
        raise ValueError(f"a message of {length} bytes exceeds {MAX_MESSAGE}")
    try:
        message = json.loads(await reader.readexactly(length))
    except RecursionError as error:  # "[[[[..." nested past the parser's depth
        raise ValueError("a message nested too deep") from error
    if not isinstance(message, dict):
        raise TypeError("a message must be a JSON object")
    return message


@dataclass
class Reachability:
    """What a helper found: ``results`` are {maddr, reachable, error}; ``problem`` says why there are none."""

    helper: str = ""
    results: list[dict] = field(default_factory=list)
    problem: str = ""

    @property
    def reachable(self) -> list[str]:
        return [result["maddr"] for result in self.results if result.get("reachable")]


def plain(result: dict) -> dict:
    """A helper's result on one address, reduced to what this peer logs: one short printable line per field."""
    return {
        "maddr": one_line(result.get("maddr", ""), 200),
        "reachable": result.get("reachable") is True,
        "error": one_line(result.get("error", ""), 200),
    }


async def ask_dial_back(dht: hivemind.DHT, node, ports: list[int], preferred: list[str]) -> Reachability:
    """Ask swarm peers (initial peers first) in turn until one dials this node back (run in the DHT process)."""
    connected = [info.peer_id for info in await node.p2p.list_peers()]
    helpers = [PeerID.from_base58(peer) for peer in preferred] + connected
    helpers = list(dict.fromkeys(peer for peer in helpers if peer != node.peer_id))[:MAX_HELPERS]
    refusals = []
    for helper in helpers:
        try:
            answer = await asyncio.wait_for(_ask(node, helper, ports), ASK_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - an old peer, a gone peer, a refusal: ask the next one
            refusals.append(f"{helper}: {type(error).__name__} {error}"[:200])
            continue
        if isinstance(answer.get("results"), list):
            return Reachability(
                str(helper), [plain(r) for r in answer["results"][:MAX_RESULTS] if isinstance(r, dict)]
            )
        refusals.append(f"{helper}: {answer.get('refused', 'no answer')}"[:200])
    return Reachability(problem="; ".join(refusals) or "no other peer is connected yet")


async def _ask(node, helper: PeerID, ports: list[int]) -> dict:
    _, reader, writer = await node.p2p.call_binary_stream_handler(helper, HANDLER)
    try:
        await write_message(writer, {"ports": ports})
        return await read_message(reader)
    finally:
        writer.close()


def check_reachability(dht: hivemind.DHT, swarm: SwarmConfig) -> Reachability:
    """Ask the swarm to dial this node back on each TCP port it announces (blocks up to a few dial timeouts)."""
    maddrs = dht.get_visible_maddrs()
    ports = sorted({int(maddr["tcp"]) for maddr in maddrs if "tcp" in maddr and "p2p-circuit" not in maddr})
    preferred = [str(Multiaddr(peer)["p2p"]) for peer in swarm.initial_peers]
    if not ports:
        return Reachability(problem="this node announces no TCP address")
    return dht.run_coroutine(_AskWith(ports[:MAX_PORTS], preferred))


@dataclass
class _AskWith:
    """A picklable ``run_coroutine`` callable: ask_dial_back with this node's ports and preferred helpers."""

    ports: list[int]
    preferred: list[str]

    async def __call__(self, dht: hivemind.DHT, node) -> Reachability:
        return await ask_dial_back(dht, node, self.ports, self.preferred)


def describe(result: Reachability) -> tuple[int, str]:
    """The log level and the one line a peer prints about its reachability (with the fix if it is unreachable)."""
    if result.reachable:
        others = [r["maddr"] for r in result.results if not r.get("reachable")]
        tail = f" (not at {', '.join(others)})" if others else ""
        return logging.INFO, (
            f"Reachable from the swarm: peer {result.helper} dialled this peer back at "
            f"{', '.join(result.reachable)}{tail}"
        )
    if not result.results:
        return logging.INFO, f"Could not check whether the swarm can reach this peer: {result.problem}"
    tried = "; ".join(f"{r.get('maddr')} ({r.get('error', '')[-120:]})" for r in result.results)
    first = str(result.results[0].get("maddr", "/ip4/PUBLIC_IP/tcp/PORT"))
    port = first.rsplit("/", 1)[-1]
    return logging.WARNING, (
        f"Not reachable from the swarm: peer {result.helper} could not dial this peer back at {tried}; it trains "
        f"through its own connections but cannot serve state or be an initial peer. Fix: forward TCP port {port} to "
        f"this machine and pass --host-maddrs /ip4/0.0.0.0/tcp/{port} --announce-maddrs {first}, or run with "
        "--client-mode"
    )


def report_in_background(dht: hivemind.DHT, swarm: SwarmConfig) -> threading.Thread | None:
    """Check and log reachability in a thread (start-up goes on meanwhile); nothing to check in client mode."""
    if swarm.client_mode:
        logger.info("Client mode: this peer only dials out; the swarm cannot reach it and does not need to")
        return None

    def check() -> None:
        try:
            level, line = describe(check_reachability(dht, swarm))
        except Exception as error:  # noqa: BLE001 - the DHT shut down meanwhile, or the peer left: nothing to say
            logger.debug(f"The reachability check ended early: {error!r}")
            return
        logger.log(level, line)

    thread = threading.Thread(target=check, name="reachability", daemon=True)
    thread.start()
    return thread
