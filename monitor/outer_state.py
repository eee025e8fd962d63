"""The state the monitor keeps in a local-steps (DiLoCo) run: the outer weights and the outer momentum.

It downloads them from the peers as a joiner does (peer/local_steps.py: hivemind's donor loop with every donor's
state checked in the averager's process before it is taken: layout, format, finite and bounded values, a plausible
epoch, a bounded stream; peer/hivemind_gaps/state_check.py), serves them to joiners under the peers' own prefix at
priority epoch - 0.5 (a trainer at the same epoch is asked first; with every trainer gone, the monitor), and writes
the outer weights as a checkpoint that loads with stock transformers, like the synchronous mode's.

What it does not hold: the peers' inner optimizers (private to each peer: a joiner starts its own fresh, see
peer/local_steps.py) and their local weights between outer steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import hivemind
import torch

from monitor.checkpoint import TRAINING_STATE
from monitor.state import NonFiniteState, RunModel, load_training_state
from peer.hivemind_gaps.averager_guard import MembershipCheck
from peer.hivemind_gaps.averagers import GuardedOuterAverager, OuterAverager
from peer.hivemind_gaps.state_check import EPOCH_MARGIN, MAX_EPOCH
from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.finite import all_finite
from peer.swarm.optimizer import COMPRESSION_FACTORIES
from peer.swarm.outer_state import STATE_FORMAT, copy_into, outer_prefix, outer_state_layout, trainable

logger = logging.getLogger(__name__)
MODE = "local-steps"  # training_state.pt's "mode" (a synchronous checkpoint has none)


class OuterStateKeeper:
    """Holds the run's outer state; the same interface as monitor/state.py's StateKeeper (the monitor uses either).

    Build it in the main thread (hivemind installs signal handlers).

    Args:
        dht: the monitor's DHT node (not client mode: joiners download from it).
        swarm: network settings (run_id gives the prefix).
        optim: the run's optimizer settings (the state compression peers serve with).
        run_model: the model whose trainable parameters the outer weights are; a checkpoint writes them into it.
        client_mode: True for a keeper that only downloads.
        membership: in a closed run, the check that lets only run members download from the keeper.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        swarm: SwarmConfig,
        optim: OptimConfig,
        run_model: RunModel,
        client_mode: bool = False,
        membership: MembershipCheck | None = None,
    ):
        self.optim, self.run_model, self.client_mode = optim, run_model, client_mode
        self.outer = [parameter.detach().float().cpu().clone() for parameter in trainable(run_model.model)]
        self.momentum = [torch.zeros_like(weight) for weight in self.outer]
        self.has_state, self._epoch = False, 0
        averager_class = OuterAverager if membership is None else partial(GuardedOuterAverager, membership=membership)
        self.averager = averager_class(
            [torch.zeros(1)],  # it never averages (no step): the served state is the outer state, not these
            dht,
            state_provider=self._served_state,
            state_layout=outer_state_layout([*self.outer, *self.momentum]),
            prefix=outer_prefix(swarm.run_id),
            state_compression=COMPRESSION_FACTORIES[optim.state_compression](),
            client_mode=client_mode,
            allow_state_sharing=False,  # enabled once it holds a real state, never the monitor's initialisation
            start=True,
        )

    @property
    def epoch(self) -> int:
        """The outer step of the state held, or -1 before one was downloaded or resumed."""
        return self._epoch if self.has_state else -1

    def _served_state(self):
        metadata = {"epoch": self._epoch, "format": STATE_FORMAT}
        return metadata, [tensor.clone() for tensor in (*self.outer, *self.momentum)], None

    def fetch(self, timeout: float, swarm_epoch: int | None = None) -> bool:
        """Download the newest outer state; True if the keeper now holds one newer than before."""
        before, started = self.epoch, time.monotonic()
        known = max(before, swarm_epoch if swarm_epoch is not None else before)
        self.averager.epoch_limit = None if swarm_epoch is None else (lambda: known + EPOCH_MARGIN)
        try:
            loaded = self.averager.load_state_from_peers(timeout=timeout)
        except (TimeoutError, RuntimeError, OSError) as error:
            logger.warning(f"Could not download the swarm's outer state: {error!r}")
            return False
        if loaded is None:
            return False
        metadata, tensors = loaded  # checked per donor against the layout (peer/swarm/outer_state.py)
        if metadata["epoch"] <= before:
            return False  # nobody shared a newer state
        self._take(metadata["epoch"], tensors)
        logger.info(f"Downloaded the swarm's outer state of epoch {self.epoch} in {time.monotonic() - started:.1f} s")
        return True

    def _take(self, epoch: int, tensors) -> None:
        copy_into([*self.outer, *self.momentum], list(tensors))
        self._epoch, self.has_state = epoch, True
        if not self.client_mode:  # a client cannot accept connections, so it cannot share
            self.averager.allow_state_sharing = True
            self.averager.state_sharing_priority = epoch - 0.5

    def resume(self, directory: str | Path) -> int:
        """Take the outer weights (the checkpoint's model, already loaded into the run's model by build_run_model),
        the outer momentum and the outer step from a local-steps checkpoint."""
        state = load_training_state(directory, required=("epoch", "outer_momentum"))
        epoch, momentum = state["epoch"], state["outer_momentum"]
        if type(epoch) is not int or not 0 <= epoch <= MAX_EPOCH:
            raise ValueError(f"--resume_from checkpoint {directory}: its epoch {epoch!r} is not in [0, {MAX_EPOCH}]")
        weights = [parameter.detach().float().cpu() for parameter in trainable(self.run_model.model)]
        loaded = [torch.zeros_like(tensor) for tensor in self.momentum]  # checked whole before anything is taken
        try:
            copy_into(loaded, momentum)
        except (ValueError, TypeError, AttributeError) as error:
            raise ValueError(
                f"--resume_from checkpoint {directory}: its outer momentum does not fit: {error}"
            ) from error
        if not all_finite([*weights, *loaded]):
            raise NonFiniteState(f"--resume_from checkpoint {directory} holds NaN or infinite values")
        self._take(epoch, [*weights, *loaded])
        logger.info(f"Resumed the outer state of epoch {self.epoch} from {directory}")
        return self.epoch

    def state_problem(self) -> str | None:
        if not all_finite([*self.outer, *self.momentum]):
            return "the outer weights or momentum hold NaN or infinite values"
        return None

    def write(self, directory: Path) -> None:
        """Fill a checkpoint directory: the outer weights as a save_pretrained model, the tokenizer, and
        training_state.pt with the mode, the outer step and the outer momentum (NonFiniteState if not finite)."""
        problem = self.state_problem()
        if problem:
            raise NonFiniteState(f"not writing a checkpoint of outer step {self._epoch}: {problem}")
        with torch.no_grad():
            copy_into(trainable(self.run_model.model), self.outer)
        self.run_model.model.save_pretrained(directory)
        self.run_model.tokenizer.save_pretrained(directory)
        training_state = {
            "epoch": self._epoch,
            "mode": MODE,
            "outer_step": self._epoch,
            "outer_momentum": [tensor.clone() for tensor in self.momentum],
            "optim_config": asdict(self.optim),
            "model_fingerprint": self.run_model.fingerprint,
        }
        torch.save(training_state, directory / TRAINING_STATE)

    def shutdown(self) -> None:
        self.averager.shutdown()
