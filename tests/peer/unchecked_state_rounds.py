"""The CLI's peer (``python -m peer``) with the state-round check taken out, for the control of
tests/peer/test_state_rounds.py: every state round's mean is applied as it is, as hivemind 1.1.12 applies it.

    python -m tests.peer.unchecked_state_rounds FLAGS
"""

from __future__ import annotations

import sys

from peer.__main__ import main
from peer.hivemind_gaps.state_rounds import CheckedStateRounds


def applied_as_they_are(self, tensors, updates, peers):
    return updates


if __name__ == "__main__":
    CheckedStateRounds._checked_updates = applied_as_they_are  # before the averager's process is forked
    sys.exit(main())
