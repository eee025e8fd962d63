"""The seam between a peer and the swarm: what the training loop, backups and reports ask of a training mode, and
today's synchronous mode (``SynchronousSwarm``, around the hivemind.Optimizer that peer/swarm/optimizer.py builds) behind it.

Nothing outside this module and peer/swarm/optimizer.py touches hivemind.Optimizer, so a second mode (issue 17's local steps)
implements ``TrainingMode`` and nothing else, and the tests drive the loop with a small fake
(tests/peer/test_train_loop.py) or inject faults by wrapping the mode (tests/peer/faulty_peer.py).

Epochs. An epoch is one update of the model made together by the swarm; the run's learning-rate schedule, the
``--max-epochs`` limit, reports and backups all count in epochs. In terms of epochs:

- ``epoch``: how many swarm updates the local parameters include. It changes only in ``step`` (the update that
  ends an epoch; more than one at once when this peer catches up) and in ``load_state_from_peers`` or
  ``load_state_dict`` (it becomes the loaded state's epoch).
- ``step(batch_size, scaler)``: hand over the gradients of ``batch_size`` samples accumulated in the parameters'
  ``.grad``. Synchronous mode: hivemind accumulates them; the step that completes the swarm's target batch averages
  gradients with the other peers and applies one optimizer update, so ``epoch`` advances by one. A local-steps mode
  would take a local (inner) step on every call and an outer step with the swarm once per epoch. With ``scaler``
  (fp16), the step is unscaled and skipped if it overflowed.
- ``zero_grad()``: forget the gradients handed over (after every ``step``, or after a batch skipped as non-finite).
- ``is_averaging``: the next ``step`` ends an epoch, so it will wait for the swarm (shown to the user, nothing more).
- ``num_peers``, ``target_batch_size``: the swarm as this peer sees it (the peers training, this one included; the
  samples one epoch takes). ``presence_expiration``: seconds after which a silent peer is no longer counted, so
  ``num_peers == 1`` for twice as long means this peer is cut off (peer/hivemind_gaps/rejoin.py).
- ``state_dict()`` / ``load_state_dict(state)``: what a local backup must hold to resume this mode at its epoch,
  beside the model's own state dict (keys other than "epoch", "model_hash" and "model"; peer/backup.py writes them
  side by side in one file). Loading makes the mode use the model's current parameters (load the model first).
- ``backup_problem(state)``: None if ``load_state_dict(state)`` can take a backup's state, else why not (a backup
  written in the other training mode); asked before anything of the backup is loaded.
- ``load_state_from_peers()``: take the parameters, optimizer state and epoch from a peer of the swarm; returns the
  new ``epoch``, or None if no peer could provide one (the local state is kept).
- ``cancel()``: leaving: cancel the averaging rounds under way and start none (thread-safe; a stop signal calls it
  from another thread). ``shutdown()``: leave the swarm and release the averagers (once, at the end).
- ``update_guard`` and ``refused_states``: what this peer refused from the swarm (averaged gradients, downloaded
  states, state rounds), exported as metrics; a mode without such checks gives None and 0.
- ``averaged_bytes``: (sent, received) payload bytes of this peer's gradient or pseudo-gradient all-reduce rounds so
  far (peer/hivemind_gaps/traffic.py), exported as metrics; None where they are not counted.
- ``state_bytes``: (sent, received) payload bytes of the rounds that average the state itself so far (the
  local-steps mode's outer re-sync, where peers came apart), exported apart from ``averaged_bytes``;
  None where they are not counted (the synchronous mode's state rounds run inside hivemind's state averager).
- ``inner_step_seconds``: seconds this peer spent in its own optimizer's steps, apart from the swarm's rounds (the
  local-steps mode's inner steps: compute, as forward and backward are), exported as a metric; None where a step
  cannot be told apart from averaging (the synchronous mode's optimizer steps only at an epoch's all-reduce).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import hivemind
import torch

from peer.hivemind_gaps.robust_allreduce import RobustAggregation, RoundScores
from peer.hivemind_gaps.update_guard import UpdateGuard
from peer.swarm.optimizer import download_state


@runtime_checkable
class TrainingMode(Protocol):
    """How a peer trains with the swarm; the module's docstring says what each member means in epochs."""

    @property
    def epoch(self) -> int: ...

    @property
    def is_averaging(self) -> bool: ...

    @property
    def num_peers(self) -> int: ...

    @property
    def target_batch_size(self) -> int: ...

    @property
    def presence_expiration(self) -> float: ...

    @property
    def update_guard(self) -> UpdateGuard | None: ...

    @property
    def refused_states(self) -> int: ...

    @property
    def averaged_bytes(self) -> tuple[int, int] | None: ...

    @property
    def state_bytes(self) -> tuple[int, int] | None: ...

    @property
    def inner_step_seconds(self) -> float | None: ...

    def step(self, batch_size: int, scaler: torch.amp.GradScaler | None = None) -> None: ...

    def take_round_scores(self) -> list[RoundScores]:
        """Sender scores of the all-reduce rounds this peer reduced robustly since the last call ([] with mean)."""
        ...

    def zero_grad(self) -> None: ...

    def state_dict(self) -> dict: ...

    def backup_problem(self, state: dict) -> str | None: ...

    def load_state_dict(self, state: dict) -> None: ...

    def load_state_from_peers(self) -> int | None: ...

    def cancel(self) -> None: ...

    def shutdown(self) -> None: ...


