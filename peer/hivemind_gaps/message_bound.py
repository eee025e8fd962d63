"""A bound on the size of one message of hivemind's protobuf streams (all-reduce parts, state downloads, matchmaking).

hivemind 1.1.12 frames each message of a stream handler with an 8-byte length and reads that many bytes whole
(``P2P.receive_raw_data``): a stranger that announces 2**40 bytes and keeps sending has the receiving process buffer
all of it, in the averager's process of every peer it reaches, until memory runs out. Honest messages are small:
hivemind cuts all-reduce parts at 2**19 bytes and state downloads into 2**16-byte chunks, and a matchmaking message
carries a few hundred bytes per member. A message announced beyond MAX_MESSAGE_BYTES (4 MiB) ends its stream as a closed
connection would (hivemind's own handling of that: the handler stops, a caller sees the stream end), before a byte of
its body is read.
"""

from __future__ import annotations

import asyncio
import logging

from hivemind.p2p import P2P

from peer.swarm.access_tokens import RateLimitedWarning

logger = logging.getLogger(__name__)
# 8x the largest honest message (a 2**19-byte all-reduce part, a little more with a block codec's scales), and the
# p2p daemon's own bound on a unary message (hivemind's DEFAULT_MAX_MSG_SIZE)
MAX_MESSAGE_BYTES = 4 << 20
_warnings = RateLimitedWarning(logger, period=60.0)
HIVEMIND_RECEIVE_RAW_DATA = P2P.__dict__["receive_raw_data"]  # hivemind's own (the staticmethod), as imported


async def receive_bounded_raw_data(reader: asyncio.StreamReader) -> bytes:
    """hivemind's P2P.receive_raw_data (1.1.12), refusing a message announced beyond MAX_MESSAGE_BYTES."""
    header = await reader.readexactly(P2P.HEADER_LEN)
    length = int.from_bytes(header, P2P.BYTEORDER)
    if length > MAX_MESSAGE_BYTES:
        _warnings(
            "oversize",
            f"Closed a p2p stream whose next message announced {length} bytes (at most {MAX_MESSAGE_BYTES})",
        )
        raise asyncio.IncompleteReadError(header, P2P.HEADER_LEN + length)
    return await reader.readexactly(length)


def bound_p2p_messages() -> None:
    """Bound every protobuf stream message this process (and the processes it forks from now on) receives."""
    P2P.receive_raw_data = staticmethod(receive_bounded_raw_data)
