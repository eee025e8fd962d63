"""A Byzantine member of a run, run as its own process by the tests: a real peer (start_peer: the same DHT, model,
optimizer, progress and score records as an honest one) that trains honestly until ``--from_epoch``, then corrupts
the gradient it sends into every averaging round.

    python -m tests.peer.byzantine --attack sign-flip|constant|gaussian --from_epoch 3 --scale 1000 PEER_FLAGS...

sign-flip: its honest gradient times ``-scale``. constant: one fixed direction (seeded), at ``scale`` times the norm of
its honest gradient. gaussian: noise of ``scale`` times its honest gradient's norm. The values stay finite and within
fp16's range, so hivemind and the update guard's finiteness checks let them through: only robust aggregation stops
them. It prints one line per epoch: ATTACK <mode> epoch <e> (or HONEST epoch <e>), and DONE at --max_epochs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

import torch

from peer.config import PeerConfig
from peer.runtime import start_peer
from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.flags import parse_configs
from peer.train import accumulate_gradients

ATTACKS = ("sign-flip", "constant", "gaussian")


def gradient_norm(model: torch.nn.Module) -> float:
    return float(torch.sqrt(sum((param.grad.float() ** 2).sum() for param in model.parameters())))


@torch.no_grad()
def corrupt(model: torch.nn.Module, attack: str, scale: float, direction: list[torch.Tensor]) -> None:
    """Replace the model's honest gradient by the attack's (``direction``: a fixed unit vector, per parameter)."""
    norm = gradient_norm(model)
    values = sum(tensor.numel() for tensor in direction)
    for param, fixed in zip(model.parameters(), direction):
        if attack == "sign-flip":
            param.grad.mul_(-scale)
        elif attack == "constant":
            param.grad.copy_(fixed * scale * norm)
        else:  # i.i.d. noise whose total norm is about scale * norm
            param.grad.copy_(torch.randn_like(param.grad) * scale * norm / values**0.5)


def unit_direction(model: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    raw = [torch.randn(param.shape, generator=generator) for param in model.parameters()]
    norm = torch.sqrt(sum((tensor**2).sum() for tensor in raw))
    return [tensor / norm for tensor in raw]


def attack_loop(peer, attack: str, from_epoch: int, scale: float) -> None:
    model, training, reporter, config = peer.model, peer.training, peer.reporter, peer.config
    direction = unit_direction(model, seed=1234)
    epoch = training.epoch
    model.train()
    while not config.max_epochs or epoch < config.max_epochs:
        loss = accumulate_gradients(peer, contextlib.nullcontext(), None)
        attacking = training.epoch >= from_epoch
        if attacking:
            corrupt(model, attack, scale, direction)
        training.step(config.samples_per_step, None)
        reporter.batch_done(loss.item(), config.samples_per_step, 0.0, 0.0)
        training.zero_grad()
        if training.epoch != epoch:
            print(f"{'ATTACK ' + attack if attacking else 'HONEST'} epoch {epoch}", flush=True)
            epoch = training.epoch
            reporter.epoch_done(epoch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--attack", choices=ATTACKS, required=True)
    parser.add_argument("--from_epoch", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1000.0)
    args, rest = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    swarm, optim, config = parse_configs(SwarmConfig, OptimConfig, PeerConfig, args=rest)
    peer = start_peer(swarm, optim, config)
    print(f"PEER_ID {peer.dht.peer_id.to_base58()}", flush=True)
    try:
        attack_loop(peer, args.attack, args.from_epoch, args.scale)
    finally:
        peer.shutdown()
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
