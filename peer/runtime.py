"""Assembles a running peer from its configs (device, model, data, DHT, training mode, reporting) and takes it down."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hivemind
import torch
from hivemind.utils import get_dht_time
from torch.utils.data import DataLoader

from data import (
    MLMDataset,
    WholeWordMaskCollator,
    check_tokenizer_matches,
    load_tokenizer,
    model_overrides_from_tokenizer,
)
from data.sources import resolve_corpus
from model import LeanAlbertForMaskedLM, load_config
from peer.backup import Backups
from peer.batch_size import choose_batch
from peer.config import PeerConfig
from peer.contribution import Contribution, contribution_path
from peer.faults import parameters_finite
from peer.hivemind_gaps.averager_guard import MembershipCheck
from peer.hivemind_gaps.bounded_download import bound_state_downloads
from peer.hivemind_gaps.signing_key import signing_key_path, use_signing_key
from peer.lifecycle import StopSignal
from peer.local_steps import build_local_steps
from peer.report import PeerMetrics, Reporter
from peer.swarm.access import RunAccess, admit_peer, leave_when_token_expired
from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.dht import SwarmJoinError, build_dht, visible_maddrs
from peer.swarm.join_client import JoinCredential, JoinRefused, JoinUnavailable
from peer.swarm.optimizer import build_optimizer
from peer.swarm.progress import PROTOCOL_VERSION, ProgressRecord, model_fingerprint, publish_progress, software_version
from peer.swarm.reachability import report_in_background
from peer.swarm.run_record import check_model_matches, run_validators
from peer.training_mode import SynchronousSwarm, TrainingMode

logger = logging.getLogger(__name__)


@dataclass
class Peer:
    """Everything a running peer holds, built whole by ``start_peer``; ``shutdown`` releases it.

    ``resources`` releases, in reverse order of acquisition: the reporter, the training mode, the member-list
    publisher of a closed run, then the DHT and its p2pd. A start that fails half-way releases what it took itself.
    """

    config: PeerConfig
    dht: hivemind.DHT
    model: torch.nn.Module
    training: TrainingMode
    batches: Iterator[dict]
    device: torch.device
    precision: torch.dtype
    backups: Backups
    reporter: Reporter
    stop: StopSignal
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def close(self) -> None:
        """Leave the swarm, first writing a backup of the current state if it is sound."""
        if parameters_finite(self.model):
            try:
                self.backups.save(self.model, self.training)
            except OSError as error:
                logger.error(f"Could not write the final backup: {error!r}")
        self.shutdown()

    def shutdown(self) -> None:
        self.resources.close()
        logger.info("Left the swarm")


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; an explicit device that is absent is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: Apple MPS is not available on this machine")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype: bf16 on CUDA that supports it, else fp16 on CUDA (with a grad scaler); fp32 elsewhere."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    if dtype != torch.float32 and device.type != "cuda":
        raise ValueError(f"--precision {name} is supported on CUDA only (this peer uses {device})")
    return dtype


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def build_model(peer: PeerConfig, device: torch.device):
    """Tokenizer and model; the same seed on every peer gives the same initial weights."""
    tokenizer = load_tokenizer(peer.tokenizer)
    config = load_config(peer.model, **model_overrides_from_tokenizer(tokenizer))
    check_tokenizer_matches(config, tokenizer)
    torch.manual_seed(peer.seed)
    model = LeanAlbertForMaskedLM(config).to(device)
    if peer.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return tokenizer, model


def build_batches(peer: PeerConfig, tokenizer, peer_id: str) -> Iterator[dict]:
    # split="train": the held-out slice stays unseen, so `albert-checkpoint eval` scores text no peer trained on.
    dataset = MLMDataset(
        peer.corpus, tokenizer, max_length=peer.max_length, seed=peer.seed, peer_id=peer_id, split="train"
    )
    return iter(DataLoader(dataset, batch_size=peer.batch_size, collate_fn=WholeWordMaskCollator(tokenizer)))


def start_peer(swarm: SwarmConfig, optim: OptimConfig, config: PeerConfig) -> Peer:
    """Join the swarm, build the model and optimizer, then take the newest state: the swarm's or a newer backup."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    if swarm.identity_path:  # before anything signs: the same key across restarts keeps this peer's records its own
        use_signing_key(signing_key_path(swarm.identity_path))
    contribution = Contribution(contribution_path(swarm.identity_path))
    with contextlib.ExitStack() as resources:  # on any failure below, what was started so far is released
        access = join_closed_run(swarm, config)  # first: a refused peer learns it at once
        tokenizer, model = build_model(config, device)
        config = choose_batch(config, optim, model, device, precision)  # --batch-size auto; else unchanged
        model_hash = model_fingerprint(model.config, tokenizer)
        # Refusals that need no swarm come before the DHT, so that a refused peer never starts a DHT process and p2pd.
        backups = Backups(config.backup_dir, config.keep_backups, model_hash)
        resolve_corpus(config.corpus)

        dht = build_access_dht(swarm, access)
        # else the DHT process and its p2pd outlive a refused peer (__main__ ends with os._exit)
        resources.callback(dht.shutdown)
        logger.info(
            f"Joined run {swarm.run_id!r} as {dht.peer_id}; others can join via: {' '.join(visible_maddrs(dht))}"
        )
        report_in_background(dht, swarm)  # logs whether a swarm peer can dial this one back, and the fix if not
        if access is not None:
            access.publish_membership(dht, on_expired=leave_when_token_expired)
            resources.callback(access.close)
        refuse_if_model_differs(dht, swarm, model_hash, device_name(device))
        batches = build_batches(config, tokenizer, str(dht.peer_id))

        membership = MembershipCheck(dht, swarm.run_id, access.authority_key) if access else None
        training = build_training_mode(dht, model, swarm, optim, config, membership)
        resources.callback(shut_down_quietly, training)
        stop = StopSignal().install()  # after the Optimizer: its averagers set SIGINT to "ignore"
        stop.on_stop(training.cancel)  # a stopped peer waits for no group that may never form
        metrics = PeerMetrics()
        metrics.show_mode(optim)
        if config.metrics_port:
            metrics.serve(config.metrics_port)
        reporter = Reporter(
            dht,
            swarm.run_id,
            training,
            device_name(device),
            model_hash,
            config.record_expiration,
            metrics,
            name=config.name,
            contribution=contribution,
        )
        resources.callback(reporter.close)
        peer = Peer(config, dht, model, training, batches, device, precision, backups, reporter, stop)
        take_newest_state(peer)
        peer.resources = resources.pop_all()
    return peer


