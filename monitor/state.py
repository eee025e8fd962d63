"""The training state the monitor keeps: a hivemind TrainingStateAverager built exactly like a peer's.

It downloads the swarm's averaged state (model, optimizer, scheduler, epoch), shares it with peers that join later
(also when every trainer has left), writes it out as a checkpoint and starts a fresh swarm from one (--resume-from).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import hivemind
import torch
from transformers import PreTrainedTokenizerFast

from data import load_tokenizer, model_overrides_from_tokenizer
from model import LeanAlbertForMaskedLM, load_config
from monitor.checkpoint import MANIFEST, TRAINING_STATE, verify_directory
from peer.hivemind_gaps.averager_guard import MembershipCheck
from peer.hivemind_gaps.averagers import CheckedTrainingStateAverager, GuardedTrainingStateAverager
from peer.hivemind_gaps.state_check import EPOCH_MARGIN, MAX_EPOCH
from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.finite import all_finite
from peer.swarm.optimizer import COMPRESSION_FACTORIES, make_optimizer, make_scheduler, param_groups
from peer.swarm.progress import model_fingerprint

logger = logging.getLogger(__name__)


class ModelMismatch(ValueError):
    """A checkpoint or a swarm state does not fit the run's model."""


class NonFiniteState(ValueError):
    """The held training state has NaN or infinite values: it is neither shared nor checkpointed."""


@dataclass
class RunModel:
    """The run's model and tokenizer as the peers build them, and the fingerprint that identifies them."""

    model: LeanAlbertForMaskedLM
    tokenizer: PreTrainedTokenizerFast
    fingerprint: str
    name: str
    tokenizer_name: str


def build_run_model(model: str, tokenizer: str | None, weights_from: str | None = None) -> RunModel:
    """Build the model as a peer does (preset config, sizes from the tokenizer), or load a checkpoint's weights."""
    loaded_tokenizer = load_tokenizer(tokenizer)
    config = load_config(model, **model_overrides_from_tokenizer(loaded_tokenizer))
    if weights_from is None:
        torch.manual_seed(0)  # the monitor's initial weights are never trained on; seeded for reproducible tests
        network = LeanAlbertForMaskedLM(config)
    else:
        network = load_resume_weights(weights_from)
        if model_fingerprint(network.config, loaded_tokenizer) != model_fingerprint(config, loaded_tokenizer):
            raise ModelMismatch(
                f"checkpoint {weights_from} holds another model than --model {model!r} "
                f"with --tokenizer {tokenizer or 'bundled'}"
            )
    network.eval()
    fingerprint = model_fingerprint(network.config, loaded_tokenizer)  # as a peer computes it, from model.config
    return RunModel(network, loaded_tokenizer, fingerprint, model, tokenizer or "bundled")


def load_resume_weights(directory: str | Path) -> LeanAlbertForMaskedLM:
    """The weights of a --resume_from checkpoint; a ValueError naming the file if it is missing or damaged.

    A monitor checkpoint is checked against its manifest's sha256 sums first: flipped bits in a tensor load silently.
    """
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        problem = verify_directory(directory)
        if problem:
            raise ValueError(f"--resume_from checkpoint {directory} is damaged: {problem}")
    try:
        return LeanAlbertForMaskedLM.from_pretrained(directory)
    except Exception as error:  # transformers and safetensors raise many types for a broken file
        raise ValueError(
            f"cannot load the model weights of --resume_from checkpoint {directory}: {type(error).__name__}: {error}"
        ) from error


def load_training_state(directory: str | Path, required: tuple[str, ...] = ("epoch", "optimizer")) -> dict:
    """The training state of a checkpoint (epoch, optimizer and scheduler; in local-steps mode the outer momentum);
    a ValueError naming the file if it cannot be read or lacks a ``required`` entry."""
    path = Path(directory) / TRAINING_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a truncated or foreign file
        raise ValueError(f"cannot read the training state {path}: {type(error).__name__}: {error}") from error
    if not isinstance(state, dict) or not set(required) <= state.keys():
        mode = f" (written in {state['mode']} mode?)" if isinstance(state, dict) and "mode" in state else ""
        raise ValueError(f"{path} is not a training state of this run's mode: it lacks {' or '.join(required)}{mode}")
    return state


