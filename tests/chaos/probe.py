"""Measures a chaos link from inside namespaces: round-trip time and throughput over one TCP connection.

``python -m tests.chaos.probe serve PORT`` echoes lines and swallows bulk data; ``python -m tests.chaos.probe measure
HOST PORT`` prints {"rtt_ms": median of 20 echo round trips, "mbit": upload rate of 2 MB} as JSON.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import time

BULK = 2 * 1024 * 1024


def serve(port: int) -> None:
    with socket.create_server(("0.0.0.0", port)) as server:
        print("probe listening", flush=True)
        while True:
            connection, _ = server.accept()
            with connection, connection.makefile("rwb") as stream:
                for line in stream:
                    if line.startswith(b"bulk"):
                        stream.read(BULK)
                    stream.write(line)
                    stream.flush()


def measure(host: str, port: int) -> dict:
    with socket.create_connection((host, port), timeout=10) as connection, connection.makefile("rwb") as stream:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for index in range(20):
            started = time.perf_counter()
            stream.write(f"ping {index}\n".encode())
            stream.flush()
            stream.readline()
            rtts.append(time.perf_counter() - started)
        started = time.perf_counter()
        stream.write(b"bulk\n" + bytes(BULK))
        stream.flush()
        stream.readline()
        seconds = time.perf_counter() - started
    return {"rtt_ms": statistics.median(rtts) * 1000, "mbit": BULK * 8 / seconds / 1e6}


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]))))
