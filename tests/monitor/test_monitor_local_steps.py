"""The monitor in a local-steps (DiLoCo) run: it counts peers and outer epochs, downloads the outer weights and
momentum from the peers (each donor checked as a joiner checks it), writes checkpoints of the outer weights that load
with stock transformers and say the mode and the outer step, serves the outer state to a joiner once every trainer
has left, and shows the mode in /api/status. In a closed run, the local-steps averager answers run members only.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.harness import run_cli, wait_until
from tests.monitor.conftest import (
    CHROMIUM,
    MonitorProcess,
    PeerProcess,
    Process,
    chromium,
    logits_with_transformers_alone,
    run_key_of,
)

pytestmark = [pytest.mark.slow]
RUN_ID = "monitor-local-steps"
LOCAL_STEPS = ["--local_steps", "2", "--grad_compression", "none"]
# --keep 1000: no checkpoint the test reads is pruned under it
MONITOR_FLAGS = [
    "--checkpoint_every",
    "2",
    "--fetch_state_every",
    "1",
    "--stale_after",
    "12",
    "--keep",
    "1000",
    *LOCAL_STEPS,
]


def flat(tensors) -> torch.Tensor:
    return torch.cat([tensor.detach().flatten().float() for tensor in tensors])


def checkpoints(monitor_dir: Path) -> list[Path]:
    """The monitor's verified checkpoint directories (a manifest is written last), oldest first."""
    return sorted(path.parent for path in (monitor_dir / "checkpoints").glob("epoch-*/manifest.sig"))


def backed_up_outer_states(peers, epoch: int) -> list[dict]:
    """The local-steps states (outer weights, momentum) the trainers backed up at ``epoch``."""
    paths = [peer.backup_dir / f"epoch-{epoch:06d}.pt" for peer in peers]
    return [torch.load(path, weights_only=True)["local_steps"] for path in paths if path.is_file()]