def build_training_mode(
    dht: hivemind.DHT,
    model: torch.nn.Module,
    swarm: SwarmConfig,
    optim: OptimConfig,
    config: PeerConfig,
    membership: MembershipCheck | None,
) -> TrainingMode:
    """The run's training mode: local steps (DiLoCo) when --local-steps is above 0, else synchronous."""
    if optim.local_steps:
        logger.info(f"Local-steps mode: an outer step every {optim.local_steps} x {optim.target_batch_size} samples")
        return build_local_steps(dht, model, swarm, optim, membership)
    optimizer = build_optimizer(dht, model, swarm, optim, config.samples_per_step, membership)
    bound_state_downloads(optimizer, config.load_state_attempts)
    return SynchronousSwarm(optimizer)


def shut_down_quietly(training: TrainingMode) -> None:
    """Shut the training mode down on the way out; a failure there must not keep the DHT from being released."""
    try:
        training.shutdown()
    except Exception as error:  # noqa: BLE001 - whatever hivemind raises on shutdown, the DHT must still go
        logger.warning(f"The training mode did not shut down cleanly: {error!r}")


def join_closed_run(swarm: SwarmConfig, config: PeerConfig) -> RunAccess | None:
    """In a closed run, get admitted by the monitor before touching the DHT (None for an open run).

    A refusal is a ValueError (exit code 2), an unreachable monitor a SwarmJoinError (exit code 3).
    """
    if not config.closed_run:
        return None
    identity = swarm.identity_path or str(Path(tempfile.mkdtemp(prefix="albert-peer-")) / "identity.key")
    credential = JoinCredential(config.run_secret_file, config.join_key_file)
    try:
        return admit_peer(swarm.run_id, config.join_url, credential, identity)
    except JoinRefused as error:
        logger.error(f"The monitor refused to admit this peer: {error}")
        raise ValueError(f"the monitor at {config.join_url} refused to admit this peer: {error}") from error
    except JoinUnavailable as error:
        raise SwarmJoinError(f"could not join closed run {swarm.run_id!r}: {error}") from error


def build_access_dht(swarm: SwarmConfig, access: RunAccess | None) -> hivemind.DHT:
    """The peer's DHT; in a closed run with the run's authorizer and the identity its access token names."""
    if access is None:
        return build_dht(swarm, run_validators(swarm.run_id))
    fresh_identity = None if swarm.identity_path else access.identity_path
    try:
        dht = build_dht(swarm, run_validators(swarm.run_id), access.authorizer(), identity_path=fresh_identity)
    finally:
        if fresh_identity is not None:  # p2pd has read it; a fresh peer id per start, as without --identity-path
            shutil.rmtree(Path(fresh_identity).parent, ignore_errors=True)
    try:
        access.check_identity(dht)
    except BaseException:
        dht.shutdown()
        raise
    return dht


def refuse_if_model_differs(dht: hivemind.DHT, swarm: SwarmConfig, model_hash: str, device: str) -> None:
    """ValueError if the run's monitor announces another model or protocol (or, given --run-key, none signs with
    that key); tell the monitor first, so both sides log it.

    The caller shuts the DHT down (start_peer does, for every refusal after the DHT started).
    """
    run_id = swarm.run_id
    refusal = check_model_matches(dht, run_id, model_hash, swarm.run_key)
    if refusal is None:
        return
    announcement = ProgressRecord(
        epoch=0,
        samples_per_second=0.0,
        samples_accumulated=0,
        loss_sum=0.0,
        mini_steps=0,
        device=device,
        version=software_version(),
        time=float(get_dht_time()),
        model_hash=model_hash,
        protocol=PROTOCOL_VERSION,  # so a monitor of another version can say which two versions differ
    )
    publish_progress(dht, run_id, announcement, expiration=60.0)
    raise ValueError(refusal)


def take_newest_state(peer: Peer) -> None:
    """Download the swarm's state before contributing; restore the local backup instead if it is newer."""
    peer.reporter.status("downloading the swarm's state")
    training = peer.training
    with peer.stop.interruptible():
        training.load_state_from_peers()
    backup_epoch = peer.backups.latest_epoch()
    if backup_epoch is not None and backup_epoch > training.epoch:
        logger.info(f"The local backup (epoch {backup_epoch}) is newer than the swarm's (epoch {training.epoch})")
        peer.backups.restore(backup_epoch, peer.model, training)
    elif training.epoch > 0 and backup_epoch != training.epoch:
        peer.backups.save(peer.model, training)  # a local copy of the state this peer starts from
    peer.reporter.epoch_done(training.epoch)
    logger.info(f"Starting at epoch {training.epoch}")
