"""The training loop driven through its seam, in-process and without hivemind: a fake training mode (a "swarm" that
ends an epoch every ``target_batch_size`` samples with a plain SGD update) stands in for SynchronousSwarm.

Real parts: peer/train.py's loop, the Reporter and its Prometheus metrics, Backups on disk, the StopSignal and a real
SIGTERM, and the test-only FaultyTraining (tests/peer/faulty_peer.py) wrapping the fake as it wraps the real mode.
"""

from __future__ import annotations

import concurrent.futures
import copy
import signal
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import torch

from peer.backup import Backups
from peer.config import PeerConfig
from peer.faults import parameters_finite
from peer.lifecycle import ExitCode, StopSignal
from peer.report import PeerMetrics, Reporter
from peer.runtime import Peer
from peer.train import train
from peer.training_mode import SynchronousSwarm, TrainingMode
from tests.peer.faulty_peer import FaultyTraining

BATCH_SIZE = 8
MODEL_HASH = "fake-model"


class LinearRegression(torch.nn.Module):
    """The smallest model the loop can train: ``model(**batch).loss`` as a Hugging Face model gives it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=torch.nn.functional.mse_loss(self.linear(inputs), targets))


def regression_batches() -> Iterator[dict]:
    generator = torch.Generator().manual_seed(1)
    weights = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    while True:
        inputs = torch.randn(BATCH_SIZE, 4, generator=generator)
        yield {"inputs": inputs, "targets": inputs @ weights}


class FakeSwarm:
    """A TrainingMode without hivemind: samples handed to ``step`` add up to ``target_batch_size``, then one SGD
    update ends the epoch. ``at_epoch[e]`` runs once when epoch ``e`` is reached (how a test scripts the swarm);
    ``peer_state`` is what a peer would serve to ``load_state_from_peers`` (None: no peer can)."""

    def __init__(self, model: torch.nn.Module, target_batch_size: int = 2 * BATCH_SIZE):
        self.model, self.sgd = model, torch.optim.SGD(model.parameters(), lr=0.1)
        self.epoch, self.samples, self.target_batch_size = 0, 0, target_batch_size
        self.num_peers, self.presence_expiration, self.update_guard, self.refused_states = 2, 30.0, None, 0
        self.averaged_bytes = self.state_bytes = self.inner_step_seconds = None
        self.at_epoch: dict[int, Callable[[], None]] = {}
        self.peer_state: dict | None = None
        self.calls: list[tuple[str, int]] = []  # (method, epoch afterwards)
        self.cancelled = self.shut_down = False

    @property
    def is_averaging(self) -> bool:
        return self.samples + BATCH_SIZE >= self.target_batch_size

    def step(self, batch_size: int, scaler=None) -> None:
        self.samples += batch_size
        if self.samples >= self.target_batch_size:
            self.sgd.step()
            self.samples, self.epoch = 0, self.epoch + 1
            self.at_epoch.pop(self.epoch, lambda: None)()
        self.calls.append(("step", self.epoch))

    def zero_grad(self) -> None:
        self.sgd.zero_grad(set_to_none=True)

    def take_round_scores(self) -> list:
        return []  # a mean swarm: nothing reduced robustly

    def state_dict(self) -> dict:
        return {"optimizer": self.sgd.state_dict(), "samples": self.samples}

    def backup_problem(self, state: dict) -> str | None:
        return None if "optimizer" in state else "no optimizer state"

    def load_state_dict(self, state: dict) -> None:
        self.sgd.load_state_dict(state["optimizer"])
        self.epoch, self.samples = state["epoch"], state["samples"]
        self.calls.append(("load_state_dict", self.epoch))

    def load_state_from_peers(self) -> int | None:
        if self.peer_state is None:
            self.calls.append(("load_state_from_peers", -1))
            return None
        self.model.load_state_dict(self.peer_state["model"])
        self.epoch, self.samples = self.peer_state["epoch"], 0
        self.calls.append(("load_state_from_peers", self.epoch))
        return self.epoch

    def cancel(self) -> None:
        self.cancelled = True

    def shutdown(self) -> None:
        self.shut_down = True

    def poison_parameters(self) -> None:
        """What a broken swarm update would leave behind."""
        with torch.no_grad():
            self.model.linear.weight.fill_(float("nan"))

    def serve_state_of_now(self) -> None:
        """From now on, peers serve the current (finite) parameters at the current epoch."""
        self.peer_state = {"model": copy.deepcopy(self.model.state_dict()), "epoch": self.epoch}

    def steps(self) -> int:
        return sum(1 for method, _ in self.calls if method == "step")


class RecordingDHT:
    """Stands in for the DHT the Reporter stores progress records in and the Rejoiner reads initial peers from."""

    def __init__(self):
        self.initial_peers: list[str] = []  # none: the Rejoiner never re-bootstraps
        self.records: list[dict] = []
        self.shut_down = False

    def shutdown(self) -> None:
        self.shut_down = True

    def store(self, key, subkey, value, expiration_time, return_future=False, exclude_self=False):
        self.records.append(value)
        stored = concurrent.futures.Future()
        stored.set_result(True)
        return stored if return_future else True


def make_peer(tmp_path, training_factory=FakeSwarm, **config) -> Peer:
    config = PeerConfig(batch_size=BATCH_SIZE, backup_dir=str(tmp_path / "backups"), **config)
    model, dht = LinearRegression(), RecordingDHT()
    training = training_factory(model)
    reporter = Reporter(dht, "loop-test", training, "cpu", MODEL_HASH, 30.0, PeerMetrics())
    backups = Backups(config.backup_dir, config.keep_backups, MODEL_HASH)
    stop = StopSignal(shutdown_deadline=1e6)  # its watchdog must never end the test process
    cpu = torch.device("cpu")
    peer = Peer(config, dht, model, training, regression_batches(), cpu, torch.float32, backups, reporter, stop)
    for release in (dht.shutdown, training.shutdown, reporter.close):  # as start_peer registers them
        peer.resources.callback(release)
    return peer


def metric(peer: Peer, name: str) -> float:
    return peer.reporter.metrics.registry.get_sample_value(name) or 0.0


def test_both_modes_implement_the_seam(tmp_path):
    members = {name for name in vars(TrainingMode) if not name.startswith("_")}
    assert members <= set(dir(SynchronousSwarm)), members - set(dir(SynchronousSwarm))
    assert isinstance(FakeSwarm(LinearRegression()), TrainingMode)
    assert isinstance(FaultyTraining(FakeSwarm(LinearRegression()), LinearRegression()), TrainingMode)


def test_epochs_advance_with_a_report_each_and_a_backup_every_other(tmp_path):
    peer = make_peer(tmp_path, max_epochs=6, backup_every=2, keep_backups=10)
    assert train(peer) == ExitCode.OK
    records = peer.dht.records
    assert [record["epoch"] for record in records] == [1, 2, 3, 4, 5, 6]
    assert all(record["samples_accumulated"] == 16 and record["mini_steps"] == 2 for record in records)
    first_loss, last_loss = (record["loss_sum"] / record["mini_steps"] for record in (records[0], records[-1]))
    assert last_loss < first_loss, "the fake swarm's updates should fit the regression"
    assert peer.training.steps() == 12
    assert peer.backups.epochs() == [2, 4, 6]
    saved = torch.load(peer.backups.path(6), weights_only=True)
    assert saved["epoch"] == 6 and saved["model_hash"] == MODEL_HASH and saved["samples"] == 0  # the mode's keys
    assert torch.equal(saved["model"]["linear.weight"], peer.model.linear.weight)
    assert metric(peer, "albert_peer_epoch") == 6 and metric(peer, "albert_peer_swarm_peers") == 2


def test_nan_parameters_after_an_update_are_reloaded_from_peers(tmp_path):
    peer = make_peer(tmp_path, max_epochs=6, backup_every=1, keep_backups=10)
    peer.training.at_epoch[2] = peer.training.serve_state_of_now
    peer.training.at_epoch[3] = peer.training.poison_parameters
    assert train(peer) == ExitCode.OK
    assert ("load_state_from_peers", 2) in peer.training.calls
    assert metric(peer, "albert_peer_recoveries_total") == 1
    assert parameters_finite(peer.model)
    assert [record["epoch"] for record in peer.dht.records] == [1, 2, 2, 3, 4, 5, 6]  # epoch 3 again, from 2
    assert all(parameters_finite_in(peer.backups, epoch) for epoch in peer.backups.epochs())


def test_without_peers_the_newest_backup_is_restored(tmp_path):
    peer = make_peer(tmp_path, max_epochs=5, backup_every=2, keep_backups=10)
    peer.training.at_epoch[3] = peer.training.poison_parameters  # and no peer serves a state
    assert train(peer) == ExitCode.OK
    assert ("load_state_from_peers", -1) in peer.training.calls
    assert ("load_state_dict", 2) in peer.training.calls  # the backup of epoch 2
    assert metric(peer, "albert_peer_recoveries_total") == 1
    assert parameters_finite(peer.model) and peer.training.epoch == 5


def test_without_peers_or_backups_the_peer_stops_as_diverged(tmp_path):
    peer = make_peer(tmp_path, max_epochs=5, backup_every=0)
    peer.training.at_epoch[3] = peer.training.poison_parameters
    assert train(peer) == ExitCode.DIVERGED
    assert peer.training.epoch == 3 and peer.backups.epochs() == []


def test_a_stop_signal_during_a_step_ends_the_loop(tmp_path):
    peer = make_peer(tmp_path, backup_every=0)  # no --max-epochs: only the signal ends it
    peer.stop.on_stop(peer.training.cancel)
    peer.training.at_epoch[2] = lambda: signal.raise_signal(signal.SIGTERM)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        peer.stop.install()
        assert train(peer) == 128 + signal.SIGTERM
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert peer.training.epoch == 2 and peer.training.steps() == 3  # the step the signal came in did not finish
    deadline = time.monotonic() + 5
    while not peer.training.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert peer.training.cancelled, "the stop callbacks should cancel the swarm's rounds"
    peer.close()
    assert peer.training.shut_down and peer.backups.epochs() == [2]  # the final backup


def test_faulty_training_poisons_gradients_then_parameters_through_the_seam(tmp_path):
    def faulty(model):
        return FaultyTraining(FakeSwarm(model), model, grads_at_epoch=2, grad_batches=3, params_at_epoch=4)

    peer = make_peer(tmp_path, training_factory=faulty, max_epochs=6, backup_every=1, keep_backups=10)
    peer.training.inner.at_epoch[3] = peer.training.inner.serve_state_of_now
    assert train(peer) == ExitCode.OK
    assert metric(peer, "albert_peer_skipped_batches_total") == 3  # the poisoned batches never reached the swarm
    assert peer.training.inner.steps() == 12 + 2  # 6 epochs, and epoch 4 twice after the recovery from epoch 3
    assert metric(peer, "albert_peer_recoveries_total") == 1
    assert ("load_state_from_peers", 3) in peer.training.inner.calls
    assert parameters_finite(peer.model)


def parameters_finite_in(backups: Backups, epoch: int) -> bool:
    state = torch.load(backups.path(epoch), weights_only=True)
    return all(torch.isfinite(tensor).all() for tensor in state["model"].values())
