"""A transparent TCP relay that delays every chunk by a fixed time: latency for a kernel without netem.

Run it inside a node's namespace (``python -m tests.chaos.relay --port P --delay-ms D``) after
``Node.redirect_tcp_to(P)``: iptables REDIRECT hands it the node's incoming and outgoing TCP connections, it reads
each one's original destination (SO_ORIGINAL_DST), dials it with a firewall mark the redirect rules let through, and
forwards both directions, each chunk held back ``D`` ms after it arrived (order kept, so TCP sees a longer path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
import time

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
SO_MARK = 36  # asm-generic/socket.h; not exported by Python's socket module
CHUNK = 64 * 1024


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a REDIRECTed connection was going (struct sockaddr_in: family, port, address)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!H4s", raw, 2)
    return socket.inet_ntoa(packed), port


async def dial(destination: tuple[str, int], mark: int):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, destination)
    except OSError:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy reader to writer, each chunk written ``delay`` seconds after it was read; pass EOF on the same way."""
    queue: asyncio.Queue = asyncio.Queue()

    async def read():
        while chunk := await reader.read(CHUNK):
            queue.put_nowait((time.monotonic() + delay, chunk))
        queue.put_nowait((time.monotonic() + delay, b""))

    reading = asyncio.create_task(read())
    try:
        while True:
            due, chunk = await queue.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()
    finally:
        reading.cancel()


class DelayingRelay:
    """Accepts redirected connections and relays each to its original destination with ``delay`` each way.

    Args:
        delay: seconds added to every chunk in each direction (the round trip grows by twice this).
        mark: firewall mark of the relay's own outgoing connections.
    """

    def __init__(self, delay: float, mark: int):
        self.delay, self.mark = delay, mark

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_writer = None
        try:
            destination = original_destination(writer.get_extra_info("socket"))
            upstream_reader, upstream_writer = await dial(destination, self.mark)
            await asyncio.gather(
                forward(reader, upstream_writer, self.delay), forward(upstream_reader, writer, self.delay)
            )
        except (OSError, asyncio.IncompleteReadError):
            pass  # a peer that vanished mid-connection: close both sides, as a router would
        finally:
            for side in (writer, upstream_writer):
                if side is not None:
                    side.close()

    async def serve(self, port: int) -> None:
        server = await asyncio.start_server(self.handle, "0.0.0.0", port)
        print(f"relay listening on port {port} with {self.delay * 1000:.0f} ms each way", flush=True)
        async with server:
            await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="port the iptables REDIRECT rules point at")
    parser.add_argument("--delay-ms", type=float, required=True, help="delay added to each chunk, each way")
    parser.add_argument("--mark", type=lambda text: int(text, 0), default=0x5A, help="mark of outgoing connections")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(DelayingRelay(args.delay_ms / 1000, args.mark).serve(args.port))


if __name__ == "__main__":
    main()
