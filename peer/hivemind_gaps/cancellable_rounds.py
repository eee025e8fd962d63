"""Averaging rounds a leaving peer can cancel, so that stopping never waits for a group that will not form.

hivemind waits for a background averaging round (its matchmaking retries included) up to the averaging timeout,
and queues the next optimizer step behind it; on shutdown it waits for it again. A stopped peer whose partners are
frozen or leaving too would sit out that timeout instead of saving its state and exiting.
"""

from __future__ import annotations

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import StepControl


class CancellableRounds(DecentralizedAverager):
    """Remembers every averaging round it starts; ``cancel_averaging`` cancels those not finished, and any started
    afterwards, at once.

    Put it after TrainingStateAverager among the bases (``class X(TrainingStateAverager, CancellableRounds)``): its
    ``step`` is then the one TrainingStateAverager calls for every round, pre-scheduled or started in the background.
    """

    def __init__(self, *args, **kwargs):
        self._rounds: list[StepControl] = []
        self._leaving = False
        super().__init__(*args, **kwargs)

    def step(self, *args, **kwargs):
        result = super().step(*args, **kwargs)
        if isinstance(result, StepControl):  # wait=False: a round in progress (wait=True returns its result)
            self._rounds = [*(known for known in self._rounds if not known.done()), result]
            if self._leaving:
                result.cancel()
        return result

    def cancel_averaging(self) -> int:
        """Cancel the unfinished rounds and every later one (thread-safe); returns how many were cancelled now."""
        self._leaving = True
        cancelled = sum(1 for control in self._rounds if not control.done() and control.cancel())
        self._rounds = []
        return cancelled
