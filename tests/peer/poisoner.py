"""A poisoning member of a run, run as its own process by the tests: a real hivemind.Optimizer built for the same run
with the same factories as an honest peer, that sends poisoned gradients into real averaging rounds, or serves a
poisoned training state to peers that download one.

    python -m tests.peer.poisoner --mode grads --schedule nan,huge,outlier --epochs_each 3 PEER_FLAGS...
    python -m tests.peer.poisoner --mode state --poison nan|epoch|ahead|shape|oversize PEER_FLAGS...
    python -m tests.peer.poisoner --mode rounds --schedule focus,scale,nan --epochs_each 4 PEER_FLAGS...

grads: before each step it fills every gradient with the phase's values (skipping the local finite check a peer
makes), one phase per ``--epochs_each`` epochs of its own, then leaves. ``nan``: NaN; ``huge``: 1e30; ``outlier``:
random signs of magnitude --outlier_value (finite, fp16-safe, but far larger than honest gradients). It reduces its own
share of each round with hivemind's unchecked runner (its own NaN part in), as an attacker would.
state: it shares, at the highest priority, a state whose first tensor is NaN (``nan``), whose epoch is 2**62
(``epoch``: beyond every bound) or 5000 ahead of its own (``ahead``: under the absolute cap, beyond the margin a
downloader allows over the run's known epoch), whose first matrix has half its rows (``shape``: finite, as from a
model of another size), or with 1 MiB tensors appended, 3x the state's size in all (``oversize``: finite; many small
ones, so the stream never pauses long enough to time out the downloader, as compressing one huge tensor would), until
killed. rounds: it trains in step with the swarm (sending zero gradients) and sends, in every state averaging round,
its parameters and optimizer statistics x1000 (``scale``: finite), its state with one small tensor x1000, the
embeddings' LayerNorm gain (``focus``: the whole allowance of a bound on the set's norm aimed at 64 values), or NaN
(``nan``), one phase per ``--epochs_each`` epochs, then leaves (the NaN rounds reduced with hivemind's unchecked runner, as an attacker would); its own state
is untouched (the poison goes into copies). It prints one line per event:
POISONED <phase> epoch <e>, POISONED ROUND <phase>, SERVING, DONE.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import multiprocessing as mp
import sys
import time

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import CompressionInfo

from peer.config import PeerConfig
from peer.hivemind_gaps.averagers import ConsistentTrainingStateAverager, CountedGradientAverager
from peer.hivemind_gaps.state_check import EPOCH_MARGIN
from peer.runtime import build_model
from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.dht import build_dht
from peer.swarm.flags import parse_configs
from peer.swarm.optimizer import build_optimizer, param_groups

HUGE = 1e30
HUGE_EPOCH = 2**62
AHEAD = 5 * EPOCH_MARGIN  # epochs beyond the epoch it holds: 5x what downloaders allow over the epoch they know
POISONER_PRIORITY = float(2**40)  # above any epoch: every downloader asks this peer first


def poisoner_announced(dht, run_id: str) -> bool:
    """Whether ``dht`` (a hivemind.DHT) lists a state donor at the poisoner's priority: every downloader's first
    choice then. For the tests that wait for the poisoner's offer before they download."""
    found = dht.get(f"{run_id}_state_averager.all_averagers", latest=True)
    offers = found.value if found is not None and isinstance(found.value, dict) else {}
    return any(getattr(offer, "value", None) == POISONER_PRIORITY for offer in offers.values())


def poisoned_gradients(model: torch.nn.Module, phase: str, outlier_value: float) -> None:
    for param in model.parameters():
        if phase == "nan":
            param.grad = torch.full_like(param, float("nan"))
        elif phase == "huge":
            param.grad = torch.full_like(param, HUGE)
        else:  # random signs: a constant tensor has no spread, which scaled-fp16 compression cannot encode
            param.grad = outlier_value * torch.randn_like(param).sign()


def send_poisoned_gradients(optimizer, model, samples: int, schedule: list[str], epochs_each: int, value: float):
    optimizer.load_state_from_peers()  # at the swarm's epoch first, or the first phase is spent catching up
    for phase in schedule:
        until = optimizer.local_epoch + epochs_each
        while optimizer.local_epoch < until:
            poisoned_gradients(model, phase, value)
            before = optimizer.local_epoch
            optimizer.step(batch_size=samples)
            optimizer.zero_grad(set_to_none=True)
            if optimizer.local_epoch != before:
                print(f"POISONED {phase} epoch {before}", flush=True)
            time.sleep(0.3)  # the pace of an honest tiny peer, so the rounds are not all the attacker's


ROUND_POISONS = ("scale", "nan", "focus")
SCALE = 1000.0  # x the sender's own state: finite, and far beyond any honest peer's
FOCUS = "lean_albert.embeddings.layer_norm.weight"  # 64 of the tiny preset's 1.36 M parameters; norm 8 of 53.5
focus_index = -1  # its place among the averaged tensors (the parameters come first), set before the averager forks
# the phase of the state-round attack, set by the main process, read in the state averager's (forked after it is made)
ROUND_PHASE = mp.Value(ctypes.c_int, -1)


def poison_state_rounds() -> None:
    """Send poisoned copies of this process's state in every state round (class-level patch: the averager's process
    is forked from this one, so it runs the patched method); what comes back is applied to the copies only."""
    honest = ConsistentTrainingStateAverager._run_allreduce_inplace_

    async def poisoned_round(self, tensors, group_info, *args, **kwargs):
        if ROUND_PHASE.value < 0:
            return await honest(self, tensors, group_info, *args, **kwargs)
        poison = ROUND_POISONS[ROUND_PHASE.value]
        copies = [poisoned_copy(tensor, index, poison) for index, tensor in enumerate(tensors)]
        print(f"POISONED ROUND {poison} with {len(group_info.peer_ids) - 1} peer(s)", flush=True)
        if poison == "nan":  # reduced with hivemind's unchecked runner, as an attacker would (its own NaN part in)
            return await DecentralizedAverager._run_allreduce_inplace_(self, copies, group_info, *args, **kwargs)
        return await honest(self, copies, group_info, *args, **kwargs)

    ConsistentTrainingStateAverager._run_allreduce_inplace_ = poisoned_round


