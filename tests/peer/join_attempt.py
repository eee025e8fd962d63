"""Test helper: start a DHT with the swarm flags given (``python -m tests.peer.join_attempt --initial_peers ...``).

It prints the one line of a SwarmJoinError and exits with its code, or prints "joined" and exits 0. Used where the
attempt needs a process of its own: inside a network namespace, or with a broken hivemind installation first on
PYTHONPATH.
"""

import os
import sys

from peer.swarm.config import SwarmConfig
from peer.swarm.dht import SwarmJoinError, build_dht
from peer.swarm.flags import parse_configs


def main() -> int:
    (swarm,) = parse_configs(SwarmConfig)
    try:
        dht = build_dht(swarm)
    except SwarmJoinError as error:
        print(error, flush=True)
        return SwarmJoinError.exit_code
    print("joined", flush=True)
    dht.shutdown()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # hivemind's leftovers would hold up interpreter teardown
