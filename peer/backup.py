"""Local backups of the training state (model, the training mode's state, epoch), written atomically, newest k kept."""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

from peer.training_mode import TrainingMode

logger = logging.getLogger(__name__)
BACKUP_NAME = re.compile(r"^epoch-(\d+)\.pt$")


class Backups:
    """The backups of one peer, one file per epoch: ``<directory>/epoch-000123.pt``.

    Args:
        directory: where backups live (created on first save).
        keep: how many of the newest backups to keep.
        model_hash: fingerprint of the architecture; a backup of another model is never restored.
    """

    def __init__(self, directory: str | os.PathLike, keep: int, model_hash: str):
        self.directory, self.keep, self.model_hash = Path(directory), keep, model_hash
        self._refuse_another_models_backups()

    def _refuse_another_models_backups(self) -> None:
        """ValueError if the newest backup is of another model: retention would delete it as this peer trains on."""
        newest = self.latest_epoch()
        if newest is None:
            return
        try:  # mmap: only the small dict is read, not the tensors
            saved_hash = torch.load(self.path(newest), map_location="cpu", weights_only=True, mmap=True)["model_hash"]
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError):
            return  # unreadable: restore() reports it, and the peer takes the swarm's state instead
        if saved_hash != self.model_hash:
            raise ValueError(
                f"--backup_dir {self.directory} holds backups of another model (fingerprint {saved_hash}, this peer's "
                f"is {self.model_hash}); give this run its own --backup_dir, or move those backups away"
            )

    def epochs(self) -> list[int]:
        """Epochs that have a backup, oldest first."""
        if not self.directory.is_dir():
            return []
        matches = (BACKUP_NAME.match(path.name) for path in self.directory.iterdir())
        return sorted(int(match.group(1)) for match in matches if match)

    def path(self, epoch: int) -> Path:
        return self.directory / f"epoch-{epoch:06d}.pt"

    def latest_epoch(self) -> int | None:
        epochs = self.epochs()
        return epochs[-1] if epochs else None

    def save(self, model: torch.nn.Module, training: TrainingMode) -> Path:
        """Write the current state, atomically: a crash mid-write never leaves a truncated backup behind."""
        epoch = training.epoch
        state = {"epoch": epoch, "model_hash": self.model_hash, "model": model.state_dict(), **training.state_dict()}
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.path(epoch)
        with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".partial-", delete=False) as partial:
            torch.save(state, partial)
            partial.flush()
            os.fsync(partial.fileno())
        os.replace(partial.name, target)
        for old_epoch in self.epochs()[: -self.keep]:
            self.path(old_epoch).unlink(missing_ok=True)
        logger.info(f"Backup of epoch {epoch} written to {target}")
        return target

    def restore(self, epoch: int, model: torch.nn.Module, training: TrainingMode) -> bool:
        """Load the backup of ``epoch`` into the model and training mode; False (nothing loaded) if it is unreadable,
        of another model or of another training mode."""
        try:
            state = torch.load(self.path(epoch), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001  (a damaged file must not stop the peer: the swarm has the state)
            logger.error(f"Backup {self.path(epoch)} is unreadable ({error!r}); ignoring it")
            return False
        if state.get("model_hash") != self.model_hash:
            logger.error(f"Backup {self.path(epoch)} belongs to another model or vocabulary; ignoring it")
            return False
        problem = training.backup_problem(state)
        if problem:  # before anything is loaded: the model and the mode keep their state, the swarm's
            logger.error(f"Backup {self.path(epoch)} does not fit this training mode: {problem}; ignoring it")
            return False
        model.load_state_dict(state["model"])
        training.load_state_dict(state)  # after the model: the mode takes up the model's restored parameters
        logger.info(f"Restored the training state of epoch {training.epoch} from {self.path(epoch)}")
        return True
