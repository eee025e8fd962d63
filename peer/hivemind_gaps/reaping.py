"""Reaping hivemind's child processes: a DHT, two averagers and their p2pd daemons that a shutdown left running.

hivemind 1.1.12's ``shutdown`` calls can return (or hang) while a child process still waits on a peer that is frozen
or gone, and a process that then exits with ``os._exit`` orphans it, p2pd included (tests/peer/test_faults.py and
tests/peer/test_stop.py check that no p2pd is left behind). ``end_children`` is called after a normal shutdown,
``force_exit`` by the stop deadline's watchdog (peer/lifecycle.py).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

logger = logging.getLogger(__name__)


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
