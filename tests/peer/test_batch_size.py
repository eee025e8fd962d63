"""``--batch-size auto``: the search finds the largest batch that fits under a real memory limit, on CPU.

No GPU here: the CUDA path runs the same search (``search_batch``) with CUDA's OutOfMemoryError; these tests drive it
on CPU under an address-space limit (RLIMIT_AS), where torch's allocator fails the same clean way, with the real
model forward and backward. The CPU path's thread choice and the CLI's "auto" are checked as they run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from data import load_tokenizer, model_overrides_from_tokenizer
from model import LeanAlbertForMaskedLM, load_config
from peer.batch_size import (
    accumulation_for,
    available_cores,
    choose_batch,
    largest_fitting,
    search_batch,
    with_headroom,
)
from peer.config import PeerConfig
from peer.swarm.config import OptimConfig
from tests.harness import LOOPBACK, GroupProcess, run_cli, wait_until

CPU = torch.device("cpu")
SEQUENCE = 32


@pytest.mark.parametrize("boundary, limit", [(1, 64), (5, 64), (37, 64), (64, 64), (100, 64), (1000, 4096)])
def test_the_search_finds_the_boundary_in_few_trials(boundary, limit):
    trials = []

    def fits(batch):
        trials.append(batch)
        return batch <= boundary

    assert largest_fitting(fits, limit) == min(boundary, limit)
    assert len(trials) <= 2 * math.ceil(math.log2(limit)) + 1 and max(trials) <= limit


def test_nothing_fits_gives_zero():
    assert largest_fitting(lambda batch: False, 64) == 0


@pytest.fixture(scope="module")
def model():
    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    return LeanAlbertForMaskedLM(load_config("tiny", **model_overrides_from_tokenizer(tokenizer)))


def in_a_fresh_process(scenario: str) -> dict:
    """Run a memory-limited scenario of tests/peer/memory_limited.py in its own interpreter; its JSON result."""
    done = run_cli([sys.executable, "-m", "tests.peer.memory_limited", scenario], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # minutes on a loaded 2-core machine: every large block is a fresh mmap
def test_the_probe_finds_what_fits_under_a_real_memory_limit():
    result = in_a_fresh_process("probe")
    found = {int(budget): outcome for budget, outcome in result["found"].items()}
    for budget_mb, outcome in found.items():
        largest = outcome["largest"]
        assert 1 <= largest < 1024 and outcome["headroom_fits"] and not outcome["twice_fits"], (budget_mb, result)
    assert found[200]["largest"] > 2 * found[60]["largest"], (
        result
    )  # more memory, a larger batch: the limit bounded it
    assert result["some_trial_failed"], result  # real allocation failures were caught, not raised
    assert result["no_gradients_left"] and result["trains_after"], result  # and the model still trains afterwards


@pytest.mark.slow
def test_search_batch_leaves_headroom_and_sets_accumulation():
    chosen = in_a_fresh_process("search")
    # the probe also holds the optimizer's future buffers (offloaded optimizer: one gradient accumulator)
    assert 1 <= chosen["batch_size"] <= with_headroom(chosen["largest"]), chosen
    assert chosen["grad_accumulation"] == max(1, 4096 // chosen["batch_size"]), chosen
    assert chosen["samples_per_step"] <= 65536 // 16 and chosen["max_length"] == SEQUENCE, chosen


def test_search_batch_caps_a_pass_at_a_sixteenth_of_the_target(model):
    chosen = search_batch(PeerConfig(batch_size="auto", max_length=SEQUENCE), OptimConfig(target_batch_size=64), model,
                          CPU, torch.float32)  # fmt: skip
    assert chosen.batch_size == 4 and chosen.grad_accumulation == 1


def test_nothing_fits_is_a_clear_error():
    # the tiny preset's longest sequence (512 positions): batch 1's logits alone take tens of MB
    error = in_a_fresh_process("nothing")["error"]
    assert error is not None and "not even 1 sample of 512 tokens fits on cpu" in error, error


def test_cpu_auto_takes_threads_from_the_cores(model):
    before = torch.get_num_threads()
    try:
        chosen = choose_batch(PeerConfig(batch_size="auto"), OptimConfig(target_batch_size=4096), model, CPU,
                              torch.float32)  # fmt: skip
        assert chosen.torch_threads == available_cores() == torch.get_num_threads()
        assert chosen.batch_size == 8 and chosen.grad_accumulation == accumulation_for(8, 4096) == 32
        pinned = choose_batch(PeerConfig(batch_size="auto", torch_threads=1), OptimConfig(), model, CPU, torch.float32)
        assert pinned.torch_threads == 1 == torch.get_num_threads()  # a thread count given is kept
    finally:
        torch.set_num_threads(before)


def test_available_cores_follows_the_affinity_mask():
    """A process pinned to one core (taskset, docker --cpuset-cpus) counts one, whatever the machine has."""
    probe = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
    probe += "from peer.batch_size import available_cores; print(available_cores())"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert found.stdout.split()[-1] == "1", found.stderr


def test_an_integer_batch_size_is_left_alone(model):
    config = PeerConfig(batch_size=12, grad_accumulation=3)
    assert choose_batch(config, OptimConfig(), model, CPU, torch.float32) is config


@pytest.mark.slow
def test_albert_peer_prints_its_automatic_choice(tmp_path):
    command = [sys.executable, "-m", "peer", *LOOPBACK, "--batch-size", "auto", "--target_batch_size", "256",
               "--max_length", "64", "--backup_dir", str(tmp_path / "backups")]  # fmt: skip
    peer = GroupProcess("auto-peer", command, tmp_path / "peer.log")
    try:
        wait_until(lambda: "Joined run" in peer.log_text() or not peer.alive(), 300, "the peer to join")
        log = peer.log_text()
    finally:
        peer.stop()
    cores = available_cores()
    assert "--batch-size auto on cpu: 8 samples per pass, --grad-accumulation 2 (16 samples per step" in log, log
    assert f"{cores} torch threads ({cores} cores available)" in log
