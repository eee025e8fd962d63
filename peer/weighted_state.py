"""State averaging that weighs each peer by how many peers' gradients went into its last update.

In a swarm of more than two, an epoch's gradient all-reduce often splits: most peers average together, while a peer
that noticed the new epoch late finds no group and steps on its own few samples ("Proceeding with local gradients"),
or a pair averages apart from the rest. LAMB normalises every step, so that lone step is as long as the group's,
only noisier, and hivemind then averages parameters with equal weights: one lagging peer in four pulls a quarter of
the group's step back toward its own. Weighing each peer by the size of the gradient group behind its parameters
averages updates the way one large batch would (a lone step counts for one peer's samples, not for a quarter of the
swarm's).
"""

from __future__ import annotations

from concurrent.futures import Future


def peers_in_round(control: Future | None) -> int:
    """How many peers a finished gradient averaging round included (1: it failed or never ran, local gradients)."""
    if control is None or not control.done() or control.cancelled() or control.exception() is not None:
        return 1
    return max(1, len(control.result()))


class WeightedStateRounds:
    """For a TrainingStateAverager: state averaging rounds use ``state_weight`` (when set) as this peer's weight."""

    state_weight: float | None = None

    def step(self, *args, averaging_round=False, averaging_control=None, averaging_opts=None, **kwargs):
        if averaging_round and self.state_weight is not None:
            if averaging_control is not None:  # a pre-scheduled round: its weight counts until its all-reduce begins
                averaging_control.weight = self.state_weight
            else:
                averaging_opts = {**(averaging_opts or {}), "weight": self.state_weight}
        return super().step(
            *args,
            averaging_round=averaging_round,
            averaging_control=averaging_control,
            averaging_opts=averaging_opts,
            **kwargs,
        )
