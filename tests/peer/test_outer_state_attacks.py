"""A joiner of a local-steps run facing donors that serve crafted outer states: an attacker process
(tests/peer/outer_state_attacker.py) offers six at the highest priority (wrong shapes, NaN, huge values, another
format, an absurd epoch, a tensor short) beside one honest donor. The joiner refuses each, naming why, asks the next
donor and takes the honest state; with only the attackers left it keeps its own state and goes on.

The joiner and the honest donor are real local-steps modes (DHTs and averager processes of their own) in this
process's main thread, as hivemind requires; the attacker is a separate process with its own DHT nodes.
"""

from __future__ import annotations

import json
import logging
import re
import sys

import hivemind
import pytest
import torch

from peer.local_steps import build_local_steps
from peer.swarm.config import OptimConfig, SwarmConfig
from tests.harness import GroupProcess, wait_until
from tests.peer.test_local_steps_state import train_until_epoch

pytestmark = [pytest.mark.slow]
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
RUN_ID = "outer-attacks"
OPTIM = OptimConfig(
    local_steps=1, target_batch_size=8, matchmaking_time=1, averaging_timeout=3, learning_rate=0.01, warmup_epochs=2
)
# what each attack is refused for (the epoch bound is the joiner's known swarm epoch + EPOCH_MARGIN)
REFUSALS = {
    "shapes": r"tensor 0 has shape \(6, 5\), expected \(5, 6\)",
    "nan": r"tensor 0 \(shape \(5, 6\)\) holds NaN or infinite values",
    "huge": r"tensor 7 holds a value of magnitude 1e\+30, over 10000",
    "format": r"its format is 'synchronous', not 'local-steps/1'",
    "epoch": r"its epoch 1099511627776 is outside \[0, 100\d\]",
    "count": r"it has 7 tensors, expected 8",
}
SERVING = re.compile(r"serving (\w+) as (\w+)")


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def flat(tensors) -> torch.Tensor:
    return torch.cat([tensor.detach().flatten().float() for tensor in tensors])


def offers(dht: hivemind.DHT) -> int:
    """How many others offer an outer state, as ``dht`` sees it (its own offer, at its epoch's priority, left out)."""
    found = dht.get(f"{RUN_ID}_outer.all_averagers", latest=True)
    entries = found.value if found is not None and isinstance(found.value, dict) else {}
    own = dht.peer_id.to_bytes()
    return sum(entry.value is not None for peer, entry in entries.items() if peer != own)


@pytest.fixture
def refusal_log(tmp_path):
    """state_check's records, from this process and the averager processes forked meanwhile (they refuse there)."""
    handler = logging.FileHandler(tmp_path / "state_check.log")
    logger = logging.getLogger("peer.hivemind_gaps.state_check")
    logger.addHandler(handler)
    yield tmp_path / "state_check.log"
    logger.removeHandler(handler)
    handler.close()


@pytest.fixture
def scene(tmp_path):
    """Started parts, released in reverse order whatever the test did."""
    parts = []
    yield parts
    for part in reversed(parts):
        part()


def start_mode(scene, model: torch.nn.Module, initial_peers=()):
    dht = hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=list(initial_peers))
    scene.append(dht.shutdown)
    mode = build_local_steps(dht, model, SwarmConfig(run_id=RUN_ID, host_maddrs=LOOPBACK), OPTIM)
    scene.append(mode.shutdown)
    return dht, mode


@pytest.mark.timeout(300)
def test_a_joiner_refuses_every_crafted_outer_state_and_takes_the_honest_one(scene, refusal_log, tmp_path):
    donor_model = small_model(0)
    donor_dht, donor = start_mode(scene, donor_model)
    train_until_epoch(donor_model, donor, 2)  # two outer steps alone
    assert donor.epoch == 2
    maddrs = [str(maddr) for maddr in donor_dht.get_visible_maddrs()]
    shapes = [list(tensor.shape) for tensor in (*donor.outer, *donor.momentum)]
    command = [sys.executable, "-m", "tests.peer.outer_state_attacker", "--initial-peers", *maddrs]
    command += ["--run-id", RUN_ID, "--shapes", json.dumps(shapes), "--attacks", ",".join(REFUSALS)]
    attacker = GroupProcess("attacker", command, tmp_path / "attacker.log")
    scene.append(attacker.kill)
    wait_until(lambda: "READY" in attacker.log_text(), 120, "the attacker's offers")
    served = {peer: attack for attack, peer in SERVING.findall(attacker.log_text())}
    assert sorted(served.values()) == sorted(REFUSALS)

    joiner_model = small_model(1)
    joiner_dht, joiner = start_mode(scene, joiner_model, maddrs)
    wait_until(lambda: offers(joiner_dht) == len(REFUSALS) + 1, 60, "every offer in the joiner's view")
    wait_until(lambda: joiner.tracker.global_epoch == 2, 30, "the joiner to see the swarm's epoch")

    assert joiner.load_state_from_peers() == 2
    torch.testing.assert_close(flat(joiner.outer), flat(donor.outer), rtol=0, atol=0)
    torch.testing.assert_close(flat(joiner.momentum), flat(donor.momentum), rtol=0, atol=0)
    torch.testing.assert_close(flat(joiner_model.parameters()), flat(donor.outer), rtol=0, atol=0)
    assert joiner.refused_states == len(REFUSALS)
    refusals = [line for line in refusal_log.read_text().splitlines() if "Refused the training state" in line]
    assert len(refusals) == len(REFUSALS), refusals
    for peer, attack in served.items():
        line = next(line for line in refusals if f"from peer {peer}:" in line)
        assert re.search(REFUSALS[attack], line), (attack, line)

    # the honest donor leaves: only crafted states are offered; the joiner keeps its own and goes on
    donor.shutdown()
    before = flat(joiner.outer).clone()
    assert joiner.load_state_from_peers() is None
    assert torch.equal(flat(joiner.outer), before) and joiner.epoch == 2
    assert joiner.refused_states == 2 * len(REFUSALS)
    joiner_model(torch.randn(4, 6)).pow(2).sum().backward()
    joiner.step(4)  # and trains on
    assert attacker.alive(), attacker.log_text()[-3000:]
