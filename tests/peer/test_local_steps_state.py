"""A local-steps peer's backup holds everything to resume its trajectory: outer weights and momentum, the inner
optimizer and its schedule, the epoch; a backup of the synchronous mode is refused by name. Real DHTs and averagers
on 127.0.0.1 in this process (its main thread), one peer each: its rounds find no partner and it steps alone."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import types

import hivemind
import pytest
import torch

from peer.backup import Backups
from peer.local_steps import MAX_RESYNC_CHANGE, LocalStepsSwarm, PendingRound, build_local_steps
from peer.state_fingerprint import fingerprint
from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.outer_state import copy_into
from tests.harness import wait_until

pytestmark = [pytest.mark.slow]
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
# one outer step per 8 samples; a lone peer's round gives up after the averaging timeout and steps alone
OPTIM = OptimConfig(
    local_steps=1, target_batch_size=8, matchmaking_time=1, averaging_timeout=3, learning_rate=0.01, warmup_epochs=2
)

# the outer all-reduce runs while the next inner steps go on
# (no warm-up: inner steps move at epoch 0)
OVERLAPPED = dataclasses.replace(OPTIM, delay_optimizer_step=True, warmup_epochs=0, matchmaking_time=2)


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def train_steps(model: torch.nn.Module, mode, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(4, 6)).pow(2).sum().backward()
        mode.step(4)
        mode.zero_grad()


def train_until_epoch(model: torch.nn.Module, mode, epoch: int, max_steps: int = 40) -> None:
    """Step alone until ``mode`` reaches ``epoch``: two steps of 4 samples fill a round, unless the tracker's fetch
    of the DHT's (older) view of this peer's samples lands between them (seen on a loaded machine); then a third."""
    for _ in range(max_steps):
        if mode.epoch >= epoch:
            return
        train_steps(model, mode, 1)
    raise AssertionError(f"epoch {mode.epoch} after {max_steps} steps, not {epoch}")


@pytest.fixture
def started():
    dhts, modes = [], []

    def start(run_id: str, model: torch.nn.Module, join_first: bool = False, optim: OptimConfig = OPTIM):
        initial_peers = dhts[0].get_visible_maddrs() if join_first else []
        dhts.append(hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=initial_peers))
        modes.append(build_local_steps(dhts[-1], model, SwarmConfig(run_id=run_id, host_maddrs=LOOPBACK), optim))
        return modes[-1]

    yield start
    for mode in modes:
        mode.shutdown()
    for dht in dhts:
        dht.shutdown()


def flat(tensors) -> torch.Tensor:
    return torch.cat([tensor.detach().flatten().float() for tensor in tensors])


@pytest.mark.timeout(120)
def test_a_backup_restores_outer_state_inner_optimizer_and_epoch(started, tmp_path):
    model = small_model(0)
    mode = started("ls-state-a", model)
    train_until_epoch(model, mode, 2)  # two outer steps alone
    train_steps(model, mode, 1)  # then one inner step into the third round
    assert mode.epoch == 2 and flat(mode.momentum).norm() > 0
    assert not torch.equal(flat(model.parameters()), flat(mode.outer))  # mid-round: local weights moved on
    backups = Backups(tmp_path, keep=3, model_hash="test")
    backups.save(model, mode)

    restored_model = small_model(1)
    restored = started("ls-state-b", restored_model)
    assert backups.restore(2, restored_model, restored)
    assert restored.epoch == 2
    torch.testing.assert_close(flat(restored.outer), flat(mode.outer), rtol=0, atol=0)
    torch.testing.assert_close(flat(restored.momentum), flat(mode.momentum), rtol=0, atol=0)
    torch.testing.assert_close(flat(restored_model.parameters()), flat(model.parameters()), rtol=0, atol=0)
    assert restored.inner.param_groups[0]["lr"] == mode.inner.param_groups[0]["lr"]
    mine, theirs = mode.inner.state_dict()["state"], restored.inner.state_dict()["state"]
    assert mine.keys() == theirs.keys() and mine
    for index in mine:
        torch.testing.assert_close(theirs[index]["exp_avg"], mine[index]["exp_avg"], rtol=0, atol=0)
    # and both go on identically from there: the same batch gives the same inner step
    batch = torch.randn(4, 6)
    for each_model, each_mode in ((model, mode), (restored_model, restored)):
        each_model(batch).pow(2).sum().backward()
        each_mode.inner.step()
    torch.testing.assert_close(flat(restored_model.parameters()), flat(model.parameters()), rtol=0, atol=0)


@pytest.mark.timeout(60)
def test_a_synchronous_backup_is_refused_by_name(started):
    model = small_model(0)
    mode = started("ls-state-c", model)
    before = flat(mode.outer).clone()
    with pytest.raises(ValueError, match=r"no local-steps state \(written in synchronous mode\?\)"):
        mode.load_state_dict({"epoch": 7, "optimizer": {}, "scheduler": {}})
    assert mode.epoch == 0 and torch.equal(flat(mode.outer), before)


@pytest.mark.timeout(60)
def test_a_synchronous_backup_is_refused_before_anything_is_loaded(started, tmp_path, caplog):
    """A backup of the other mode must not stop the peer at start: refused whole, the peer goes on from the swarm."""
    model = small_model(0)
    mode = started("ls-state-d", model)
    before = flat(model.parameters()).clone()
    backups = Backups(tmp_path, keep=3, model_hash="test")
    synchronous = {"epoch": 7, "model_hash": "test", "model": small_model(1).state_dict(), "optimizer": {}}
    torch.save({**synchronous, "scheduler": {}}, backups.path(7))
    with caplog.at_level("ERROR", logger="peer.backup"):
        assert not backups.restore(7, model, mode)
    assert "does not fit this training mode: it holds no local-steps state (written in synchronous mode?)" in (
        caplog.text
    )
    assert torch.equal(flat(model.parameters()), before) and mode.epoch == 0


def offered_priorities(dht: hivemind.DHT, run_id: str) -> list[float]:
    """The priorities at which the run's local-steps averagers offer their outer state (hivemind's declarations)."""
    found = dht.get(f"{run_id}_outer.all_averagers", latest=True)
    entries = found.value if found is not None and isinstance(found.value, dict) else {}
    return [entry.value for entry in entries.values()]


@pytest.mark.timeout(120)
def test_the_outer_state_is_offered_at_its_epoch(started):
    """hivemind's donors are asked by priority: the epoch, so that a joiner takes the newest outer state first."""
    model = small_model(0)
    mode = started("ls-state-e", model)
    train_until_epoch(model, mode, 2)  # two outer steps alone
    assert mode.epoch == 2
    dht = mode.averager.dht
    wait_until(lambda: offered_priorities(dht, "ls-state-e") == [2.0], 30, "the outer state offered at priority 2")


