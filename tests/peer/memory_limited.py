"""The batch-size search under a real memory limit, in a fresh process of its own (run by tests/peer/test_batch_size.py).

    python -m tests.peer.memory_limited probe|search|nothing

An address-space limit (RLIMIT_AS) is a limit on the whole process: in the long-lived pytest process, threads and
malloc arenas that earlier tests left behind (hivemind, torch) come and go inside the limit and fail trials that fit
(seen in a full-suite run). A fresh interpreter holds only this model. Prints one JSON line of what it found.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import re
import resource
import sys

import torch

from data import load_tokenizer, model_overrides_from_tokenizer
from model import LeanAlbertForMaskedLM, load_config
from peer.batch_size import BatchProbe, largest_fitting, search_batch, with_headroom
from peer.config import PeerConfig
from peer.swarm.config import OptimConfig

CPU = torch.device("cpu")
SEQUENCE = 32
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


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


def tiny_model() -> LeanAlbertForMaskedLM:
    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    return LeanAlbertForMaskedLM(load_config("tiny", **model_overrides_from_tokenizer(tokenizer)))


def probe(model) -> dict:
    """The largest batch under 60 and 200 MB more address space, whether it less the search's headroom fits again,
    and whether twice it fits.

    Not the largest itself again: a batch's peak varies by a sample or so from pass to pass (allocation order; seen
    single-threaded too: 7 or 8 under 60 MB, 27 to 29 under 200 MB), so the boundary batch fits only most times.
    The headroom is there for that.
    """
    trial = BatchProbe(model, SEQUENCE, CPU, torch.float32)
    assert trial(1)  # warm-up: the allocator's first arenas are not part of what a batch needs
    found = {}
    for budget_mb in (60, 200):
        with memory_limit(budget_mb * 2**20):
            largest = largest_fitting(trial, 1024)
            found[budget_mb] = {
                "largest": largest,
                "headroom_fits": trial(with_headroom(largest)),
                "twice_fits": trial(2 * largest + 1),
            }
    return {
        "found": found,
        "some_trial_failed": any(not fits for _, fits in trial.trials),
        "no_gradients_left": all(p.grad is None for p in model.parameters()),
        "trains_after": trial(found[200]["largest"]),
        "trials": trial.trials,
    }


def search(model) -> dict:
    """search_batch under 100 MB more, beside the largest batch the bare probe finds there."""
    config, optim = PeerConfig(batch_size="auto", max_length=SEQUENCE), OptimConfig(target_batch_size=65536)
    BatchProbe(model, SEQUENCE, CPU, torch.float32)(1)
    with memory_limit(100 * 2**20):
        largest = largest_fitting(BatchProbe(model, SEQUENCE, CPU, torch.float32), 4096)
        chosen = search_batch(config, optim, model, CPU, torch.float32)
    return {
        "largest": largest,
        "batch_size": chosen.batch_size,
        "grad_accumulation": chosen.grad_accumulation,
        "samples_per_step": chosen.samples_per_step,
        "max_length": chosen.max_length,
    }


def nothing(model) -> dict:
    """The error of a search where not even one sample of the model's longest sequence fits."""
    config = PeerConfig(batch_size="auto", max_length=model.config.max_position_embeddings)
    try:
        with memory_limit(0):
            search_batch(config, OptimConfig(), model, CPU, torch.float32)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


if __name__ == "__main__":
    scenario = {"probe": probe, "search": search, "nothing": nothing}[sys.argv[1]]
    print(json.dumps(scenario(tiny_model())), flush=True)
