"""How a peer stops: exit codes, SIGINT/SIGTERM handling (a preempted spot instance) and a hard shutdown deadline.

What is left of hivemind's child processes after a shutdown is reaped by peer/hivemind_gaps/reaping.py.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import signal
import threading
from collections.abc import Callable

from peer.hivemind_gaps.reaping import force_exit

logger = logging.getLogger(__name__)


class ExitCode(enum.IntEnum):
    """Process exit status of ``albert-peer``; a stop by signal exits with 128 + the signal's number (130, 143)."""

    OK = 0  # reached --max-epochs
    ERROR = 1  # unexpected internal error (a traceback is logged)
    USAGE = 2  # invalid flags, environment variables, model or tokenizer
    SWARM_UNREACHABLE = 3  # the DHT could not start or no initial peer answered
    DIVERGED = 4  # parameters became non-finite and neither the swarm nor a local backup could restore them


class StopRequested(KeyboardInterrupt):
    """Raised inside a long swarm call (an averaging round, a state download) when a stop signal arrives.

    A KeyboardInterrupt subclass so that hivemind's retry loops let it through.

    Args:
        signum: the signal that asked to stop.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignal:
    """Turns SIGINT/SIGTERM into a stop request the training loop polls between batches.

    Install it after building hivemind.Optimizer: starting its averagers sets SIGINT to "ignore".

    Args:
        shutdown_deadline: seconds after the signal by which the process exits, even if shutdown hangs.
    """

    def __init__(self, shutdown_deadline: float = 12.0):
        self.shutdown_deadline = shutdown_deadline
        self.signum: int | None = None
        self._interruptible = False
        self._on_stop: list[Callable[[], object]] = []

    def on_stop(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` (in a thread of its own) when the first stop signal arrives, e.g. to cancel waits that
        the main thread is stuck in and a StopRequested cannot end (hivemind catches it in places and goes on)."""
        self._on_stop.append(callback)

    def install(self) -> StopSignal:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)
        return self

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def exit_code(self, default: int = ExitCode.OK) -> int:
        return 128 + self.signum if self.requested else int(default)

    @contextlib.contextmanager
    def interruptible(self):
        """Within this block a stop signal interrupts the call at once instead of waiting for the next batch."""
        self._interruptible = True
        try:
            if self.requested:  # the signal came while we computed: do not start a swarm call that may take minutes
                raise StopRequested(self.signum)
            yield
        finally:
            self._interruptible = False

    def _handle(self, signum, frame):
        first = not self.requested
        self.signum = signum
        if first:
            logger.warning(f"Received {signal.Signals(signum).name}: saving a backup and leaving the swarm")
            watchdog = threading.Timer(self.shutdown_deadline, force_exit, args=(128 + signum,))
            watchdog.daemon = True
            watchdog.start()
            threading.Thread(target=self._run_stop_callbacks, name="on-stop", daemon=True).start()
        if self._interruptible or not first:
            raise StopRequested(signum)

    def _run_stop_callbacks(self) -> None:
        for callback in self._on_stop:
            try:
                callback()
            except Exception as error:  # noqa: BLE001 -- the stop goes on; the watchdog still bounds it
                logger.error(f"While stopping, {callback} failed: {error!r}")
