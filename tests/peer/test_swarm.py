"""Two peers train together through the CLI, agree on parameters, lower the loss; a late peer downloads the state."""

from __future__ import annotations

import pytest
import torch

from tests.harness import wait_until

pytestmark = [pytest.mark.slow]

# Peers average the same gradients each epoch and state averaging re-syncs parameters and LAMB moments every epoch.
# Measured with these flags on loopback (||a - b|| as a fraction of one epoch's update ||a_e - a_(e-1)||): 0 (to 1e-7)
# in most epochs; when two busy processes compete for the 2 cores, a round now and then misses (a peer steps alone)
# and for an epoch or two the peers are 0.1-2 updates apart, then exactly together again. Peers that train apart drift
# further with every epoch. So: under one update, in most of five epochs.
AGREEMENT = 1.0
# a state round every epoch (the default is every 10, see peer/swarm/config.py): these checks look at consecutive epochs
EXACT = ["--grad_compression", "none", "--state_compression", "none", "--average_state_every", "1"]


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = make_swarm()
    swarm.start_peer("a", EXACT)
    swarm.start_peer("b", EXACT)
    swarm.wait_for_epoch(4, peers=2, timeout=180)
    return swarm


def flat(parameters: dict) -> torch.Tensor:
    return torch.cat([tensor.flatten().float() for tensor in parameters.values()])


def first_moments(peer, epoch: int) -> torch.Tensor:
    """LAMB's exp_avg over all parameters, from the peer's backup of ``epoch``."""
    path = peer.backup_dir / f"epoch-{epoch:06d}.pt"
    state = torch.load(path, weights_only=True)["optimizer"]["state"]
    return torch.cat([state[index]["exp_avg"].flatten() for index in sorted(k for k in state if isinstance(k, int))])


def gap_in_updates(peer, other, epoch: int) -> float:
    """||peer - other|| at ``epoch`` as a fraction of ``peer``'s own update over the previous epoch."""
    here = flat(peer.parameters(epoch))
    update = (here - flat(peer.parameters(epoch - 1))).norm()
    return ((here - flat(other.parameters(epoch))).norm() / update).item()


@pytest.mark.timeout(300)
def test_two_peers_advance_the_swarm_epoch_together(swarm):
    epochs = swarm.wait_for_epoch(4, peers=2, timeout=60)
    assert len(epochs) == 2 and min(epochs) >= 4
    # on a loaded machine the first rounds may miss each other (each peer then steps alone): wait for a joint one
    for name in ("a", "b"):
        wait_until(
            lambda: "Averaged gradients with 2 peers" in swarm.peers[name].log_text(),  # noqa: B023 (called at once)
            120,
            f"peer {name} to average gradients with the other",
        )


@pytest.mark.timeout(300)
def test_parameters_agree_after_an_epoch(swarm):
    first, second = swarm.peers["a"], swarm.peers["b"]

    def common_epochs():
        both = set(first.backup_epochs()) & set(second.backup_epochs()) & {e + 1 for e in first.backup_epochs()}
        return sorted(both) if len(both) >= 8 else None

    common = wait_until(common_epochs, 180, "eight epochs backed up by both peers")
    # the last five: peers that started at different moments first re-sync through state averaging
    gaps = {epoch: gap_in_updates(first, second, epoch) for epoch in common[-5:]}
    # most epochs: on this loaded machine a missed round can part the peers for an epoch or two
    assert sum(gap < AGREEMENT for gap in gaps.values()) >= 3, gaps
    # LAMB's moments are averaged as well: equal in an epoch where both rounds went through (they stayed 40-100%
    # apart all run long when a download had unlinked them from the averager, see peer/hivemind_gaps/consistent_state.py)
    moment_gaps = {}
    for epoch in common[-5:]:
        mine = first_moments(first, epoch)
        moment_gaps[epoch] = ((mine - first_moments(second, epoch)).norm() / mine.norm()).item()
    assert min(moment_gaps.values()) < 1e-3, moment_gaps


@pytest.mark.timeout(300)
def test_late_peer_starts_from_the_swarm_state(swarm):
    late = swarm.start_peer("late", EXACT)
    joined = wait_until(lambda: late.backup_epochs(), 120, "the late peer to back up the state it downloaded")
    epoch = joined[0]
    assert epoch >= 4
    assert "Finished downloading state" in late.log_text()
    # the trainers back up the same epochs a moment later than the newcomer: wait for them, do not race them
    trainers = wait_until(
        lambda: [
            peer for peer in (swarm.peers["a"], swarm.peers["b"]) if {epoch - 1, epoch} <= set(peer.backup_epochs())
        ],
        60,
        f"a trainer's backups of epochs {epoch - 1} and {epoch}",
    )
    # the newcomer holds the state of the trainer it downloaded from (the trainers may differ a little, see AGREEMENT)
    assert min(gap_in_updates(trainer, late, epoch) for trainer in trainers) < AGREEMENT
    swarm.wait_for_epoch(epoch + 2, peers=3, timeout=120)


@pytest.mark.timeout(300)
def test_swarm_loss_decreases(swarm):
    swarm.wait_for_epoch(20, peers=2, timeout=240)
    early, late = swarm.early_and_late_loss()
    assert late < early - 0.25, (early, late)
