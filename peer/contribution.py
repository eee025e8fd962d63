"""What this peer has contributed over its whole life under one signing key: samples and compute seconds.

The signed record carries these totals, so the monitor's count does not depend on reading every per-epoch record (a
record can expire or be overwritten unread, a peer can die between two). The totals are kept in a small JSON file
next to the peer's identity and written (atomically) before each publication, so a restarted peer goes on from what
it last published and logged; work done after that and lost in a crash was never claimed by anyone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

from peer.swarm.progress import MAX_COUNT

logger = logging.getLogger(__name__)


class Contribution:
    """Cumulative samples and compute seconds, persisted to ``path`` by ``save`` (None: kept in memory only).

    Args:
        path: the ledger file; read at start if present. A peer without ``--identity-path`` signs with a fresh key
            at every start, so it is a new contributor each time and keeps no file.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.samples, self.compute_seconds = 0, 0.0
        if self.path is not None and self.path.is_file():
            self.samples, self.compute_seconds = _read(self.path)

    def add(self, samples: int, compute_seconds: float) -> None:
        self.samples += samples
        self.compute_seconds += compute_seconds

    def save(self) -> None:
        """Write the totals through a temporary file and a rename: a crash leaves the old file or the new one."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"samples": self.samples, "compute_seconds": self.compute_seconds})
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=".contribution-", delete=False) as tmp:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, self.path)


def contribution_path(identity_path: str | os.PathLike | None) -> Path | None:
    """The ledger file of the peer whose identity file is ``identity_path`` (None without one)."""
    return Path(f"{identity_path}.contribution.json") if identity_path else None


def _read(path: Path) -> tuple[int, float]:
    """The totals in a ledger file; ValueError naming the file if it is not one (a peer must not restart at 0)."""
    try:
        values = json.loads(path.read_text())
        samples, seconds = values["samples"], values["compute_seconds"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} is not a contribution ledger ({error!r}); move it away to start counting at 0"
        ) from error
    # the totals go into the signed record, whose schema takes finite numbers up to MAX_COUNT only: a file outside
    # that would stop the peer at its first epoch instead of here, at start, naming the file
    plausible_samples = type(samples) is int and 0 <= samples <= MAX_COUNT
    plausible_seconds = type(seconds) in (int, float) and math.isfinite(seconds) and 0 <= seconds <= MAX_COUNT
    if not (plausible_samples and plausible_seconds):
        raise ValueError(f"{path} holds impossible totals ({samples!r} samples, {seconds!r} s)")
    return samples, float(seconds)
