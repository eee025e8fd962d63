"""Keeping non-finite numbers out of the swarm: checks, and recovery from peers or a backup.

Faults are injected by the tests from outside the loop, through the training mode (tests/peer/faulty_peer.py).
"""

from __future__ import annotations

import logging
import time

import torch

from peer.backup import Backups
from peer.swarm.finite import all_finite
from peer.training_mode import TrainingMode

logger = logging.getLogger(__name__)
# A peer whose parameters turn non-finite right as it reaches a new epoch finds the other peers still finishing that
# step: hivemind refuses their states as behind its own epoch (seen in CI: the peer fell back to an older backup).
# A few retries a few seconds apart take the swarm's state of the new epoch instead.
PEER_ATTEMPTS = 3
PEER_RETRY_DELAY = 2.0  # seconds; a tiny-preset epoch step takes ~1 s on 2 cores


def gradients_finite(model: torch.nn.Module) -> bool:
    return all_finite(param.grad for param in model.parameters() if param.grad is not None)


def parameters_finite(model: torch.nn.Module) -> bool:
    return all_finite(model.parameters())


def recover_parameters(model: torch.nn.Module, training: TrainingMode, backups: Backups) -> bool:
    """After non-finite parameters: reload state from peers, else from the newest backup. True if finite again."""
    logger.error(f"Parameters became non-finite at epoch {training.epoch}: reloading state from peers")
    for attempt in range(PEER_ATTEMPTS):
        if attempt:  # the donors were still finishing the step that took this peer to its epoch
            time.sleep(PEER_RETRY_DELAY)
        training.load_state_from_peers()
        if parameters_finite(model):
            logger.warning(f"Recovered: parameters reloaded from peers at epoch {training.epoch}")
            return True
    for epoch in reversed(backups.epochs()):
        logger.error(f"Peers could not provide usable state: restoring the local backup of epoch {epoch}")
        if backups.restore(epoch, model, training) and parameters_finite(model):
            return True
    logger.critical("No peer and no local backup holds finite parameters: cannot go on")
    return False
