"""Hostile HTTP input, monitor side: a cap on request bodies, and JSON bodies parsed with no path to a 500.

Anyone who can reach the monitor can send it bytes. These turn an oversized or malformed body into a 4xx that names
the problem, before a handler (or the JSON parser's recursion) ever sees it.
"""

from __future__ import annotations

import json

# A join request is about 1 KB (an RSA public key, a peer id, an HMAC or signature); 64 KiB leaves room for any
# honest request while a flood of large bodies costs the monitor no memory.
MAX_BODY_BYTES = 64 * 1024


class MalformedBody(ValueError):
    """A request body that is not the JSON object expected; the message says why (it is sent back as a 400)."""


class BodySizeLimit:
    """ASGI middleware: a request whose body is over `max_bytes` gets 413 before the rest of it is read.

    A declared Content-Length over the cap is refused at once. A body without one (chunked) is counted as it arrives
    and buffered up to the cap, then handed to the app, which therefore never holds more than the cap.

    Args:
        app: the ASGI app behind it.
        max_bytes: the largest body accepted.
    """

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, f"the request body ({declared} bytes) is over the limit of {self.max_bytes}")
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send, f"the request body is over the limit of {self.max_bytes} bytes")
                return
            more = message.get("more_body", False)
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    @staticmethod
    async def _refuse(send, reason: str) -> None:
        body = json.dumps({"detail": reason}).encode()
        # close the connection: the unread rest of the body must not be parsed as the next request
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:  # the HTTP parser already refuses these; never trust that blindly
                return None
    return None


def _replay(body: bytes, receive):
    """A `receive` that gives the buffered body once, then passes on to the real one (disconnect notices)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json_object(body: bytes) -> dict:
    """The JSON object in a request body, or MalformedBody naming what is wrong with it.

    Python's json module accepts NaN and Infinity and recurses once per nesting level: both are refused here, the
    first as not JSON (RFC 8259), the second as a RecursionError turned into a clear refusal.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MalformedBody(f"the body is not UTF-8 text (invalid byte at offset {error.start})") from error
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except RecursionError as error:
        raise MalformedBody("the JSON is nested too deeply") from error
    except ValueError as error:  # JSONDecodeError, an integer of too many digits, NaN / Infinity
        raise MalformedBody(f"the body is not valid JSON ({error})") from error
    if not isinstance(value, dict):
        raise MalformedBody(f"the body must be a JSON object, not {type(value).__name__}")
    return value
