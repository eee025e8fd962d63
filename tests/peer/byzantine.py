"""A Byzantine member of a run, run as its own process by the tests and bench_byzantine: a real peer (start_peer: the
same DHT, model, optimizer, progress and score records as an honest one, a closed run's join flags included) that
trains honestly until ``--from_epoch``, then corrupts the gradient it sends into every averaging round.

    python -m tests.peer.byzantine --attack MODE --from_epoch 3 [--scale 1000] [--peers 5 --attackers 2] PEER_FLAGS...

Modes (the first three are blunt, the others come from the literature):

- sign-flip: its honest gradient times ``-scale``.
- constant: one fixed direction (seeded), at ``scale`` times the norm of its honest gradient.
- gaussian: noise of ``scale`` times its honest gradient's norm.
- label-flip: a real forward and backward on wrong targets: the masked positions' labels of each batch are shuffled
  among themselves (same tokens, wrong places), so the gradient has an honest norm and honest statistics but teaches
  the wrong mapping. ``--scale`` is not used.
- label-shift: label flipping as BTARD's ALBERT runs did it (Gorbunov et al., ICML 2022): each masked position's
  label is the next token id, ``(label + 1) % vocab_size``. Unlike label-flip it moves the token frequencies the
  output layer learns first; but the bundled Unigram tokenizer's ids are sorted by falling piece probability, so the
  next id is about as frequent and the frequencies stay close to the true ones. ``--scale`` is not used.
- label-invert: the classic label flip of classification attacks (class ``c`` to ``C - 1 - c``) over the
  vocabulary: ``vocab_size - 1 - label``, so frequent tokens' targets become rare ones. ``--scale`` is not used.
  Both can map the rarest ids onto special tokens' (``[PAD]`` is 0): a few targets, left as they come.
- alie ("A little is enough", Baruch et al., NeurIPS 2019): ``mean - z * std``, coordinate-wise, with
  ``z = inv_normal_cdf((n - s) / n)`` and ``s = floor(n / 2 + 1) - m`` for ``n = --peers`` members of which
  ``m = --attackers`` attack (``--z`` overrides it; note that z is 0 for 4 peers with 1 attacker).
- ipm (inner-product manipulation, Xie et al., UAI 2019, "Fall of empires"): ``-epsilon * mean``, ``epsilon =
  --epsilon``.

How alie and ipm estimate the honest mean and spread: an attacker of this project cannot see the others' parts
before it sends its own, so it does what both papers allow when the attackers' view is their own data: it computes
its honest gradient at every step and keeps the last ``WINDOW`` of them (flattened). The mean is their coordinate-wise
mean; the spread of what an honest member sends in a round is their coordinate-wise standard deviation divided by
the square root of the steps this peer made in its last round (a round averages that many steps' gradients). The
estimates lag a few steps behind the model and come from one data shard: an attacker that could read the honest
parts (a colluding reducer) would do better, so these measure a lower bound of the attack.

The values of every mode stay finite and within fp16's range, so hivemind and the update guard's finiteness checks
let them through: only robust aggregation stops them. It prints one line per epoch: ATTACK <mode> epoch <e> (or
HONEST epoch <e>), and DONE at --max_epochs or when asked to stop. ``--stay``: when its token expired unrenewed (it
was revoked) it does not leave as an honest peer does, but goes on trying (a hostile member's choice).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from collections import deque
from statistics import NormalDist

import torch

import peer.runtime as peer_runtime
from peer.config import PeerConfig
from peer.runtime import start_peer
from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.flags import parse_configs
from peer.train import accumulate_gradients

ATTACKS = ("sign-flip", "constant", "gaussian", "label-flip", "label-shift", "label-invert", "alie", "ipm")
LABEL_ATTACKS = ("label-flip", "label-shift", "label-invert")
WINDOW = 4  # own honest step gradients kept for the alie/ipm estimates: enough for a spread, recent enough to track
IGNORED_LABEL = -100  # the MLM collator's label of unmasked positions


def gradient_norm(model: torch.nn.Module) -> float:
    return float(torch.sqrt(sum((param.grad.float() ** 2).sum() for param in model.parameters())))


def alie_z(peers: int, attackers: int) -> float:
    """The largest z that keeps the attackers' value inside the honest majority's spread (Baruch et al., eq. 3)."""
    if not 0 < attackers < peers:
        raise ValueError(f"alie needs 0 < --attackers < --peers, got {attackers} of {peers}")
    supporters = math.floor(peers / 2 + 1) - attackers
    return NormalDist().inv_cdf((peers - supporters) / peers)


def flat_gradient(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([param.grad.detach().flatten().float() for param in model.parameters()])


def write_flat(model: torch.nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for param in model.parameters():
        count = param.grad.numel()
        param.grad.copy_(flat[offset : offset + count].view_as(param.grad))
        offset += count


class HonestEstimate:
    """The attacker's view of the honest gradients: its own last WINDOW step gradients (see the module docstring)."""

    def __init__(self, window: int = WINDOW):
        self.gradients: deque[torch.Tensor] = deque(maxlen=window)
        self.steps_per_round = 1

    def add(self, model: torch.nn.Module) -> None:
        self.gradients.append(flat_gradient(model))

    def mean(self) -> torch.Tensor:
        return torch.stack(list(self.gradients)).mean(dim=0)

    def round_std(self) -> torch.Tensor:
        """Coordinate-wise spread of one round's gradient (0 until two steps are known)."""
        if len(self.gradients) < 2:
            return torch.zeros_like(self.gradients[0])
        return torch.stack(list(self.gradients)).std(dim=0) / self.steps_per_round**0.5