class SynchronousSwarm:
    """Today's mode: every peer's gradients are averaged into one update per epoch (hivemind.Optimizer).

    Args:
        optimizer: the optimizer built by ``peer.swarm.optimizer.build_optimizer`` (a SwarmOptimizer, which can cancel rounds).
    """

    def __init__(self, optimizer: hivemind.Optimizer):
        self.optimizer = optimizer

    @property
    def epoch(self) -> int:
        return self.optimizer.local_epoch

    @property
    def is_averaging(self) -> bool:
        return self.optimizer.tracker.ready_to_update_epoch

    @property
    def num_peers(self) -> int:
        return self.optimizer.tracker.global_progress.num_peers

    @property
    def target_batch_size(self) -> int:
        return self.optimizer.tracker.global_progress.target_batch_size

    @property
    def presence_expiration(self) -> float:
        return self.optimizer.tracker.metadata_expiration

    @property
    def update_guard(self) -> UpdateGuard | None:
        return getattr(self.optimizer, "update_guard", None)

    @property
    def refused_states(self) -> int:
        averager = self.optimizer.state_averager  # downloads refused, and state rounds whose mean was not finite
        return getattr(averager, "refused_states", 0) + getattr(averager, "refused_state_rounds", 0)

    @property
    def averaged_bytes(self) -> tuple[int, int]:
        averager = self.optimizer.grad_averager  # every gradient averager of peer/swarm/optimizer.py counts
        return averager.bytes_sent, averager.bytes_received

    @property
    def state_bytes(self) -> None:
        return None

    @property
    def inner_step_seconds(self) -> None:
        return None

    def take_round_scores(self) -> list[RoundScores]:
        averager = self.optimizer.grad_averager
        return averager.take_round_scores() if isinstance(averager, RobustAggregation) else []

    def step(self, batch_size: int, scaler: torch.amp.GradScaler | None = None) -> None:
        if scaler is None:
            self.optimizer.step(batch_size=batch_size)
        else:
            scaler.step(self.optimizer, batch_size=batch_size)
            scaler.update()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        # hivemind's optimizer state dict carries the epoch; the scheduler lives in its state averager
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.optimizer.state_averager.scheduler.state_dict(),
        }

    def backup_problem(self, state: dict) -> str | None:
        if "optimizer" not in state:
            return "it holds no synchronous-mode optimizer state (written in local-steps mode?)"
        return None

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer.state_averager.scheduler.load_state_dict(state["scheduler"])
        copy_parameters_into_optimizer(self.optimizer)

    def load_state_from_peers(self) -> int | None:
        return download_state(self.optimizer)

    def cancel(self) -> None:
        self.optimizer.cancel_averaging()

    def shutdown(self) -> None:
        self.optimizer.shutdown()


@torch.no_grad()
def copy_parameters_into_optimizer(optimizer: hivemind.Optimizer) -> None:
    """Copy the model's parameters into the optimizer's own copies (offloaded to host memory by hivemind).

    Without this, the next optimizer step would write the stale offloaded copies back over the restored model.
    """
    for model_group, optimizer_group in zip(optimizer.param_groups, optimizer.opt.param_groups):
        for model_param, optimizer_param in zip(model_group["params"], optimizer_group["params"]):
            if optimizer_param is not model_param:
                optimizer_param.copy_(model_param)