class StateKeeper:
    """Holds the run's training state in a TrainingStateAverager under the peers' own DHT prefix.

    Build it in the main thread (hivemind installs signal handlers). Trainers share their state with priority =
    their epoch; the keeper uses epoch - 0.5, so a newcomer prefers a trainer at the same epoch (whose state is
    fresher within the epoch) and falls back to the keeper when no trainer is left.

    Args:
        dht: the monitor's DHT node (not client mode: others download from it).
        swarm: network settings (run_id gives the prefix).
        optim: the run's optimizer settings (the same factories as the peers', so the state layout matches).
        run_model: the model whose parameters hold the state.
        client_mode: True for a keeper that only downloads (albert-checkpoint pull).
        membership: in a closed run, the check that lets only run members download from or average with the keeper.
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
        self.optim, self.run_model = optim, run_model
        averager_class = CheckedTrainingStateAverager  # a downloaded state is checked before it is applied
        if membership is not None:
            averager_class = partial(GuardedTrainingStateAverager, membership=membership)
        self.averager = averager_class(
            dht=dht,
            prefix=f"{swarm.run_id}_state_averager",
            params=param_groups(run_model.model, optim.weight_decay),
            optimizer=partial(make_optimizer, optim=optim),
            scheduler=partial(make_scheduler, optim=optim),
            offload_optimizer=False,  # the optimizer works on the model's own parameters: save_pretrained saves them
            state_compression=COMPRESSION_FACTORIES[optim.state_compression](),
            client_mode=client_mode,
            allow_state_sharing=False,  # enabled once the keeper holds a real state, never a random initialisation
            start=True,
        )
        self.has_state, self.client_mode = False, client_mode

    @property
    def epoch(self) -> int:
        """Epoch of the state held, or -1 before one was downloaded or resumed."""
        return self.averager.local_epoch if self.has_state else -1

    def fetch(self, timeout: float, swarm_epoch: int | None = None) -> bool:
        """Download the newest state from the swarm; True if the keeper now holds a state at least as new as before.

        ``swarm_epoch`` (the epoch the peers' records report) bounds the epoch a donor may claim; without it only the
        absolute cap of peer/hivemind_gaps/state_check.py applies.
        """
        before = self.epoch
        started = time.monotonic()
        known = max(before, swarm_epoch if swarm_epoch is not None else before)
        self.averager.epoch_limit = None if swarm_epoch is None else (lambda: known + EPOCH_MARGIN)
        try:
            self.averager.load_state_from_peers(timeout=timeout)
        except (TimeoutError, RuntimeError) as error:
            logger.warning(f"Could not download the swarm's state: {error!r}")
            return False
        except Exception as error:
            # a state of another layout is refused (and logged) in the averager's process before it is applied, and
            # the next donor asked (peer/hivemind_gaps/state_layout.py); what fails here is a bug, reported as a
            # mismatch so that the monitor says so and keeps its state
            raise ModelMismatch(f"the swarm's state does not fit the run's model: {error!r}") from error
        if self.averager.local_epoch <= before or (not self.has_state and self.averager.local_epoch == 0):
            return False  # nobody shared a newer state (or only epoch 0, indistinguishable from no download)
        problem = self.state_problem()
        if problem:  # the download check should have refused it: never share or checkpoint it
            self.has_state = False
            self.averager.allow_state_sharing = False
            logger.error(f"The downloaded state of epoch {self.averager.local_epoch} is not kept: {problem}")
            return False
        self._now_holds_state()
        logger.info(f"Downloaded the swarm's state of epoch {self.epoch} in {time.monotonic() - started:.1f} s")
        return True

    def _now_holds_state(self) -> None:
        self.has_state = True
        if not self.client_mode:  # a client cannot accept connections, so it cannot share
            self.averager.allow_state_sharing = True
            self.averager.state_sharing_priority = self.averager.local_epoch - 0.5

    def resume(self, directory: str | Path) -> int:
        """Take model weights, optimizer and scheduler state and the epoch from a checkpoint directory."""
        state = load_training_state(directory)
        # hivemind ran one zero-gradient optimizer step to initialise the optimizer, and LAMB's weight decay moved
        # the weights: load them again
        saved = load_resume_weights(directory)
        self.run_model.model.load_state_dict(saved.state_dict())
        with torch.no_grad():
            self.averager.optimizer.load_state_dict(state["optimizer"])
            if self.averager.scheduler is not None and state.get("scheduler") is not None:
                self.averager.scheduler.load_state_dict(state["scheduler"])
        epoch = state["epoch"]
        if type(epoch) is not int or not 0 <= epoch <= MAX_EPOCH:
            raise ValueError(f"--resume_from checkpoint {directory}: its epoch {epoch!r} is not in [0, {MAX_EPOCH}]")
        problem = self.state_problem()
        if problem:
            raise NonFiniteState(f"--resume_from checkpoint {directory} cannot be resumed: {problem}")
        self.averager.local_epoch = epoch
        self._now_holds_state()
        logger.info(f"Resumed the training state of epoch {self.epoch} from {directory}")
        return self.epoch

    def state_problem(self) -> str | None:
        """None if every parameter and optimizer statistic held is finite, else what is not."""
        if not all_finite(self.run_model.model.parameters()):
            return "the model parameters hold NaN or infinite values"
        statistics = [
            value
            for state in self.averager.optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor) and value.is_floating_point()
        ]
        if not all_finite(statistics):
            return "the optimizer statistics hold NaN or infinite values"
        return None

    def write(self, directory: Path) -> None:
        """Fill a checkpoint directory: save_pretrained model (code + auto_map), tokenizer, training_state.pt.

        Raises NonFiniteState (and writes nothing) if the state is not finite: such a checkpoint would count against
        retention and could push the good ones out.
        """
        problem = self.state_problem()
        if problem:
            raise NonFiniteState(f"not writing a checkpoint of epoch {self.averager.local_epoch}: {problem}")
        self.run_model.model.save_pretrained(directory)
        self.run_model.tokenizer.save_pretrained(directory)
        scheduler = self.averager.scheduler
        training_state = {
            "epoch": self.averager.local_epoch,
            "optimizer": self.averager.optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "optim_config": asdict(self.optim),
            "model_fingerprint": self.run_model.fingerprint,
        }
        torch.save(training_state, directory / TRAINING_STATE)

    def shutdown(self) -> None:
        self.averager.shutdown()
