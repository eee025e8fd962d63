"""The monitor with a real two-peer tiny swarm (all processes through their CLIs, on 127.0.0.1).

One module-scoped run serves every test, in file order: status and metrics while training, refusal of a foreign
model, checkpoints (download, damage), a monitor restart, then every trainer killed and a newcomer resuming from the
monitor's state, which must equal the checkpoint loaded with transformers alone; finally --resume-from and `pull`.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import hivemind
import pytest
import torch
from hivemind.utils import get_dht_time
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

from monitor.records import monitor_validators
from peer.hivemind_gaps.state_check import EPOCH_MARGIN
from peer.swarm.progress import PROTOCOL_VERSION, ProgressRecord, publish_progress
from peer.swarm.run_record import check_model_matches
from tests.harness import run_cli, wait_until
from tests.monitor.conftest import (
    CHROMIUM,
    PEER_FLAGS,
    MonitorProcess,
    PeerProcess,
    Process,
    chromium,
    logits_with_transformers_alone,
    run_key_of,
)
from tests.peer.poisoner import AHEAD
from tests.peer.poisoner import poisoner_announced as announced_on

pytestmark = [pytest.mark.slow]
RUN_ID = "monitor-test"
TOKEN = "test-admin-token-0123456789"
MONITOR_FLAGS = [
    "--checkpoint_every",
    "2",
    "--fetch_state_every",
    "1",
    "--keep",
    "3",
    "--stale_after",
    "12",
    "--admin_token",
    TOKEN,
]


def download_with_cli(monitor: MonitorProcess, epoch: int, out: Path) -> subprocess.CompletedProcess:
    """`albert-checkpoint download` of one epoch from the run's monitor, verified against its run key."""
    command = [sys.executable, "-m", "monitor.checkpoint_cli", "download", "--from", monitor.url]
    command += ["--run-key", run_key_of(monitor), "--epoch", str(epoch), "--out", str(out)]
    return run_cli(command, timeout=120)