def resync_both(first, second, states, epochs=(2, 2)):
    """Run the outer-state re-sync of two peers at once (one round between them, at their ``epochs``); each's result."""
    results = [None, None]

    def resync(index, mode):
        results[index] = mode._resynced(*states[index], epochs[index])

    threads = [threading.Thread(target=resync, args=(index, mode)) for index, mode in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


@pytest.mark.timeout(120)
def test_a_resync_moves_the_outer_state_at_most_the_bound_toward_the_mean(started, caplog):
    """The re-sync takes the swarm's mean of the outer state within MAX_RESYNC_CHANGE of this peer's own, and moves at
    most that far toward a mean farther away: a member sending 3x the weights (the mean is 100% away) moves them 5%;
    a member's NaN state is left out of the round."""
    first, second = started("ls-state-f", small_model(0)), started("ls-state-f", small_model(0), join_first=True)
    own = ([t.clone() for t in first.outer], [torch.full_like(t, 0.1) for t in first.momentum])
    near = ([t * 1.001 for t in own[0]], [t * 1.001 for t in own[1]])
    outer, momentum = resync_both(first, second, [own, near])[0]
    torch.testing.assert_close(flat(outer), flat(own[0]) * 1.0005)  # the mean of the two, taken
    assert first.refused_resyncs == first.bounded_resyncs == 0

    crafted = ([t * 3 for t in own[0]], [t.clone() for t in own[1]])
    with caplog.at_level("WARNING", logger="peer.local_steps"):
        outer, momentum = resync_both(first, second, [own, crafted], epochs=(4, 4))[0]
    torch.testing.assert_close(flat(outer), flat(own[0]) * (1 + MAX_RESYNC_CHANGE))  # 5% of the way to 2x
    torch.testing.assert_close(flat(momentum), flat(own[1]))  # the momenta agreed: the mean's, unchanged
    assert first.bounded_resyncs == 1 and first.refused_resyncs == 0
    assert re.search(
        r"mean outer state at epoch 4 is far from this peer's \(relative change: weights 1\.00e\+00", caplog.text
    )

    # NaN parts are refused by every reducer (checked_parts.py), the sender's own reducer included: the round
    # averages without them, and this peer keeps its own state, with no non-finite mean to refuse
    poisoned = ([t * float("nan") for t in own[0]], [t.clone() for t in own[1]])
    outer, momentum = resync_both(first, second, [own, poisoned], epochs=(6, 6))[0]
    assert torch.equal(flat(outer), flat(own[0])) and torch.equal(flat(momentum), flat(own[1]))
    assert first.refused_resyncs == 0 and first.bounded_resyncs == 1

    # a peer a round behind lands in the group (hivemind groups by prefix only): the mean of two epochs is refused
    with caplog.at_level("WARNING", logger="peer.local_steps"):
        results = resync_both(first, second, [own, near], epochs=(8, 7))
    assert results[0][0] is own[0] and results[1][0] is near[0]
    assert "Outer state not re-synced at epoch 8: the group held epochs ['7']" in caplog.text


@pytest.mark.timeout(120)
def test_two_peers_whose_outer_states_came_apart_converge_by_resyncs(started, caplog):
    """Two honest peers 26% apart (as two that each stepped alone on a failed round were in CI) meet in 3 re-syncs:
    each moves MAX_RESYNC_CHANGE toward the mean until the mean is within it, then takes the mean."""
    first, second = started("ls-state-h", small_model(0)), started("ls-state-h", small_model(0), join_first=True)
    own = ([t.clone() for t in first.outer], [torch.full_like(t, 0.1) for t in first.momentum])
    torch.manual_seed(5)
    direction = [torch.randn_like(t) for t in own[0]]
    scale = 0.26 * flat(own[0]).norm() / flat(direction).norm()
    apart = ([t + scale * d for t, d in zip(own[0], direction)], [t * 1.26 for t in own[1]])
    states, gaps = [own, apart], []
    with caplog.at_level("INFO", logger="peer.local_steps"):
        for epoch in (2, 4, 6, 8):
            states = resync_both(first, second, states, epochs=(epoch, epoch))
            gaps.append(float((flat(states[0][0]) - flat(states[1][0])).norm() / flat(states[0][0]).norm()))
    print(f"outer weights apart after each re-sync: {gaps}")
    assert gaps[0] < 0.26 - 0.09 and gaps[1] < gaps[0] - 0.09, gaps  # each moved 5% of its norm toward the other
    assert gaps[-1] < 1e-6, gaps
    torch.testing.assert_close(flat(states[0][1]), flat(states[1][1]))
    assert first.bounded_resyncs >= 2 and first.refused_resyncs == 0
    assert "Re-synced the outer state with 2 peers at epoch 8" in caplog.text


@pytest.mark.timeout(120)
def test_an_overlapped_round_carries_the_inner_steps_taken_meanwhile_onto_the_new_outer_weights(started):
    """--delay-optimizer-step: the peer steps on while its round is under way; when it lands, local weights = the new
    outer weights + what those inner steps changed (a lone peer: its round finds no partner and steps alone)."""
    model = small_model(0)
    mode = started("ls-state-i", model, optim=OVERLAPPED)
    for _ in range(10):  # 8 samples start the round (a third step if the tracker's fetch lands between two)
        train_steps(model, mode, 1)
        if mode._pending is not None:
            break
    assert mode._pending is not None and mode.epoch == 0  # started, and the peer did not wait for it
    anchor = [tensor.clone() for tensor in mode._pending.anchor]
    torch.testing.assert_close(flat(anchor), flat(model.parameters()), rtol=0, atol=0)
    train_steps(model, mode, 2)  # inner steps overlapping the round (it cannot end before its 2 s matchmaking)
    assert mode._pending is not None and mode._samples == 8
    moved = [parameter.detach().clone() - start for parameter, start in zip(model.parameters(), anchor)]
    assert flat(moved).norm() > 0
    wait_until(mode._pending.done, 30, "the lone round to end")
    mode._finish_round()
    assert mode.epoch == 1 and not torch.equal(flat(mode.outer), flat(anchor))
    expected = [outer + change for outer, change in zip(mode.outer, moved)]
    torch.testing.assert_close(flat(model.parameters()), flat(expected))
    # the samples trained meanwhile count toward the next round
    assert mode.tracker.local_progress.epoch == 1 and mode.tracker.local_progress.samples_accumulated == 8


@pytest.mark.timeout(180)
def test_two_overlapping_peers_average_in_the_background_and_their_outer_weights_agree(started, caplog):
    """Two peers in one thread, stepping in turn: each round runs in the averagers' processes while both step on;
    the rounds of two land with the same mean, so the outer weights agree at every epoch both reach that way."""
    optim = dataclasses.replace(OVERLAPPED, grad_compression="none", matchmaking_time=2, averaging_timeout=10)
    models = [small_model(0), small_model(0)]
    modes = [started("ls-state-j", models[0], optim=optim)]
    modes.append(started("ls-state-j", models[1], join_first=True, optim=optim))
    outers, overlapped_steps = [{}, {}], 0
    with caplog.at_level("INFO", logger="peer.local_steps"):
        deadline = time.monotonic() + 120
        while min(mode.epoch for mode in modes) < 4 and time.monotonic() < deadline:
            for index, (model, mode) in enumerate(zip(models, modes)):
                overlapped_steps += mode._pending is not None
                train_steps(model, mode, 1)
                outers[index].setdefault(mode.epoch, flat(mode.outer).clone())
            time.sleep(0.05)
    together = caplog.text.count("averaged pseudo-gradients with 2 peers in ")
    print(f"epochs {[mode.epoch for mode in modes]}, rounds of two {together}, overlapped steps {overlapped_steps}")
    assert min(mode.epoch for mode in modes) >= 4 and together >= 4 and overlapped_steps >= 8
    common = sorted(set(outers[0]) & set(outers[1]) - {0})
    # each peer holds its own + (mean - own): equal up to fp32 rounding
    agreeing = [epoch for epoch in common if torch.allclose(outers[0][epoch], outers[1][epoch], rtol=1e-6, atol=1e-7)]
    assert len(agreeing) >= 2, common


@pytest.mark.timeout(120)
def test_a_peer_in_a_round_of_a_newer_epoch_drops_it_and_the_other_applies_it(started, caplog):
    """hivemind groups by prefix only: a peer at epoch 2 whose tracker had not yet seen the swarm's step to 3 averages
    in epoch 3's round (a real round between the two). Once its tracker shows epoch 3 it drops the round's work (its
    outer weights stay epoch 2's: it downloads the swarm's state next); the peer at epoch 3 takes the mean."""
    optim = dataclasses.replace(OPTIM, matchmaking_time=2, averaging_timeout=10)
    first = started("ls-state-k", small_model(0), optim=optim)
    second = started("ls-state-k", small_model(0), join_first=True, optim=optim)
    for mode, epoch in ((first, 3), (second, 2)):
        with mode._state_lock:
            mode._epoch = epoch
        with mode.tracker.pause_updates():
            mode.tracker.update_epoch(epoch)
    first.tracker.report_local_progress(3, 4)  # hivemind publishes a peer's entry once it reports samples
    before = flat(second.outer).clone()

    def start_round(mode, epoch):
        pseudo = [torch.full_like(weight, 0.01) for weight in mode.outer]
        with mode.averager.get_tensors() as buffers:
            copy_into(buffers, pseudo)
        control = mode.averager.step(gather=epoch, weight=4.0, timeout=10, wait=False)
        anchor = [parameter.detach().float().clone() for parameter in mode.parameters]
        mode._pending = PendingRound(control, pseudo, anchor, mode.averaged_bytes, 4, time.perf_counter())

    start_round(first, 3)
    start_round(second, 2)
    wait_until(lambda: first._pending.done() and second._pending.done(), 60, "the round of the two")
    assert first._pending.control.result() and len(second._pending.control.result()) == 2
    wait_until(lambda: second.tracker.global_epoch == 3, 30, "peer 2's tracker to see epoch 3")
    with caplog.at_level("WARNING", logger="peer.local_steps"):
        second._finish_round()
        first._finish_round()
    assert "Outer round of epoch 2 grouped with peers at epochs [3]: this peer is behind" in caplog.text
    assert second.epoch == 2 and torch.equal(flat(second.outer), before) and second.dropped_samples == 4
    assert first.epoch == 4 and not torch.equal(flat(first.outer), before)  # it stepped with the mean


@pytest.mark.timeout(180)
def test_peers_apart_re_sync_after_their_round_and_peers_alike_do_not(started, caplog):
    """Every epoch may re-sync here (--average-state-every 1). Two peers whose outer weights differ (one nudged, as
    a round received in part leaves a peer) average a round: the fingerprints they gathered differ, so both re-sync
    right after it and end the same to the bit (each member takes the same mean: mean_replies.py). Their next round
    finds them alike and sends no state round; its int4 mean leaves them the same to the bit again."""
    optim = dataclasses.replace(
        OPTIM, matchmaking_time=2, averaging_timeout=10, average_state_every=1, grad_compression="int4-block"
    )
    models = [small_model(0), small_model(0)]
    modes = [started("ls-state-m", models[0], optim=optim)]
    modes.append(started("ls-state-m", models[1], join_first=True, optim=optim))
    with torch.no_grad():
        modes[1].outer[0].add_(torch.randn_like(modes[1].outer[0]) * 1e-3)

    def round_of_two(seed: int) -> None:
        for index, (model, mode) in enumerate(zip(models, modes)):
            generator = torch.Generator().manual_seed(seed + index)
            with torch.no_grad():  # inner steps of its own: the pseudo-gradient is outer - local
                for parameter in model.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-2)
            mode._samples = 4
            mode._start_round()
        errors = []

        def finish(mode) -> None:
            try:
                mode._finish_round()
            except BaseException as error:  # noqa: BLE001 - raised in the test's thread below
                errors.append(error)

        threads = [threading.Thread(target=finish, args=(mode,)) for mode in modes]  # each waits for the other
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors and not any(thread.is_alive() for thread in threads), errors

    with caplog.at_level("INFO", logger="peer.local_steps"):
        round_of_two(seed=1)
        assert [mode.epoch for mode in modes] == [1, 1]
        assert caplog.text.count("averaged pseudo-gradients with 2 peers") == 2
        assert caplog.text.count("Re-synced the outer state with 2 peers at epoch 1") == 2
        assert torch.equal(flat(modes[0].outer), flat(modes[1].outer))
        assert torch.equal(flat(modes[0].momentum), flat(modes[1].momentum))
        state_bytes = [mode.state_bytes for mode in modes]
        assert all(sent > 0 and received > 0 for sent, received in state_bytes)

        round_of_two(seed=3)
        assert [mode.epoch for mode in modes] == [2, 2]
        assert caplog.text.count("No re-sync at epoch 2: the outer states of the round's 2 peers agreed") == 2
        assert "Re-synced the outer state with 2 peers at epoch 2" not in caplog.text
        assert [mode.skipped_resyncs for mode in modes] == [1, 1]
        assert [mode.state_bytes for mode in modes] == state_bytes  # no state round
        assert torch.equal(flat(modes[0].outer), flat(modes[1].outer))
        assert torch.equal(flat(modes[0].momentum), flat(modes[1].momentum))


