"""How a joining peer talks to the monitor over hivemind's p2p: the run manifest, tokenizer files, a refusal notice.

Over libp2p rather than HTTP because a peer given a join string can reach the monitor's p2p address (it is its
initial peer) but not necessarily its HTTP port; libp2p also tells the monitor, authenticated, which peer id asks.
One stream per request. The request is one line of JSON; the answer one line of JSON (``{"size": N}`` or
``{"error": "why"}``) and then N raw bytes. Nothing served here is trusted for what it says: the manifest is verified
against the run key, every file against the manifest's sha256 (peer/swarm/manifest.py).
"""

from __future__ import annotations

import asyncio
import json

from hivemind.p2p import P2P, PeerID

HANDLER = "albert_swarm_run_manifest"
MAX_REQUEST_BYTES = 4096
MAX_NOTICE_CHARS = 500  # a refusal notice is one line of a log, not a channel for a stranger's essays
REQUEST_TIMEOUT = 30.0  # seconds for one request, answer included


class ProtocolError(OSError):
    """The other side did not answer as the protocol says (or not in time)."""


def one_line(text: object, limit: int) -> str:
    """Another node's words made fit for one log line: printable characters only, at most ``limit`` of them."""
    return "".join(char if char.isprintable() else "?" for char in str(text)[:limit])


def encode_line(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


async def read_request(reader: asyncio.StreamReader) -> dict:
    """The request line a peer sent: a JSON object of at most MAX_REQUEST_BYTES, else ProtocolError."""
    try:
        line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
    except (TimeoutError, ValueError, asyncio.LimitOverrunError) as error:
        raise ProtocolError(f"no request line: {error!r}") from error
    if len(line) > MAX_REQUEST_BYTES or not line.endswith(b"\n"):
        raise ProtocolError(f"a request line of {len(line)} bytes, at most {MAX_REQUEST_BYTES} ending in a newline")
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as error:  # RecursionError: "[[[[..." nested past the parser's depth
        raise ProtocolError(f"a request that is not JSON: {error}") from error
    if not isinstance(request, dict):
        raise ProtocolError("a request that is not a JSON object")
    return request


async def answer(writer: asyncio.StreamWriter, payload: bytes | None = None, error: str | None = None) -> None:
    """Send an answer (payload, or an error that says why not) and close the stream."""
    try:
        header = {"error": error} if error is not None else {"size": len(payload or b"")}
        writer.write(encode_line(header) + (b"" if error is not None else payload or b""))
        await writer.drain()
    finally:
        writer.close()


async def ask(p2p: P2P, peer_id: PeerID, request: dict, max_bytes: int) -> bytes:
    """Send one request to `peer_id` and return the answer's bytes (at most `max_bytes`, else ProtocolError).

    An answer with an error raises ProtocolError with the monitor's words.
    """
    try:
        return await asyncio.wait_for(_ask(p2p, peer_id, request, max_bytes), REQUEST_TIMEOUT)
    except TimeoutError as error:
        raise ProtocolError(f"{peer_id} did not answer within {REQUEST_TIMEOUT:.0f} s") from error


async def _ask(p2p: P2P, peer_id: PeerID, request: dict, max_bytes: int) -> bytes:
    _, reader, writer = await p2p.call_binary_stream_handler(peer_id, HANDLER)
    try:
        writer.write(encode_line(request))
        await writer.drain()
        try:
            header_line = await reader.readline()
            header = json.loads(header_line)
        except (ValueError, RecursionError, asyncio.LimitOverrunError) as error:  # a line past 64 KiB is a ValueError
            raise ProtocolError(f"{peer_id} did not answer with a header line ({error!r})") from error
        if not isinstance(header, dict):
            raise ProtocolError(f"{peer_id} answered a header that is not a JSON object")
        if "error" in header:
            raise ProtocolError(f"{peer_id} refused: {one_line(header['error'], MAX_NOTICE_CHARS)}")
        size = header.get("size")
        if not isinstance(size, int) or not 0 <= size <= max_bytes:
            raise ProtocolError(f"{peer_id} announced {size!r} bytes, at most {max_bytes} were asked for")
        try:
            return await reader.readexactly(size)
        except asyncio.IncompleteReadError as error:
            raise ProtocolError(f"{peer_id} sent {len(error.partial)} of the {size} bytes it announced") from error
    finally:
        writer.close()
