"""How a peer stops: exit codes, SIGINT/SIGTERM handling (a preempted spot instance) and a hard shutdown deadline."""

from __future__ import annotations

import contextlib
import enum
import faulthandler
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

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


def force_exit(code: int) -> None:
    """Last resort when shutdown hangs: kill our child processes (DHT, averagers) and their p2pd, then exit."""
    logger.error("Shutdown did not finish in time; killing child processes and exiting. Where each thread was:")
    faulthandler.dump_traceback(all_threads=True)  # to stderr: what hung, for a bug report
    for child in multiprocessing.active_children():
        _kill([*descendants(child.pid), child.pid])
    os._exit(code)


def end_children(grace: float = 3.0) -> list[int]:
    """After shutdown: give child processes (DHT, averagers, p2pd) ``grace`` seconds to exit, then SIGKILL the rest
    (torch's torch_shm_manager excepted: it exits by itself after us, cleaning up shared memory).

    hivemind's shutdowns can return while a child still waits on a peer that is frozen or gone; exiting with
    ``os._exit`` would orphan it. Returns the pids that had to be killed.
    """
    deadline = time.monotonic() + grace
    while (remaining := _live_children()) and time.monotonic() < deadline:
        time.sleep(0.1)
    _kill(remaining)
    if remaining:
        names = ", ".join(f"{_command_name(pid)} ({pid})" for pid in remaining)
        logger.warning(f"Child processes still running {grace:g} s after shutdown, killed: {names}")
    return remaining


def _live_children() -> list[int]:
    # torch_shm_manager is left alone: it unlinks shared memory once its clients are gone, i.e. after we exit
    return [pid for pid in _live(descendants(os.getpid())) if not _command_name(pid).startswith("torch_shm_manag")]


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _command_name(pid: int) -> str:
    """The process's command name (at most 15 characters: /proc's comm), or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _live(pids: list[int]) -> list[int]:
    """The pids that are not zombies (a zombie has exited; only its parent's wait is missing)."""
    alive = []
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
    return alive


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (Linux /proc; empty elsewhere), deepest first."""
    found = []
    for children_file in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in children_file.read_text().split():
                found += [*descendants(int(child)), int(child)]
    return found
