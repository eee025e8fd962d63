"""Issue 16's join test: a peer given only the join string trains in the run with exactly the run's settings.

The monitor runs with a non-default run id, model, target batch and learning rate and a tokenizer trained here, that
no peer has on disk; the peer gets `--join STRING` and nothing else (its environment names only where its own files
go). What it trains with is read back from its log and from the backup of its training state. A second peer that
also gives `--learning-rate` exits with code 2 and one line naming both values, and the monitor's log says why.
"""

from __future__ import annotations

import gzip
import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

from data.tokenization import train_tokenizer
from peer.swarm.manifest import tokenizer_listing
from tests.harness import REPO, child_env, run_cli, wait_until
from tests.monitor.conftest import MonitorProcess, Process

pytestmark = pytest.mark.slow
RUN_ID = "join-by-string"
TARGET_BATCH, LEARNING_RATE = 48, 0.02
# not a preset: the peer has no copy of this file, so the manifest must carry the architecture itself
MODEL = {"model_type": "lean_albert", "embedding_size": 32, "hidden_size": 96, "num_hidden_layers": 2}
MODEL.update(num_attention_heads=4, intermediate_size=192)
ADOPTED = "Adopted the signed manifest of run 'join-by-string': "


@pytest.fixture(scope="module")
def run(processes, tmp_path_factory):
    work = tmp_path_factory.mktemp("join")
    with gzip.open(REPO / "data" / "corpus" / "bundled-00.jsonl.gz", "rt") as corpus:
        texts = [json.loads(line)["text"] for line in itertools.islice(corpus, 200)]
    train_tokenizer(texts, vocab_size=1000, out_dir=work / "tokenizer")
    (work / "model.json").write_text(json.dumps(MODEL))
    flags = ["--model", str(work / "model.json"), "--tokenizer", str(work / "tokenizer")]
    flags += ["--target_batch_size", str(TARGET_BATCH), "--learning_rate", str(LEARNING_RATE)]
    monitor = MonitorProcess(work / "monitor", RUN_ID, extra_flags=flags)
    processes.append(monitor)
    monitor.wait_ready()
    join = (work / "monitor" / "join.txt").read_text().strip()
    return work, monitor, join


def peer_env(work, name: str, **extra) -> dict:
    """Only this peer's own files (its cache in a fresh HOME, a backup each epoch, where); nothing about the run."""
    backups = {"ALBERT_BACKUP_DIR": str(work / name / "backups"), "ALBERT_BACKUP_EVERY": "1"}
    return child_env({"HOME": str(work / name / "home"), **backups, **extra})


def test_a_peer_with_only_the_join_string_trains_with_the_runs_settings(run, processes):
    work, monitor, join = run
    assert join in monitor.log_text() and monitor.get("/api/status")["join"] == join  # printed, written, served
    command = [sys.executable, "-m", "peer", "--join", join]
    peer = Process("joiner", command, work / "joiner.log", env=peer_env(work, "joiner"))
    processes.append(peer)
    backups = work / "joiner" / "backups"
    wait_until(lambda: "-> epoch 3" in peer.log_text() and list(backups.glob("epoch-*.pt")), 300, "three epochs")
    log = peer.log_text()

    adopted = json.loads(log.split(ADOPTED, 1)[1].splitlines()[0])
    assert (adopted["run_id"], adopted["training_mode"]) == (RUN_ID, "synchronous")
    assert (adopted["target_batch_size"], adopted["learning_rate"]) == (TARGET_BATCH, LEARNING_RATE)
    assert json.loads(Path(adopted["model"]).read_text()) == MODEL
    fetched = adopted["tokenizer"]
    assert fetched.startswith(str(work / "joiner" / "home" / ".cache")), "the tokenizer came from the monitor"
    assert tokenizer_listing(fetched) == tokenizer_listing(work / "tokenizer")
    assert f"of the {TARGET_BATCH}-sample target" in log

    state = torch.load(max(backups.glob("epoch-*.pt")), map_location="cpu", weights_only=True)
    assert set(state["scheduler"]["base_lrs"]) == {LEARNING_RATE}
    assert state["model_hash"] == monitor.get("/api/status")["model"]["hash"]  # same model, same vocabulary
    assert state["model"]["lean_albert.embeddings.word_embeddings.weight"].shape[1] == MODEL["embedding_size"]
    status = wait_until(lambda: (s := monitor.get("/api/status")) and s["samples_total"] > 0 and s, 60, "progress")
    assert status["run_id"] == RUN_ID and status["refused_peers"] == {}


def test_a_contradicting_learning_rate_exits_2_and_the_monitor_logs_why(run):
    work, monitor, join = run
    command = [sys.executable, "-m", "peer", "--join", join, "--learning-rate", "0.01"]
    result = run_cli(command, timeout=120, env=peer_env(work, "contrary"))
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "--learning-rate 0.01 contradicts the run's learning_rate 0.02" in last
    wait_until(
        lambda: "refused to join run 'join-by-string': --learning-rate 0.01 contradicts" in monitor.log_text(),
        30,
        "the monitor to log why the peer refused",
    )