@pytest.mark.timeout(60)
def test_a_download_reads_the_outer_layout_without_copying_the_outer_state(started):
    """The layout a donor's state must fit is fixed at the start: a download no longer clones the whole outer state
    (this peer's served state) only to read its shapes."""
    mode = started("ls-state-g", small_model(0))
    copies, serve = [], mode.averager._state_provider
    mode.averager._state_provider = lambda: copies.append(1) or serve()
    assert mode.load_state_from_peers() is None  # nobody shares a state
    assert copies == []


@pytest.mark.timeout(120)
def test_an_overlapped_resync_shifts_the_outer_state_and_the_local_weights_alike(started):
    """--delay-optimizer-step: the re-sync runs while the peer trains on; when it lands, its change to the outer
    weights is added to them, to the local weights (keeping the inner steps taken meanwhile) and to the anchor of a
    round under way (so that round does not count it twice); the momentum takes its change too."""
    optim = dataclasses.replace(OVERLAPPED, matchmaking_time=2, averaging_timeout=10)
    models = [small_model(0), small_model(0)]
    first = started("ls-state-l", models[0], optim=optim)
    second = started("ls-state-l", models[1], join_first=True, optim=optim)
    sent = []
    for mode, scale in ((first, 1.0), (second, 1.002)):
        outer = [tensor * scale for tensor in mode.outer]
        momentum = [torch.full_like(tensor, 0.1 * scale) for tensor in mode.momentum]
        with mode._state_lock:
            copy_into([*mode.outer, *mode.momentum], [*outer, *momentum])
        sent.append((outer, momentum))
    with torch.no_grad():  # inner steps since the round began, and a round under way from there
        for parameter in models[0].parameters():
            parameter.add_(0.01)
    local = flat(models[0].parameters()).clone()
    anchor = [parameter.detach().float().clone() for parameter in models[0].parameters()]
    first._pending = PendingRound(None, [], [tensor.clone() for tensor in anchor], (0, 0), 0, time.perf_counter())
    for mode, (outer, momentum) in zip((first, second), sent):
        mode._start_overlapped_resync([t.clone() for t in outer], [t.clone() for t in momentum], 2)
    wait_until(lambda: first._pending_resync.control.done() and second._pending_resync.control.done(), 60, "re-sync")
    first._apply_landed_resync()
    second._apply_landed_resync()
    assert first._pending_resync is None and second._pending_resync is None
    mean = (flat(sent[0][0]) + flat(sent[1][0])) / 2
    change = mean - flat(sent[0][0])
    assert change.norm() > 0
    torch.testing.assert_close(flat(first.outer), mean)
    torch.testing.assert_close(flat(second.outer), mean)
    torch.testing.assert_close(flat(first.momentum), torch.full_like(flat(first.momentum), 0.1 * 1.001))
    torch.testing.assert_close(flat(models[0].parameters()), local + change)
    torch.testing.assert_close(flat(first._pending.anchor), flat(anchor) + change)


