"""State averaging weights: a peer counts for as many peers as its last gradient round averaged."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace

from peer.weighted_state import WeightedStateRounds, peers_in_round


def finished(result=None, error: BaseException | None = None) -> Future:
    future = Future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
    return future


def test_a_round_counts_its_peers_and_a_failed_or_missing_round_counts_one():
    assert peers_in_round(finished({"a": None, "b": None, "c": None})) == 3
    assert peers_in_round(None) == 1  # no other peer: local gradients
    assert peers_in_round(Future()) == 1  # timed out, still pending
    assert peers_in_round(finished(error=TimeoutError())) == 1
    cancelled = Future()
    cancelled.cancel()
    assert peers_in_round(cancelled) == 1


class RecordingAverager:
    """Stands in for TrainingStateAverager.step: records what the weighting layer passed on."""

    def step(self, **kwargs):
        self.received = kwargs
        return "stepped"


class Weighted(WeightedStateRounds, RecordingAverager):
    pass


def test_the_weight_goes_to_a_prescheduled_round_or_into_the_averaging_options():
    averager = Weighted()
    averager.state_weight = 3.0
    control = SimpleNamespace(weight=1.0)
    assert averager.step(averaging_round=True, averaging_control=control, increment_epoch=True) == "stepped"
    assert control.weight == 3.0 and averager.received["increment_epoch"] is True

    averager.step(averaging_round=True, averaging_opts={"timeout": 30})
    assert averager.received["averaging_opts"] == {"timeout": 30, "weight": 3.0}


def test_no_weight_without_a_state_round_or_before_the_first_gradient_round():
    averager = Weighted()
    averager.state_weight = 2.0
    averager.step(averaging_round=False, averaging_opts=None)
    assert averager.received["averaging_opts"] is None
    fresh = Weighted()  # state_weight None: hivemind's default weight
    control = SimpleNamespace(weight=1.0)
    fresh.step(averaging_round=True, averaging_control=control)
    assert control.weight == 1.0
