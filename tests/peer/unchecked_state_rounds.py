"""The CLI's peer (``python -m peer``) with the state-round checks taken out, for the control of
tests/peer/test_state_rounds.py: every state round's parts are reduced and its mean applied as they are, as
hivemind 1.1.12 does (its AllReduceRunner, no check of the result).

    python -m tests.peer.unchecked_state_rounds FLAGS
"""

from __future__ import annotations

import sys

from hivemind.averaging.allreduce import AllReduceRunner

from peer.__main__ import main
from peer.hivemind_gaps import state_rounds
from peer.hivemind_gaps.state_rounds import CheckedStateRounds


def applied_as_they_are(self, tensors, updates, peers):
    return updates


if __name__ == "__main__":
    CheckedStateRounds._checked_updates = applied_as_they_are  # before the averager's process is forked
    state_rounds.CheckedAllReduceRunner = AllReduceRunner  # the runner its mean rounds build
    sys.exit(main())