@pytest.fixture(scope="module")
def run(processes, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    monitor = MonitorProcess(workdir / "monitor", RUN_ID, MONITOR_FLAGS)
    processes.append(monitor)
    initial_peers = monitor.wait_ready()
    peers = {name: PeerProcess(workdir, name, RUN_ID, initial_peers) for name in ("a", "b")}
    processes.extend(peers.values())
    wait_until(lambda: (monitor.get("/api/status") or {}).get("alive_peers") == 2, 240, "2 alive peers")

    class Run:
        pass

    state = Run()
    state.workdir, state.monitor, state.peers, state.processes = workdir, monitor, peers, processes
    return state


@pytest.mark.timeout(400)
def test_status_shows_two_alive_peers_and_the_epoch_advancing(run):
    first = run.monitor.get("/api/status")
    assert first["run_id"] == RUN_ID and first["alive_peers"] == 2
    assert first["initial_peers"] == run.monitor.initial_peers()

    def advanced_by_two():
        status = run.monitor.get("/api/status")
        return status["epoch"] >= first["epoch"] + 2 and status

    advanced = wait_until(advanced_by_two, 180, "the global epoch to advance by 2")
    assert advanced["alive_peers"] == 2 and advanced["samples_total"] > first["samples_total"] >= 0
    assert advanced["loss"] is not None and advanced["loss"] > 0 and advanced["samples_per_second"] > 0
    rows = run.monitor.get("/api/peers")
    assert sum(row["alive"] for row in rows) == 2 and all(row["device"] for row in rows if row["alive"])


@pytest.mark.timeout(120)
def test_metrics_parse_and_agree_with_the_status(run):
    body = run.monitor.get("/metrics").decode()
    samples = {
        s.name: s.value for family in text_string_to_metric_families(body) for s in family.samples if not s.labels
    }
    status = run.monitor.get("/api/status")
    assert samples["albert_swarm_alive_peers"] == 2
    assert samples["albert_monitor_invalid_records_total"] == 0  # honest peers' records are never refused
    assert abs(samples["albert_swarm_epoch"] - status["epoch"]) <= 1
    assert samples["albert_swarm_samples_total"] > 0 and samples["albert_swarm_samples_per_second"] > 0
    labelled = [
        s
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name == "albert_swarm_peer_samples_per_second"
    ]
    assert len(labelled) == 2


CHARTED = ("loss", "samples_per_second", "alive_peers")  # the fields the dashboard's charts over time draw


def charted_points(monitor: MonitorProcess, key: str) -> int:
    """How many points of the monitor's history the dashboard would chart for `key` (numbers only, as it does)."""
    series = (monitor.get("/api/history") or {}).get("series", [])
    return sum(isinstance(point.get(key), int | float) for point in series)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian package 'chromium' is not installed (apt-get install chromium)")
@pytest.mark.timeout(240)
def test_live_dashboard_shows_both_peers_and_drawn_charts_in_chromium(run, tmp_path):
    # run alone, no earlier test has waited for the history: each chart needs two points to draw a line
    wait_until(lambda: all(charted_points(run.monitor, key) >= 2 for key in CHARTED), 180, "two points of history")
    dom = chromium(run.monitor.url + "/", tmp_path, "--dump-dom")
    peers_table = dom.split('id="peers-table"')[1].split("</table>")[0]
    assert peers_table.count('<tr class="training"') + peers_table.count('<tr class="recovering"') == 2
    for chart in ("loss", "speed", "peers"):
        drawn = re.search(rf'id="chart-{chart}-time"><svg[^>]*data-points="(\d+)"', dom)
        assert drawn and int(drawn.group(1)) >= 2, f"chart {chart} over time not drawn"
    assert f'value="{" ".join(run.monitor.initial_peers())}"' in dom
    screenshot = tmp_path / "live-dashboard.png"
    chromium(run.monitor.url + "/", tmp_path, f"--screenshot={screenshot}")
    assert screenshot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.timeout(180)
def test_a_peer_started_with_another_model_refuses_to_join_and_the_monitor_says_why(run):
    refused_before = set(run.monitor.get("/api/status")["refused_peers"])
    foreign = PeerProcess(run.workdir, "foreign", RUN_ID, run.monitor.initial_peers(), extra_flags=["--model", "base"])
    run.processes.append(foreign)
    code = wait_until(lambda: foreign.process.poll(), 150, "the foreign-model peer to give up")
    assert code == 2, foreign.log_text()[-2000:]
    assert "does not match run 'monitor-test'" in foreign.log_text()
    new_refusals = wait_until(
        lambda: {k: v for k, v in run.monitor.get("/api/status")["refused_peers"].items() if k not in refused_before},
        30,
        "the monitor to log the refusal",
    )
    assert all("differs from the run's" in reason for reason in new_refusals.values())
    assert wait_until(lambda: "Refusing the records of peer" in run.monitor.log_text(), 15, "the monitor's log line")
    # the honest peers are still counted (polled: one read can fall between two of a loaded peer's refreshes)
    wait_until(lambda: run.monitor.get("/api/status")["alive_peers"] == 2, 30, "both honest peers counted alive")


@pytest.mark.timeout(120)
def test_a_peer_with_another_model_is_refused(run):
    dht = hivemind.DHT(
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        initial_peers=run.monitor.initial_peers(),
        record_validators=monitor_validators(RUN_ID),
    )
    try:
        foreign = ProgressRecord(
            epoch=1,
            samples_per_second=1.0,
            samples_accumulated=8,
            loss_sum=9.0,
            mini_steps=1,
            device="cpu",
            version="dev",
            time=get_dht_time(),
            model_hash="f" * 16,
            protocol=PROTOCOL_VERSION,
        )
        assert publish_progress(dht, RUN_ID, foreign, expiration=30)
        refused = wait_until(
            lambda: [
                reason
                for reason in run.monitor.get("/api/status")["refused_peers"].values()
                if "fingerprint ffffffffffffffff differs" in reason
            ],
            30,
            "the foreign record",
        )
        assert "wrong --model or --tokenizer" in refused[0]
        # not counted as a peer of the run: never 3 (a slow honest peer may briefly look stale on a loaded machine)
        assert run.monitor.get("/api/status")["alive_peers"] <= 2
        wait_until(lambda: run.monitor.get("/api/status")["alive_peers"] == 2, 60, "both honest peers alive")
        message = check_model_matches(dht, RUN_ID, "f" * 16)  # what a peer checks before it trains
        assert message and "does not match run 'monitor-test'" in message and "--model" in message
        assert check_model_matches(dht, RUN_ID, run.monitor.get("/api/status")["model"]["hash"]) is None
    finally:
        dht.shutdown()


@pytest.mark.timeout(300)
def test_checkpoint_appears_and_downloads_with_a_matching_sha256(run, tmp_path):
    listing = wait_until(lambda: run.monitor.get("/api/checkpoints"), 180, "a checkpoint")
    newest = listing[0]
    assert newest["epoch"] >= 2 and newest["url"].endswith(f"/checkpoints/{newest['epoch']}")
    with urllib.request.urlopen(run.monitor.url + f"/checkpoints/{newest['epoch']}", timeout=60) as response:
        archive = response.read()
        assert response.headers["X-Checkpoint-SHA256"] == newest["sha256"] == hashlib.sha256(archive).hexdigest()
    out = tmp_path / "downloaded"
    result = download_with_cli(run.monitor, newest["epoch"], out)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["epoch"] == newest["epoch"] and {
        "config.json",
        "model.safetensors",
        "training_state.pt",
        "modeling.py",
        "configuration.py",
    } <= set(manifest["files"])
    assert "auto_map" in json.loads((out / "config.json").read_text())


@pytest.mark.timeout(400)  # run alone: the swarm starts and makes its first checkpoint first
def test_a_truncated_checkpoint_is_detected_and_never_served(run):
    # run alone, no earlier test has waited for the first checkpoint
    newest = wait_until(lambda: run.monitor.get("/api/checkpoints"), 180, "a checkpoint to damage")[0]
    weights = run.monitor.workdir / "checkpoints" / f"epoch-{newest['epoch']:06d}" / "model.safetensors"
    with open(weights, "r+b") as file:
        file.truncate(weights.stat().st_size // 2)
    assert newest["epoch"] not in [c["epoch"] for c in run.monitor.get("/api/checkpoints")]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(run.monitor.url + f"/checkpoints/{newest['epoch']}", timeout=30)
    assert refused.value.code == 404
    assert b"albert_monitor_corrupted_checkpoints_total 1.0" in run.monitor.get("/metrics")


@pytest.mark.timeout(400)
def test_restarted_monitor_keeps_its_history_and_checkpoints(run):
    # at least one checkpoint to keep: run alone, or right after the truncation test hid the only one, there may be none
    listing = wait_until(lambda: run.monitor.get("/api/checkpoints"), 180, "a checkpoint to keep across the restart")
    before_checkpoints = [c["epoch"] for c in listing]
    before_history = run.monitor.get("/api/history")
    before_status = run.monitor.get("/api/status")
    before_maddrs = run.monitor.initial_peers()  # read now: the restart rewrites the same peers file
    assert run.monitor.stop() == 0  # SIGTERM: a clean exit
    # same ports and identity: the same multiaddr, so the peers' --initial-peers stays valid
    restarted = MonitorProcess(
        run.monitor.workdir,
        RUN_ID,
        [*MONITOR_FLAGS, "--initial_peers", *run.peers["a"].maddrs()[:1]],
        dht_port=run.monitor.dht_port,
        http_port=run.monitor.http_port,
        name="monitor-2",
    )
    run.processes.append(restarted)
    assert restarted.wait_ready() == before_maddrs
    after_history = restarted.get("/api/history")
    assert len(after_history["series"]) >= len(before_history["series"])
    assert after_history["series"][: len(before_history["series"])] == before_history["series"]
    # the swarm trains on, so the restarted monitor may already have written newer checkpoints and, keeping the
    # newest --keep, retired the oldest: every earlier checkpoint at least as new as the oldest kept one is still there
    kept = {c["epoch"] for c in restarted.get("/api/checkpoints")}
    assert kept and max(kept) >= max(before_checkpoints)
    assert {epoch for epoch in before_checkpoints if epoch >= min(kept)} <= kept
    assert restarted.get("/api/status")["samples_total"] >= before_status["samples_total"]
    wait_until(lambda: restarted.get("/api/status")["alive_peers"] == 2, 120, "the peers to be seen again")
    run.monitor = restarted


@pytest.mark.timeout(600)
def test_a_new_peer_resumes_at_the_monitors_epoch_with_the_checkpoints_weights(run, tmp_path):
    wait_until(lambda: run.monitor.get("/api/status")["state_epoch"] >= 2, 120, "the monitor to hold a state")
    for name in ("a", "b"):
        run.peers[name].kill()
    wait_until(lambda: run.monitor.get("/api/status")["alive_peers"] == 0, 90, "the killed peers to expire")
    status, entry = run.monitor.post("/api/checkpoints", TOKEN)
    held = run.monitor.get("/api/status")["state_epoch"]
    assert status == 201 and entry["epoch"] == held >= 2
    # downloaded before the newcomer trains: alone it steps every few seconds, and --keep 3 removes the checkpoint of
    # `held` within a dozen seconds of that (seen on a loaded machine)
    out = tmp_path / "checkpoint"
    downloaded = download_with_cli(run.monitor, held, out)
    assert downloaded.returncode == 0, downloaded.stderr

    newcomer = PeerProcess(run.workdir, "c", RUN_ID, run.monitor.initial_peers())
    run.processes.append(newcomer)
    started_at = wait_until(newcomer.backup_epochs, 240, "the newcomer to back up the state it downloaded")[0]
    assert started_at == held, f"the newcomer started at epoch {started_at}, the monitor held {held}"
    wait_until(
        lambda: any(row["alive"] and row["epoch"] >= held for row in run.monitor.get("/api/peers")),
        120,
        "the newcomer to report an epoch >= the monitor's",
    )

    input_ids = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(input_ids, tmp_path / "input_ids.pt")
    standalone_logits = logits_with_transformers_alone(out, tmp_path)
    from model import LeanAlbertForMaskedLM

    peer_model = LeanAlbertForMaskedLM.from_pretrained(out)  # architecture only: the weights come next
    peer_state = torch.load(newcomer.backup_dir / f"epoch-{held:06d}.pt", weights_only=True)["model"]
    peer_model.load_state_dict(peer_state)
    with torch.no_grad():
        peer_logits = peer_model.eval()(input_ids=input_ids).logits
    torch.testing.assert_close(standalone_logits, peer_logits, rtol=1e-5, atol=1e-5)
    run.held_epoch, run.checkpoint_dir = held, out


def held_checkpoint(run, tmp_path) -> tuple[int, Path]:
    """The checkpoint of the monitor's state that the newcomer test downloaded, or, where that test did not run (or
    failed before the end), one made here the same way: on demand through the API, then downloaded."""
    if hasattr(run, "held_epoch"):
        return run.held_epoch, run.checkpoint_dir
    wait_until(lambda: run.monitor.get("/api/status")["state_epoch"] >= 2, 180, "the monitor to hold a state")
    out = tmp_path / "checkpoint"
    for _ in range(3):  # the run goes on: on a loaded machine --keep 3 can remove the checkpoint before it is fetched
        status, entry = run.monitor.post("/api/checkpoints", TOKEN)
        assert status == 201, entry
        downloaded = download_with_cli(run.monitor, entry["epoch"], out)
        if "no verified checkpoint" not in downloaded.stderr:
            break
    assert downloaded.returncode == 0, downloaded.stderr
    return entry["epoch"], out


@pytest.mark.timeout(400)
def test_resume_from_a_checkpoint_then_pull_the_state_straight_from_the_swarm(run, processes, tmp_path):
    held_epoch, checkpoint_dir = held_checkpoint(run, tmp_path)
    resumed = MonitorProcess(
        tmp_path / "resumed", "resumed-run", ["--resume_from", str(checkpoint_dir)], name="monitor-resumed"
    )
    processes.append(resumed)
    maddrs = resumed.wait_ready()
    assert resumed.get("/api/status")["state_epoch"] == held_epoch
    out = tmp_path / "pulled"
    result = pull_with_cli(resumed, maddrs, out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["epoch"] == held_epoch
    pulled, saved = load_file(out / "model.safetensors"), load_file(checkpoint_dir / "model.safetensors")
    # the state travels in the run's wire format, uncompressed by default: the pulled weights are the saved ones
    assert pulled.keys() == saved.keys()
    assert all(torch.equal(pulled[name], saved[name]) for name in saved)

    # a member serving the same state 5000 epochs ahead (under the absolute cap), asked first by its priority: pull
    # bounds a donor's epoch by the state epoch the run's monitor signs (+ the margin), refuses it and takes the
    # monitor's. Without that bound it took the attacker's state, and wrote a checkpoint of epoch held + 5000
    attacker = Process("poisoner-ahead", [sys.executable, "-m", "tests.peer.poisoner", "--mode", "state", "--poison",
                                          "ahead", "--run_id", "resumed-run", "--initial_peers", *maddrs,
                                          *PEER_FLAGS], tmp_path / "poisoner-ahead.log")  # fmt: skip
    processes.append(attacker)
    wait_until(lambda: "SERVING" in attacker.log_text(), 180, f"the poisoner to serve; {attacker.log_path}")
    wait_until(lambda: poisoner_announced(maddrs, "resumed-run"), 60, "the poisoner's state offer in the DHT")
    attacked = pull_with_cli(resumed, maddrs, tmp_path / "pulled-attacked")
    attacker.stop(timeout=20)
    assert attacked.returncode == 0, attacked.stdout[-2000:] + attacked.stderr[-3000:]
    # the poisoner's own epoch (0, or the monitor's if it downloaded the state first) + AHEAD
    refusal = re.search(rf"its epoch (\d+) is outside \[0, {held_epoch + EPOCH_MARGIN}\]", attacked.stderr)
    assert refusal and int(refusal[1]) >= AHEAD, attacked.stderr[-3000:]
    assert json.loads((tmp_path / "pulled-attacked" / "manifest.json").read_text())["epoch"] == held_epoch


def pull_with_cli(monitor: MonitorProcess, maddrs: list[str], out: Path) -> subprocess.CompletedProcess:
    """`albert-checkpoint pull` of ``monitor``'s run straight from the swarm, verified against its run key."""
    command = [sys.executable, "-m", "monitor.checkpoint_cli", "pull", "--initial-peers", *maddrs, "--run-id",
               monitor.run_id, "--run-key", run_key_of(monitor), "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--out",
               str(out)]  # fmt: skip
    return run_cli(command, timeout=240)


def poisoner_announced(maddrs: list[str], run_id: str) -> bool:
    """Whether the DHT lists a state donor at the poisoner's priority (every downloader's first choice then)."""
    dht = hivemind.DHT(initial_peers=maddrs, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=True)
    try:
        return announced_on(dht, run_id)
    finally:
        dht.shutdown()
