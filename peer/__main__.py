"""``albert-peer`` / ``python -m peer``: join a training run and contribute until stopped (exit codes: ExitCode)."""

import logging
import os
import sys
from collections.abc import Callable

from peer.config import PeerConfig
from peer.hivemind_gaps.reaping import end_children
from peer.join import join_run
from peer.lifecycle import ExitCode, StopRequested
from peer.runtime import Peer, start_peer
from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.dht import SwarmJoinError
from peer.swarm.flags import explicit_fields, parse_configs
from peer.train import train

logger = logging.getLogger("peer")


def run(prepare: Callable[[Peer], None] | None = None) -> int:
    """Start a peer and train; ``prepare`` (tests only, e.g. tests/peer/faulty_peer.py) may change it in between."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hivemind.optim.progress_tracker").setLevel(logging.WARNING)  # it logs twice a second
    swarm, optim, config = parse_configs(SwarmConfig, OptimConfig, PeerConfig)
    try:
        if config.join:  # the run's signed manifest decides every run-wide setting
            explicit = explicit_fields(SwarmConfig, OptimConfig, PeerConfig)
            joined = join_run(swarm, optim, config, explicit)
            swarm, optim, config = joined.swarm, joined.optim, joined.config
        peer = start_peer(swarm, optim, config)
    except ValueError as error:  # includes the data package's CorpusError and TokenizerError
        logger.critical(f"Invalid setting: {error}")
        return ExitCode.USAGE
    except SwarmJoinError as error:
        logger.critical(str(error))
        return ExitCode.SWARM_UNREACHABLE
    except StopRequested as stop:
        return stop.exit_code
    try:
        if prepare is not None:
            prepare(peer)
        return train(peer)
    except StopRequested as stop:
        return stop.exit_code
    finally:
        peer.close()


def main(prepare: Callable[[Peer], None] | None = None) -> None:
    code = run(prepare)
    end_children()
    logging.shutdown()
    sys.stdout.flush(), sys.stderr.flush()
    # Everything is shut down and saved by now; hivemind's leftovers would hold up interpreter teardown ~10 s.
    os._exit(int(code))


if __name__ == "__main__":
    main()