@pytest.mark.timeout(600)
def test_the_monitor_keeps_checkpoints_and_serves_the_outer_state(processes, tmp_path_factory, tmp_path):
    workdir = tmp_path_factory.mktemp("run")
    monitor = MonitorProcess(workdir / "monitor", RUN_ID, MONITOR_FLAGS)
    processes.append(monitor)
    initial_peers = monitor.wait_ready()
    peers = [PeerProcess(workdir, name, RUN_ID, initial_peers, LOCAL_STEPS) for name in ("a", "b")]
    processes.extend(peers)
    wait_until(lambda: (monitor.get("/api/status") or {}).get("alive_peers") == 2, 240, "2 alive peers")
    status = monitor.get("/api/status")
    label = "local steps H=2 (an epoch is one outer step)"
    assert status["training_mode"] == {"name": "local-steps", "local_steps": 2, "label": label}
    if CHROMIUM:  # the dashboard says it too (the page fills it from /api/status)
        assert f"mode {label} · model tiny" in chromium(monitor.url + "/", tmp_path, "--dump-dom")

    # a checkpoint of the outer weights of an epoch both trainers backed up (with --grad_compression none they agree)
    directory = wait_until(
        lambda: next(
            (
                path
                for path in reversed(checkpoints(workdir / "monitor"))
                if backed_up_outer_states(peers, int(path.name[6:]))
            ),
            None,
        ),
        300,
        "a checkpoint of an epoch a trainer backed up",
    )
    epoch = int(directory.name[6:])
    assert epoch >= 2
    manifest = json.loads((directory / "manifest.json").read_text())
    assert (manifest["training_mode"], manifest["local_steps"], manifest["outer_step"]) == ("local-steps", 2, epoch)
    training_state = torch.load(directory / "training_state.pt", weights_only=True)
    assert training_state["mode"] == "local-steps" and training_state["outer_step"] == epoch
    # the monitor holds its donor's state exactly (the two trainers' agree to fp32 rounding of the mean, ~1e-9)
    donors = [
        state
        for state in backed_up_outer_states(peers, epoch)
        if torch.equal(flat(training_state["outer_momentum"]), flat(state["momentum"]))
    ]
    assert donors, "the checkpoint's outer momentum is no trainer's"

    from model import LeanAlbertForMaskedLM

    saved = LeanAlbertForMaskedLM.from_pretrained(directory).eval()
    trainable = [parameter for parameter in saved.parameters() if parameter.requires_grad]
    torch.testing.assert_close(flat(trainable), flat(donors[0]["outer"]), rtol=0, atol=0)
    input_ids = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(input_ids, tmp_path / "input_ids.pt")
    with torch.no_grad():
        expected = saved(input_ids=input_ids).logits
    torch.testing.assert_close(logits_with_transformers_alone(directory, tmp_path), expected, rtol=1e-5, atol=1e-5)

    assert "Traceback" not in monitor.log_text(), monitor.log_text()[-3000:]

    # every trainer leaves (kill -9): a joiner takes the outer state from the monitor
    for peer in peers:
        peer.kill()
    held = wait_until(settled_state_epoch(monitor), 60, "the monitor's held epoch to settle", poll=3)
    joiner = PeerProcess(workdir, "c", RUN_ID, initial_peers, LOCAL_STEPS)
    processes.append(joiner)
    took = wait_until(lambda: TOOK.findall(joiner.log_text()), 240, "the joiner's download")
    assert int(took[0]) == held >= epoch, (took, held)
    assert monitor.process.poll() is None, monitor.log_text()[-3000:]

    # a fresh monitor resumes the run from the checkpoint: outer weights, momentum and outer step
    flags = ["--resume_from", str(directory), *LOCAL_STEPS]
    resumed = MonitorProcess(workdir / "resumed", "resumed-local-steps", flags, name="monitor-resumed")
    processes.append(resumed)
    maddrs = resumed.wait_ready()
    assert resumed.get("/api/status")["state_epoch"] == epoch
    assert f"Resumed the outer state of epoch {epoch} from {directory}" in resumed.log_text()

    # and anyone pulls the outer state straight from the swarm (here its only holder, the resumed monitor)
    pulled = tmp_path / "pulled"
    pull = [sys.executable, "-m", "monitor.checkpoint_cli", "pull", "--initial-peers", *maddrs]
    pull += ["--run-id", "resumed-local-steps", "--run-key", run_key_of(resumed), "--local-steps", "2"]
    result = run_cli([*pull, "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--out", str(pulled)], timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    manifest = json.loads((pulled / "manifest.json").read_text())
    assert (manifest["epoch"], manifest["training_mode"], manifest["outer_step"]) == (epoch, "local-steps", epoch)
    weights, saved = load_file(pulled / "model.safetensors"), load_file(directory / "model.safetensors")
    assert weights.keys() == saved.keys() and all(torch.equal(weights[name], saved[name]) for name in saved)
    momentum = torch.load(pulled / "training_state.pt", weights_only=True)["outer_momentum"]
    torch.testing.assert_close(flat(momentum), flat(training_state["outer_momentum"]), rtol=0, atol=0)


TOOK = re.compile(r"Took the swarm's outer state of epoch (\d+)")


def settled_state_epoch(monitor):
    """A condition: the monitor's held epoch, once two reads 3 s apart agree (a download may be under way)."""
    seen = []

    def settled():
        seen.append(monitor.get("/api/status")["state_epoch"])
        return len(seen) > 1 and seen[-1] == seen[-2] and seen[-1]

    return settled


JOINED = re.compile(r"Joined run '[\w-]+' as (\w+)")


@pytest.mark.timeout(400)
def test_a_closed_local_steps_run_trains_and_its_averager_refuses_an_intruder(processes, tmp_path):
    secret = tmp_path / "run.secret"
    secret.write_text("closed-run-secret-0123456789\n")
    monitor = MonitorProcess(tmp_path / "monitor", "closed-ls", ["--run_secret_file", str(secret), *LOCAL_STEPS])
    processes.append(monitor)
    initial_peers = monitor.wait_ready()
    join = ["--join_url", monitor.url, "--run_secret_file", str(secret), *LOCAL_STEPS]
    peers = [PeerProcess(tmp_path, name, "closed-ls", initial_peers, join) for name in ("a", "b")]
    processes.extend(peers)
    wait_until(
        lambda: all("averaged pseudo-gradients with 2 peers" in peer.log_text() for peer in peers),
        240,
        "both members to average a round with each other",
    )
    members = [JOINED.findall(peer.log_text())[0] for peer in peers]
    command = [sys.executable, "tests/peer/intruder.py", "--run_id", "closed-ls", "--initial_peers", *initial_peers]
    intruder = Process("intruder", [*command, "--targets", *members, "--local_steps"], tmp_path / "intruder.log")
    processes.append(intruder)
    assert intruder.process.wait(timeout=150) == 0, intruder.log_text()[-3000:]
    attack = intruder.log_text()
    assert "ACCEPTED" not in attack, attack
    for member in members:
        for rpc in ("rpc_join_group", "rpc_aggregate_part"):  # the code only the guard answers with
            assert f"REFUSED {rpc} at {member}: code PROTOCOL_VIOLATION" in attack, attack
        assert f"REFUSED rpc_download_state at {member}" in attack, attack
    wait_until(
        lambda: all(
            f"Refused {rpc} (closed-ls_outer)" in peer.log_text() for peer in peers for rpc in ("rpc_join_group",)
        ),
        30,
        "the members' refusal lines",
    )
    averaged_before = [peer.log_text().count("averaged pseudo-gradients with 2 peers") for peer in peers]
    wait_until(
        lambda: all(
            peer.log_text().count("averaged pseudo-gradients with 2 peers") > before
            for peer, before in zip(peers, averaged_before)
        ),
        120,
        "the members to go on averaging with each other",
    )
