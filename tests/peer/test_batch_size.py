"""``--batch-size auto``: the search finds the largest batch that fits under a real memory limit, on CPU.

No GPU here: the CUDA path runs the same search (``search_batch``) with CUDA's OutOfMemoryError; these tests drive it
on CPU under an address-space limit (RLIMIT_AS), where torch's allocator fails the same clean way, with the real
model forward and backward. The CPU path's thread choice and the CLI's "auto" are checked as they run.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import re
import resource
import sys

import pytest
import torch

from data import load_tokenizer, model_overrides_from_tokenizer
from model import LeanAlbertForMaskedLM, load_config
from peer.batch_size import (
    HEADROOM,
    BatchProbe,
    accumulation_for,
    available_cores,
    choose_batch,
    largest_fitting,
    search_batch,
)
from peer.config import PeerConfig
from peer.swarm.config import OptimConfig
from tests.harness import LOOPBACK, GroupProcess, wait_until

CPU = torch.device("cpu")
SEQUENCE = 32
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


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


def address_space() -> int:
    return int(re.search(r"VmSize:\s+(\d+)", open("/proc/self/status").read())[1]) * 1024


@contextlib.contextmanager
def memory_limit(extra_bytes: int):
    """Cap this process's address space at its current size plus ``extra_bytes``; lifted on the way out.

    glibc is first told to serve every large block by mmap (a fixed threshold, as its dynamic one rises after big
    frees): a freed trial then returns its address space at once, like a device allocator's freed block.
    """
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (address_space() + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.slow  # minutes on a loaded 2-core machine: every large block is a fresh mmap
def test_the_probe_finds_what_fits_under_a_real_memory_limit(model):
    probe = BatchProbe(model, SEQUENCE, CPU, torch.float32)
    assert probe(1)  # warm-up: the allocator's first arenas are not part of what a batch needs
    found = {}
    for budget_mb in (60, 200):
        with memory_limit(budget_mb * 2**20):
            found[budget_mb] = largest_fitting(probe, 1024)
            fits_again = probe(found[budget_mb])
            twice_fits = probe(2 * found[budget_mb] + 1)
        assert 1 <= found[budget_mb] < 1024 and fits_again and not twice_fits, (budget_mb, probe.trials)
    assert found[200] > 2 * found[60], found  # more memory, a larger batch: the limit, not chance, bounded it
    assert any(not fits for _, fits in probe.trials)  # real allocation failures were caught, not raised
    assert all(p.grad is None for p in model.parameters())  # each trial leaves no gradients behind
    assert probe(found[200])  # and the model still trains once the limit is lifted


@pytest.mark.slow
def test_search_batch_leaves_headroom_and_sets_accumulation(model):
    config, optim = PeerConfig(batch_size="auto", max_length=SEQUENCE), OptimConfig(target_batch_size=65536)
    BatchProbe(model, SEQUENCE, CPU, torch.float32)(1)
    with memory_limit(100 * 2**20):
        largest = largest_fitting(BatchProbe(model, SEQUENCE, CPU, torch.float32), 4096)
        chosen = search_batch(config, optim, model, CPU, torch.float32)
    # the probe also holds the optimizer's future buffers (offloaded optimizer: one gradient accumulator)
    assert 1 <= chosen.batch_size <= max(1, int(largest * (1 - HEADROOM)))
    assert chosen.grad_accumulation == max(1, 4096 // chosen.batch_size)
    assert chosen.samples_per_step <= 65536 // 16 and chosen.max_length == SEQUENCE


def test_search_batch_caps_a_pass_at_a_sixteenth_of_the_target(model):
    chosen = search_batch(PeerConfig(batch_size="auto", max_length=SEQUENCE), OptimConfig(target_batch_size=64), model,
                          CPU, torch.float32)  # fmt: skip
    assert chosen.batch_size == 4 and chosen.grad_accumulation == 1


def test_nothing_fits_is_a_clear_error(model):
    # the tiny preset's longest sequence (512 positions): batch 1's logits alone take tens of MB
    config = PeerConfig(batch_size="auto", max_length=model.config.max_position_embeddings)
    with memory_limit(0), pytest.raises(ValueError, match="not even 1 sample of 512 tokens fits on cpu"):
        search_batch(config, OptimConfig(), model, CPU, torch.float32)


def test_cpu_auto_takes_threads_from_the_cores(model):
    before = torch.get_num_threads()
    try:
        chosen = choose_batch(PeerConfig(batch_size="auto"), OptimConfig(target_batch_size=4096), model, CPU,
                              torch.float32)  # fmt: skip
        assert chosen.torch_threads == available_cores() == torch.get_num_threads()
        assert available_cores() <= len(os.sched_getaffinity(0))
        assert chosen.batch_size == 8 and chosen.grad_accumulation == accumulation_for(8, 4096) == 32
        pinned = choose_batch(PeerConfig(batch_size="auto", torch_threads=1), OptimConfig(), model, CPU, torch.float32)
        assert pinned.torch_threads == 1 == torch.get_num_threads()  # a thread count given is kept
    finally:
        torch.set_num_threads(before)


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
