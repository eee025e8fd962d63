"""A state download from peers that gives up: hivemind 1.1.12 retries a failing one forever.

``hivemind.Optimizer.load_state_from_peers`` loops until the state averager's download succeeds, catching every
exception but KeyboardInterrupt (hivemind issue #653). A peer whose only source of state is unreachable would hang
there; ``bound_state_downloads`` makes the download raise a KeyboardInterrupt subclass after a number of failures.
"""

from __future__ import annotations

import hivemind


class StateDownloadFailed(KeyboardInterrupt):
    """Raised after too many failed attempts to download the swarm's state.

    A KeyboardInterrupt subclass because hivemind's ``Optimizer.load_state_from_peers`` retries forever on any other
    exception; this is the one exception type it lets through.
    """


def bound_state_downloads(optimizer: hivemind.Optimizer, max_attempts: int) -> None:
    """Make ``optimizer.load_state_from_peers`` give up (raising StateDownloadFailed) after ``max_attempts`` errors.

    hivemind retries a failing download forever, which would hang a peer whose only source of state is unreachable.
    """
    state_averager = optimizer.state_averager
    download = state_averager.load_state_from_peers
    failures = 0

    def bounded_download(**kwargs):
        nonlocal failures
        try:
            result = download(**kwargs)
        except Exception as error:
            failures += 1
            if failures >= max_attempts:
                failures = 0
                raise StateDownloadFailed(f"gave up downloading state after {max_attempts} attempts") from error
            raise
        failures = 0
        return result

    state_averager.load_state_from_peers = bounded_download
