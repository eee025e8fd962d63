"""`albert-monitor` / `python -m monitor`: bootstrap a run, aggregate progress, serve a dashboard, keep checkpoints."""

import logging
import signal
import sys

from monitor.config import parse_monitor_args
from monitor.node import Monitor
from peer.swarm.dht import SwarmJoinError


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    swarm, optim, config = parse_monitor_args()
    try:
        # in the main thread: hivemind's averager needs it; a failed start has released what it started
        monitor = Monitor(swarm, optim, config)
    except SwarmJoinError as error:  # one line naming the cause and its fix; the exit code a peer uses for it
        logging.getLogger("monitor").error(f"albert-monitor cannot run: {error}")
        return SwarmJoinError.exit_code
    except (ValueError, OSError) as error:
        logging.getLogger("monitor").error(f"albert-monitor cannot run: {error}")
        return 1
    with monitor:  # shuts down on the way out
        for signum in (signal.SIGINT, signal.SIGTERM):  # the averager set SIGINT to be ignored: ours go in after it
            signal.signal(signum, lambda *_: monitor.stop())
        monitor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
