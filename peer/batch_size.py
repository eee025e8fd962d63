"""``--batch-size auto``: the largest per-device batch that fits (CUDA), torch threads from the cores (CPU), and the
gradient accumulation that keeps one step's contribution a modest share of the swarm's target batch.

The search is a plain function of a ``fits(n)`` predicate, so it is tested on CPU with the real model under a real
memory limit (tests/peer/test_batch_size.py); on CUDA the same predicate catches ``torch.OutOfMemoryError``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from peer.config import PeerConfig
from peer.swarm.config import OptimConfig

logger = logging.getLogger(__name__)

# A step's contribution aims at 1/16 of the target batch: the epoch's end is overshot by at most that much, and the
# peer still reports (and may join the averaging round) several times per epoch.
STEP_SHARE = 16
# When memory bounds the batch: room for allocator fragmentation and longer-lived buffers. A chosen margin, not a
# measured one: the CUDA search has not run on a GPU yet (none was lent to this project so far).
HEADROOM = 0.15
CPU_BATCH_SIZE = 8  # on CPU speed, not memory, is the limit: PeerConfig's usual batch


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """The largest n in [1, limit] for which ``fits(n)`` (taken as monotone) holds; 0 if not even 1 fits.

    Doubles from 1 until a batch fails or the limit is reached, then bisects between the last fit and the first
    failure: about 2 log2(n) trials.
    """
    if limit < 1 or not fits(1):
        return 0
    good, bad = 1, None
    while bad is None:
        trial = min(2 * good, limit)
        if trial == good:
            return good
        if fits(trial):
            good = trial
        else:
            bad = trial
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError naming it, or oneDNN's own when it
    cannot allocate its scratch space: "could not create a primitive", seen under the tests' memory limit)."""
    cpu_messages = ("DefaultCPUAllocator: can't allocate memory", "could not create a primitive")
    return isinstance(error, torch.OutOfMemoryError) or any(message in str(error) for message in cpu_messages)


class BatchProbe:
    """``probe(n)``: whether one forward and backward pass of n samples of ``max_length`` tokens fits in memory.

    Runs the real model on random token ids, as the training loop does (same autocast). While it runs it also holds
    ``reserve_bytes`` on the device: the buffers the optimizer adds later (hivemind's gradient accumulators, and
    LAMB's moments unless offloaded), which the probe must not count as room for activations.

    Args:
        model: the model the peer trains.
        max_length: the run's tokens per sample.
        device: where the model lives.
        precision: the training loop's autocast dtype.
        reserve_bytes: bytes kept allocated on the device during each trial.
    """

    def __init__(self, model, max_length: int, device: torch.device, precision: torch.dtype, reserve_bytes: int = 0):
        self.model, self.max_length, self.device = model, max_length, device
        self.precision, self.reserve_bytes = precision, reserve_bytes
        self.trials: list[tuple[int, bool]] = []

    def __call__(self, batch: int) -> bool:
        fits = self._try(batch)
        self.model.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # what the failed trial cached must not crowd the next one
        self.trials.append((batch, fits))
        return fits

    def _try(self, batch: int) -> bool:
        vocab = self.model.config.vocab_size
        autocast = torch.autocast(self.device.type, dtype=self.precision, enabled=self.precision != torch.float32)
        try:
            reserve = torch.empty(self.reserve_bytes, dtype=torch.uint8, device=self.device)
            ids = torch.randint(0, vocab, (batch, self.max_length), device=self.device)
            with autocast:
                loss = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            loss.backward()
            del reserve, ids, loss
            return True
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            return False  # leaving the handler drops the traceback, and with it the trial's tensors


def optimizer_reserve_bytes(model, optim: OptimConfig) -> int:
    """Device memory the optimizer adds after the probe: gradient accumulators, plus LAMB's two moments on-device."""
    parameter_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # fp32 buffers
    return parameter_bytes * (1 if optim.offload_optimizer else 3)


def accumulation_for(batch: int, target_batch_size: int) -> int:
    """Passes per step so that one step contributes about 1/STEP_SHARE of the target batch (at least one pass)."""
    return max(1, (target_batch_size // STEP_SHARE) // batch)


def batch_limit(target_batch_size: int) -> int:
    """A pass never holds more than a step should contribute."""
    return max(1, target_batch_size // STEP_SHARE)


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, lowered by a cgroup v2 CPU quota (docker --cpus)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota visible: the affinity mask is the limit
    return cores


def choose_batch(
    config: PeerConfig, optim: OptimConfig, model, device: torch.device, precision: torch.dtype
) -> PeerConfig:
    """Resolve ``--batch-size auto`` (else return ``config`` as it is): a memory search on CUDA, threads on CPU."""
    if config.batch_size != "auto":
        return config
    if device.type == "cuda":
        return search_batch(config, optim, model, device, precision)
    return cpu_batch(config, optim, device)


def cpu_batch(config: PeerConfig, optim: OptimConfig, device: torch.device) -> PeerConfig:
    """On CPU (and MPS): the usual batch, accumulation by the same rule, torch threads from the cores; logged."""
    cores = available_cores()
    threads = config.torch_threads or cores
    torch.set_num_threads(threads)
    batch = min(CPU_BATCH_SIZE, batch_limit(optim.target_batch_size))
    accumulation = accumulation_for(batch, optim.target_batch_size)
    chosen = dataclasses.replace(config, batch_size=batch, grad_accumulation=accumulation, torch_threads=threads)
    logger.info(
        f"--batch-size auto on {device.type}: {batch} samples per pass, --grad-accumulation {accumulation} "
        f"({chosen.samples_per_step} samples per step of the swarm's {optim.target_batch_size}), {threads} torch "
        f"threads ({cores} cores available)"
    )
    return chosen


def with_headroom(largest: int) -> int:
    """The batch to train with when ``largest`` fit: the largest fits most times only (allocations differ a little
    from pass to pass), so leave ``HEADROOM`` of it."""
    return max(1, int(largest * (1 - HEADROOM)))


def search_batch(
    config: PeerConfig, optim: OptimConfig, model, device: torch.device, precision: torch.dtype
) -> PeerConfig:
    """The largest batch that fits on ``device`` (less headroom), and its accumulation; logged.

    Used on CUDA; it works on any device whose allocator fails cleanly (CPU under a memory limit, in the tests).
    """
    probe = BatchProbe(model, config.max_length, device, precision, optimizer_reserve_bytes(model, optim))
    limit = batch_limit(optim.target_batch_size)
    largest = largest_fitting(probe, limit)
    if largest == 0:
        raise ValueError(
            f"--batch-size auto: not even 1 sample of {config.max_length} tokens fits on {device}; use "
            "--gradient-checkpointing, a smaller --max-length or model, or --device cpu"
        )
    batch = largest if largest == limit else with_headroom(largest)
    accumulation = accumulation_for(batch, optim.target_batch_size)
    chosen = dataclasses.replace(config, batch_size=batch, grad_accumulation=accumulation)
    bound = f"the cap of 1/{STEP_SHARE} of the target batch" if largest == limit else f"{largest} fit, less headroom"
    logger.info(
        f"--batch-size auto on {device}: {batch} samples of {config.max_length} tokens per pass ({bound}; "
        f"{len(probe.trials)} trial passes), --grad-accumulation {accumulation} "
        f"({chosen.samples_per_step} samples per step of the swarm's {optim.target_batch_size})"
    )
    return chosen
