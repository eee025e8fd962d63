"""`albert-monitor` / `python -m monitor`: bootstrap a run, aggregate progress, serve a dashboard, keep checkpoints."""

import logging
import signal
import sys

from monitor.config import parse_monitor_args
from monitor.node import Monitor
from peer.swarm import SwarmJoinError


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    swarm, optim, config = parse_monitor_args()
    monitor = Monitor(swarm, optim, config)
    try:
        monitor.start()  # in the main thread: hivemind's averager needs it, and it sets SIGINT to be ignored...
        for signum in (signal.SIGINT, signal.SIGTERM):  # ...so our handlers go in afterwards
            signal.signal(signum, lambda *_: monitor.stop())
        monitor.run()
    except (SwarmJoinError, ValueError, OSError) as error:
        logging.getLogger("monitor").error(f"albert-monitor cannot run: {error}")
        return 1
    finally:
        monitor.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