@pytest.mark.timeout(60)
def test_the_averagers_wait_the_next_chunk_timeout_for_a_members_part(started):
    mode = started("ls-state-m", small_model(0), optim=dataclasses.replace(OPTIM, next_chunk_timeout=7.0))
    assert mode.averager.next_chunk_timeout == mode.resync.next_chunk_timeout == 7.0


def test_the_fingerprint_is_gathered_only_in_the_round_before_a_check():
    """A peer sends its outer state's fingerprint only in the round that ends at a re-sync check (every
    --average-state-every epochs: the only fingerprints read), and none while a re-sync is under way (its state is
    about to change, and would read as drift): computing it every round cost a pass over the outer state each time."""
    outer, momentum = [torch.ones(4), torch.full((3,), 2.0)], [torch.zeros(4), torch.zeros(3)]
    peer = types.SimpleNamespace(
        optim=OptimConfig(average_state_every=4), outer=outer, momentum=momentum,
        _pending_resync=None, _state_lock=threading.Lock(),
    )  # fmt: skip
    sent = {}
    for epoch in range(9):
        peer._epoch = epoch
        sent[epoch] = LocalStepsSwarm._round_metadata(peer)
    assert all(metadata["epoch"] == epoch for epoch, metadata in sent.items())
    assert [epoch for epoch, metadata in sent.items() if metadata["fingerprint"] is not None] == [3, 7]
    assert sent[3]["fingerprint"] == fingerprint(outer, momentum)
    peer._epoch, peer._pending_resync = 7, object()
    assert LocalStepsSwarm._round_metadata(peer)["fingerprint"] is None
