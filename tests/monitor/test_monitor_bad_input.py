"""Bad input at every boundary, through the real CLIs: a clear one-line error, no traceback, nothing saved changed.

Damaged checkpoints in a running monitor's directory (a truncated archive, a tampered weights file) are caught by
their sha256 and never served: the previous checkpoint stays the latest, and `albert-checkpoint download` and `eval`
refuse the damaged one. Wrongly typed model configs, a missing corpus, a --resume_from checkpoint and a --backup_dir
of another model shape stop the peer or the monitor before it changes any file, and a refused peer leaves no DHT
process or p2pd behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from model import LeanAlbertForMaskedLM, load_config
from monitor.checkpoint import TRAINING_STATE, CheckpointStore, write_manifest
from monitor.history import History
from monitor.state import build_run_model
from peer.swarm.config import OptimConfig
from peer.swarm.optimizer import make_optimizer, make_scheduler, param_groups
from peer.swarm.progress import model_fingerprint
from peer.swarm.run_key import RunKey
from tests.harness import REPO, child_env, kill_group, process_group_members
from tests.monitor.conftest import MonitorProcess

pytestmark = [pytest.mark.slow]
RUN_ID = "bad-input-test"
TOKEN = "bad-input-admin-token-0123"
TRACEBACK = "Traceback (most recent call last)"


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (the record of what is saved, compared before and after)."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def checkpoint_filler(model: LeanAlbertForMaskedLM, tokenizer, epoch: int):
    """Fills a checkpoint directory exactly as the monitor's StateKeeper does (weights, tokenizer, training state)."""
    optim = OptimConfig()

    def fill(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        optimizer = make_optimizer(param_groups(model, optim.weight_decay), optim)
        state = {
            "epoch": epoch,
            "optimizer": optimizer.state_dict(),
            "scheduler": make_scheduler(optimizer, optim).state_dict(),
            "optim_config": asdict(optim),
            "model_fingerprint": model_fingerprint(model.config, tokenizer),
        }
        torch.save(state, directory / TRAINING_STATE)

    return fill


def other_shape_checkpoint(directory: Path) -> Path:
    """A checkpoint of a model with 2 layers instead of the tiny preset's 4 (same tokenizer)."""
    run_model = build_run_model("tiny", None)
    config = load_config("tiny", vocab_size=run_model.model.config.vocab_size, num_hidden_layers=2)
    torch.manual_seed(1)
    other = LeanAlbertForMaskedLM(config)
    directory.mkdir(parents=True)
    checkpoint_filler(other, run_model.tokenizer, epoch=9)(directory)
    return directory


class CliRun:
    """A CLI run to its end in its own process group, output in files; whatever it leaves behind is recorded."""

    def __init__(self, name: str, args: list[str], workdir: Path):
        self.name, self.workdir = name, workdir
        self.out_path, self.err_path = workdir / f"{name}.out", workdir / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, *args], cwd=REPO, env=child_env(), stdout=out, stderr=err, start_new_session=True
            )

    def finish(self, timeout: float = 240) -> CliRun:
        try:
            self.code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(self.process.pid)
            pytest.fail(f"{self.name} did not exit within {timeout} s:\n{self.err_path.read_text()[-3000:]}")
        time.sleep(0.5)  # a leftover child (e.g. a DHT process) would still be there: nothing exits that fast
        self.leftovers = process_group_members(self.process.pid)
        if self.leftovers:
            kill_group(self.process.pid)
        self.stdout, self.stderr = self.out_path.read_text(), self.err_path.read_text()
        return self

    def assert_refused(self, code: int, *fragments: str) -> str:
        """Exit `code`, one stderr line that names the problem (all `fragments`), no traceback; returns the line."""
        assert self.code == code, f"{self.name}: exit {self.code}\n{self.stderr[-3000:]}"
        assert TRACEBACK not in self.stderr, self.stderr[-3000:]
        lines = [line for line in self.stderr.splitlines() if all(fragment in line for fragment in fragments)]
        assert len(lines) == 1, f"{self.name}: expected one line with {fragments}:\n{self.stderr[-3000:]}"
        return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Saved files (a monitor run dir with checkpoints of epochs 4, 6 and 8, a peer's backups of another model, bad
    model configs) and every refused CLI run on them, started together so that their start-ups overlap."""
    root = tmp_path_factory.mktemp("bad-input")
    run_model = build_run_model("tiny", None)
    run_dir = root / "monitor"
    history = History(run_dir / "history.sqlite")
    run_key = RunKey.load_or_create(run_dir / "run_key.pem")  # the monitor started on run_dir later signs with it
    store = CheckpointStore(run_dir / "checkpoints", history, keep=5, run_key=run_key)
    for epoch in (4, 6, 8):
        store.write(epoch, checkpoint_filler(run_model.model, run_model.tokenizer, epoch), loss=5.0, samples_total=64)
    history.close()
    other = other_shape_checkpoint(root / "other-shape")
    backups = root / "peer-backups"
    backups.mkdir()
    other_model = LeanAlbertForMaskedLM.from_pretrained(other)
    other_hash = model_fingerprint(other_model.config, run_model.tokenizer)
    torch.save({"epoch": 9, "model_hash": other_hash, "model": other_model.state_dict()}, backups / "epoch-000009.pt")
    damaged = root / "damaged-resume"  # a monitor checkpoint (with its manifest) whose weights file was cut short
    damaged.mkdir()
    checkpoint_filler(run_model.model, run_model.tokenizer, epoch=4)(damaged)
    write_manifest(damaged, epoch=4)
    with open(damaged / "model.safetensors", "r+b") as weights:
        weights.truncate(1000)
    wrong_types = root / "wrong-types" / "config.json"
    wrong_types.parent.mkdir()
    wrong_types.write_text(json.dumps({"model_type": "lean_albert", "hidden_size": "256", "num_hidden_layers": 2.5}))

    refused_run_dir = root / "refused-monitor"  # a monitor's files that a refused start must leave as they are
    refused_run_dir.mkdir()
    (refused_run_dir / "history.sqlite").write_bytes(b"kept as is")
    (refused_run_dir / "identity.key").write_bytes(os.urandom(64))
    saved = {name: tree_hashes(path) for name, path in [("run", run_dir), ("refused", refused_run_dir)]}
    saved |= {"backups": tree_hashes(backups), "other": tree_hashes(other)}

    peer = ["-m", "peer", "--run_id", RUN_ID, "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--torch_threads", "1"]
    monitor = ["-m", "monitor", "--run_id", RUN_ID, "--run_dir", str(refused_run_dir), "--http_port", "0"]
    runs = {
        "peer-config": CliRun("peer-config", [*peer, "--model", str(wrong_types), "--backup_dir", str(root)], root),
        "monitor-config": CliRun("monitor-config", [*monitor, "--model", str(wrong_types)], root),
        "peer-corpus": CliRun(
            "peer-corpus", [*peer, "--corpus", "/does/not/exist", "--backup_dir", str(root / "unused")], root
        ),
        "monitor-resume": CliRun("monitor-resume", [*monitor, "--resume_from", str(other)], root),
        "monitor-damaged": CliRun("monitor-damaged", [*monitor, "--resume_from", str(damaged)], root),
        "peer-backups": CliRun("peer-backups", [*peer, "--backup_dir", str(backups)], root),
    }
    for run in runs.values():
        run.finish()

    class World:
        pass

    world = World()
    world.root, world.run_dir, world.runs, world.saved = root, run_dir, runs, saved
    world.fingerprint = run_key.fingerprint
    world.paths = {"run": run_dir, "refused": refused_run_dir, "backups": backups, "other": other}
    return world


def assert_nothing_changed(world, *names: str) -> None:
    for name in names:
        assert tree_hashes(world.paths[name]) == world.saved[name], f"files under {world.paths[name]} changed"


def test_a_model_config_with_wrong_types_stops_peer_and_monitor(world):
    world.runs["peer-config"].assert_refused(2, "Invalid setting", "must be an int", "wrong-types/config.json")
    world.runs["monitor-config"].assert_refused(1, "cannot run", "must be an int", "wrong-types/config.json")
    assert_nothing_changed(world, "refused")


def test_a_missing_corpus_stops_the_peer(world):
    world.runs["peer-corpus"].assert_refused(2, "Invalid setting", "/does/not/exist", "does not exist")
    assert not (world.root / "unused").exists()


def test_resume_from_a_checkpoint_of_another_shape_is_refused_and_nothing_is_overwritten(world):
    world.runs["monitor-resume"].assert_refused(1, "cannot run", str(world.paths["other"]), "another model")
    assert_nothing_changed(world, "refused", "other")


def test_resume_from_a_damaged_checkpoint_is_refused_in_one_line(world):
    world.runs["monitor-damaged"].assert_refused(1, "cannot run", "damaged-resume")
    assert_nothing_changed(world, "refused")


def test_a_backup_dir_of_another_model_stops_the_peer_and_its_backups_are_kept(world):
    world.runs["peer-backups"].assert_refused(2, "Invalid setting", "holds backups of another model")
    assert_nothing_changed(world, "backups")


def test_a_peer_refused_after_joining_leaves_no_process_behind(world):
    for name in ("peer-corpus", "peer-backups"):
        assert not world.runs[name].leftovers, f"{name} left {world.runs[name].leftovers} running"


@pytest.fixture(scope="module")
def monitor(world, processes):
    """A monitor restarted on its run dir, whose checkpoints the tests then damage, newest first."""
    monitor = MonitorProcess(world.run_dir, RUN_ID, ["--admin_token", TOKEN, "--checkpoint_every", "0"])
    processes.append(monitor)
    monitor.wait_ready()
    assert [entry["epoch"] for entry in monitor.get("/api/checkpoints")] == [8, 6, 4]
    return monitor


def cli(world, name: str, *args: str) -> CliRun:
    return CliRun(name, ["-m", "monitor.checkpoint_cli", *args], world.root).finish()


def corrupted_total(monitor) -> float:
    families = text_string_to_metric_families(monitor.get("/metrics").decode())
    return next(s.value for f in families for s in f.samples if s.name == "albert_monitor_corrupted_checkpoints_total")


@pytest.mark.parametrize(
    ("damage", "epoch", "previous"),
    [("truncated archive", 8, 6), ("tampered weights", 6, 4)],
    ids=["archive", "weights"],
)
@pytest.mark.timeout(300)
def test_a_damaged_checkpoint_is_never_served_and_the_previous_one_stays_latest(
    world, monitor, damage, epoch, previous
):
    checkpoints = world.run_dir / "checkpoints"
    name = f"epoch-{epoch:06d}"
    if damage == "truncated archive":
        with open(checkpoints / f"{name}.tar", "r+b") as archive:
            archive.truncate(archive.seek(0, os.SEEK_END) // 2)
    else:
        weights = checkpoints / name / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one flipped bit pattern in a tensor: only the sha256 can tell
        weights.write_bytes(bytes(data))
    saved = tree_hashes(checkpoints)

    assert [entry["epoch"] for entry in monitor.get("/api/checkpoints")] == list(range(previous, 2, -2))
    assert monitor.get("/checkpoints/latest") == (checkpoints / f"epoch-{previous:06d}.tar").read_bytes()
    assert corrupted_total(monitor) == (8 - epoch) // 2 + 1  # each damaged checkpoint counted once
    out = world.root / f"downloaded-{epoch}"
    download = ["download", "--from", monitor.url, "--run-key", world.fingerprint]
    assert cli(world, f"download-latest-{epoch}", *download, "--out", str(out)).code == 0
    assert json.loads((out / "manifest.json").read_text())["epoch"] == previous
    refused = cli(
        world,
        f"download-{epoch}",
        *download,
        "--epoch",
        str(epoch),
        "--out",
        str(world.root / "never"),
    )
    refused.assert_refused(1, "HTTP 404", f"no verified checkpoint for epoch {epoch}")
    if damage == "tampered weights":
        evaluated = cli(world, "eval-tampered", "eval", str(checkpoints / name), "--max-sequences", "4")
        evaluated.assert_refused(1, "corrupted", "does not match its sha256")
    assert tree_hashes(checkpoints) == saved  # the damaged files stay as found, for a human to look at
    assert monitor.get("/healthz")["status"] == "ok"