@torch.no_grad()
def corrupt(model: torch.nn.Module, attack: str, scale: float, direction: list[torch.Tensor]) -> None:
    """Replace the model's honest gradient by a blunt attack's (``direction``: a fixed unit vector, per parameter)."""
    norm = gradient_norm(model)
    values = sum(tensor.numel() for tensor in direction)
    for param, fixed in zip(model.parameters(), direction):
        if attack == "sign-flip":
            param.grad.mul_(-scale)
        elif attack == "constant":
            param.grad.copy_(fixed * scale * norm)
        else:  # i.i.d. noise whose total norm is about scale * norm
            param.grad.copy_(torch.randn_like(param.grad) * scale * norm / values**0.5)


@torch.no_grad()
def statistical_attack(model: torch.nn.Module, attack: str, estimate: HonestEstimate, z: float, epsilon: float):
    """alie: mean - z * std; ipm: -epsilon * mean (estimated from the attacker's own gradients)."""
    mean = estimate.mean()
    write_flat(model, mean - z * estimate.round_std() if attack == "alie" else -epsilon * mean)


def shuffle_labels(batch: dict, generator: torch.Generator) -> dict:
    """The batch with its masked positions' labels permuted among themselves (a label-flipping member's data)."""
    labels = batch["labels"].clone()
    masked = labels != IGNORED_LABEL
    values = labels[masked]
    labels[masked] = values[torch.randperm(values.numel(), generator=generator)]
    return {**batch, "labels": labels}


def remap_labels(batch: dict, vocab_size: int, attack: str) -> dict:
    """The batch with each masked position's label mapped to another token id: the next one (label-shift, BTARD's
    label flipping) or its mirror in the vocabulary (label-invert, the classic flip)."""
    remaps = {"label-shift": lambda ids: (ids + 1) % vocab_size, "label-invert": lambda ids: vocab_size - 1 - ids}
    labels = batch["labels"].clone()
    masked = labels != IGNORED_LABEL
    labels[masked] = remaps[attack](labels[masked])
    return {**batch, "labels": labels}


class WrongLabels:
    """Wraps the peer's batch iterator: every batch comes with wrong labels (``attack``'s kind) once ``active``."""

    def __init__(self, batches, attack: str, vocab_size: int, seed: int = 4321):
        self.batches, self.attack, self.vocab_size, self.active = batches, attack, vocab_size, False
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        if not self.active:
            return batch
        if self.attack == "label-flip":
            return shuffle_labels(batch, self.generator)
        return remap_labels(batch, self.vocab_size, self.attack)


def unit_direction(model: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    raw = [torch.randn(param.shape, generator=generator) for param in model.parameters()]
    norm = torch.sqrt(sum((tensor**2).sum() for tensor in raw))
    return [tensor / norm for tensor in raw]


def attack_loop(peer, args: argparse.Namespace) -> None:
    model, training, reporter, config = peer.model, peer.training, peer.reporter, peer.config
    direction = unit_direction(model, seed=1234)
    estimate = HonestEstimate()
    z = args.z if args.z is not None else (alie_z(args.peers, args.attackers) if args.attack == "alie" else 0.0)
    if args.attack in LABEL_ATTACKS:
        peer.batches = WrongLabels(peer.batches, args.attack, model.config.vocab_size)
    epoch, steps_this_round = training.epoch, 0
    model.train()
    # a stop request (SIGTERM, or its revoked token ending: peer/swarm/access.py) ends it like an honest peer
    while (not config.max_epochs or epoch < config.max_epochs) and not peer.stop.requested:
        attacking = training.epoch >= args.from_epoch
        if args.attack in LABEL_ATTACKS:
            peer.batches.active = attacking
        loss = accumulate_gradients(peer, contextlib.nullcontext(), None)
        if args.attack in ("alie", "ipm"):
            estimate.add(model)
            if attacking:
                statistical_attack(model, args.attack, estimate, z, args.epsilon)
        elif attacking and args.attack not in LABEL_ATTACKS:
            corrupt(model, args.attack, args.scale, direction)
        training.step(config.samples_per_step, None)
        steps_this_round += 1
        reporter.batch_done(loss.item(), config.samples_per_step, 0.0, 0.0)
        training.zero_grad()
        if training.epoch != epoch:
            print(f"{'ATTACK ' + args.attack if attacking else 'HONEST'} epoch {epoch}", flush=True)
            estimate.steps_per_round, steps_this_round = max(steps_this_round, 1), 0
            epoch = training.epoch
            reporter.epoch_done(epoch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attack", choices=ATTACKS, required=True)
    parser.add_argument("--from_epoch", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1000.0, help="sign-flip, constant, gaussian")
    parser.add_argument("--peers", type=int, default=5, help="alie: members of the run (n)")
    parser.add_argument("--attackers", type=int, default=2, help="alie: attacking members (m)")
    parser.add_argument("--z", type=float, default=None, help="alie: z instead of the paper's formula")
    parser.add_argument("--epsilon", type=float, default=0.1, help="ipm: epsilon (the paper's 0.1 by default)")
    parser.add_argument("--stay", action="store_true", help="stay when its token expired unrenewed (revoked)")
    args, rest = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    swarm, optim, config = parse_configs(SwarmConfig, OptimConfig, PeerConfig, args=rest)
    if args.stay:  # what start_peer hands the member-list publisher: a hostile member does not leave when told
        peer_runtime.leave_when_token_expired = lambda: print("STAYING after the token expired", flush=True)
    peer = start_peer(swarm, optim, config)
    print(f"PEER_ID {peer.dht.peer_id.to_base58()}", flush=True)
    try:
        attack_loop(peer, args)
    finally:
        peer.shutdown()
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
