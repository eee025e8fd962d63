"""An attacker for tests: serves crafted outer states to joiners of a local-steps run, at the highest priority.

python -m tests.peer.outer_state_attacker --initial-peers MADDR... --run-id RUN --shapes '[[5, 6], [5]]' \
    --attacks shapes,nan,huge,format,epoch,count

The shapes are those of the run's outer state (outer weights then momentum, as peer/local_steps.py serves it). For
each attack it starts a DHT node of its own (hivemind declares state donors by peer id) and a plain hivemind averager
(hivemind's RPC names) under the run's local-steps prefix, offering its state at priority 1e9 + i, far above any
honest epoch, so a joiner asks every attacker before the honest donors. Each serves a state that is honest (right
count, shapes, dtype, format, a plausible epoch) but for its one attack. Prints "READY" once every offer is in the DHT,
then stays up until killed.
"""

from __future__ import annotations

import argparse
import json
import time

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager

from peer.hivemind_gaps.averagers import HivemindHandleNames
from peer.swarm.outer_state import STATE_FORMAT

HONEST_EPOCH = 3


def crafted(attack: str, shapes: list[list[int]]) -> tuple[dict, list[torch.Tensor]]:
    """An outer state (metadata, tensors) that is honest but for ``attack``."""
    metadata = {"epoch": HONEST_EPOCH, "format": STATE_FORMAT}
    tensors = [torch.randn(*shape) * 0.1 for shape in shapes]
    if attack == "shapes":  # the first matrix transposed: as many numbers, another shape
        index = next(index for index, tensor in enumerate(tensors) if tensor.dim() == 2)
        tensors[index] = tensors[index].t().contiguous()
    elif attack == "nan":
        tensors[0].view(-1)[0] = float("nan")
    elif attack == "huge":  # finite: passes a finiteness check, would blow any outer step up
        tensors[-1].fill_(1e30)
    elif attack == "format":  # a state of another mode (the synchronous one has no format)
        metadata = {"epoch": HONEST_EPOCH, "format": "synchronous"}
    elif attack == "epoch":  # would make the joiner skip the schedule to its end and claim the run's lead
        metadata = {"epoch": 2**40, "format": STATE_FORMAT}
    elif attack == "count":  # one tensor short: hivemind would apply the rest in order
        tensors = tensors[:-1]
    else:
        raise ValueError(f"unknown attack {attack!r}")
    return metadata, tensors


class CraftedDonor(HivemindHandleNames, DecentralizedAverager):
    """A plain hivemind averager whose served state is ``state`` (metadata, tensors)."""

    def __init__(self, *args, state: tuple[dict, list[torch.Tensor]], **kwargs):
        self.crafted_state = state  # set before start: hivemind serves get_current_state from this process
        super().__init__(*args, **kwargs)

    def get_current_state(self):
        metadata, tensors = self.crafted_state
        return metadata, tensors, None


def offered(dht: hivemind.DHT, prefix: str) -> int:
    found = dht.get(f"{prefix}.all_averagers", latest=True)
    return len(found.value) if found is not None and isinstance(found.value, dict) else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--shapes", required=True, help="JSON list of the outer state's tensor shapes")
    parser.add_argument("--attacks", required=True, help="comma-separated: shapes,nan,huge,format,epoch,count")
    args = parser.parse_args()
    shapes, attacks = json.loads(args.shapes), args.attacks.split(",")
    prefix = f"{args.run_id}_outer"
    donors = []
    for index, attack in enumerate(attacks):
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=args.initial_peers)
        donor = CraftedDonor(
            [torch.zeros(1)], dht, prefix=prefix, state=crafted(attack, shapes), allow_state_sharing=True, start=True
        )
        donor.state_sharing_priority = 1e9 + index
        donors.append((dht, donor))
        print(f"serving {attack} as {dht.peer_id}", flush=True)
    deadline = time.monotonic() + 60
    while offered(donors[0][0], prefix) < len(attacks) and time.monotonic() < deadline:
        time.sleep(0.5)
    print("READY", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