def poisoned_copy(tensor: torch.Tensor, index: int, poison: str) -> torch.Tensor:
    if poison == "nan":
        return torch.full_like(tensor, float("nan"))
    if poison == "scale" or index == focus_index:
        return tensor * SCALE
    return tensor.clone()


def poison_rounds_in_step(optimizer, model, samples: int, schedule: list[str], epochs_each: int):
    optimizer.load_state_from_peers()  # at the swarm's epoch first: a state round gathers one epoch's peers
    for phase in schedule:
        ROUND_PHASE.value = ROUND_POISONS.index(phase)
        until = optimizer.local_epoch + epochs_each
        while optimizer.local_epoch < until:
            for param in model.parameters():  # its gradients are not the attack: zeros weigh nothing in the mean
                param.grad = torch.zeros_like(param)
            before = optimizer.local_epoch
            optimizer.step(batch_size=samples)
            optimizer.zero_grad(set_to_none=True)
            if optimizer.local_epoch != before:
                print(f"POISONED {phase} epoch {before}", flush=True)
            time.sleep(0.3)


def poisoned_index(tensors: list[torch.Tensor], poison: str) -> int:
    if poison == "shape":  # the first matrix: rows of another model's size
        return next(index for index, tensor in enumerate(tensors) if tensor.dim() == 2 and tensor.shape[0] >= 2)
    return 0


def poisoned_tensor(tensors: list[torch.Tensor], index: int, poison: str) -> torch.Tensor:
    tensor = tensors[index]
    if poison == "nan":
        return torch.full_like(tensor, float("nan"))
    return torch.randn(tensor.shape[0] // 2, *tensor.shape[1:], dtype=tensor.dtype)  # shape


def oversized(tensors: list[torch.Tensor], infos: list) -> tuple[list, list]:
    """The state and 1 MiB float32 tensors after it, 3x the state's bytes in all (uncompressed)."""
    state_bytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    extra = [torch.randn(2**18) for _ in range(3 * state_bytes // 2**20 + 1)]
    return tensors + extra, infos + [
        CompressionInfo.from_tensor(tensor, key=f"extra{i}") for i, tensor in enumerate(extra)
    ]


def poison_served_state(poison: str) -> None:
    """Make every state this process serves poisoned (a class-level patch: hivemind calls the averager's own
    get_current_state through a weak reference taken at start-up, so an instance attribute would not be seen)."""
    honest = ConsistentTrainingStateAverager.get_current_state

    def poisoned_state(self):
        metadata, tensors, infos = honest(self)
        if poison == "epoch":
            return dict(metadata, epoch=HUGE_EPOCH), tensors, infos
        if poison == "ahead":
            return dict(metadata, epoch=metadata["epoch"] + AHEAD), tensors, infos
        tensors, infos = list(tensors), list(infos)
        if poison == "oversize":
            return metadata, *oversized(tensors, infos)
        index = poisoned_index(tensors, poison)
        tensors[index] = poisoned_tensor(tensors, index, poison)
        infos[index] = CompressionInfo.from_tensor(tensors[index], key=infos[index].key, role=infos[index].role)
        return metadata, tensors, infos

    ConsistentTrainingStateAverager.get_current_state = poisoned_state


def serve_poisoned_state(optimizer) -> None:
    optimizer.state_averager.state_sharing_priority = POISONER_PRIORITY
    print("SERVING", flush=True)
    while True:
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("grads", "state", "rounds"), required=True)
    parser.add_argument("--schedule", default="nan,huge,outlier")
    parser.add_argument("--epochs_each", type=int, default=3)
    parser.add_argument("--outlier_value", type=float, default=10.0)
    parser.add_argument("--poison", choices=("nan", "epoch", "ahead", "shape", "oversize"), default="nan")
    args, rest = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    swarm, optim, config = parse_configs(SwarmConfig, OptimConfig, PeerConfig, args=rest)
    torch.set_num_threads(1)
    if args.mode == "state":
        poison_served_state(args.poison)
    if args.mode == "rounds":
        poison_state_rounds()
    if args.mode == "grads":  # its own share reduced with hivemind's unchecked runner, as an attacker would
        CountedGradientAverager._run_allreduce_inplace_ = DecentralizedAverager._run_allreduce_inplace_
    _, model = build_model(config, torch.device("cpu"))
    global focus_index  # hivemind averages the parameters in the order of the optimizer's groups
    averaged = [param for group in param_groups(model, optim.weight_decay) for param in group["params"]]
    focus_index = next(i for i, param in enumerate(averaged) if param is model.get_parameter(FOCUS))
    dht = build_dht(swarm)
    optimizer = build_optimizer(dht, model, swarm, optim, config.samples_per_step)
    try:
        if args.mode == "grads":
            schedule = args.schedule.split(",")
            send_poisoned_gradients(
                optimizer, model, config.samples_per_step, schedule, args.epochs_each, args.outlier_value
            )
        elif args.mode == "rounds":
            schedule = args.schedule.split(",")
            poison_rounds_in_step(optimizer, model, config.samples_per_step, schedule, args.epochs_each)
        else:
            serve_poisoned_state(optimizer)
    finally:
        optimizer.shutdown()
        dht.shutdown()
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
