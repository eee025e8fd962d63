"""CenteredClip's settings on real gradients: the tau sweep and the sorting-network threshold behind
docs/robust-aggregation.md and peer/swarm/centered_clip.py.

Run by hand from the repository root: `python tests/benchmarks/bench_centered_clip.py [--taus 0.5,1,2,3]`.
Prints, asserts nothing.

1. tau sweep: one 8-sample batch of 64 tokens of the `tiny` preset per peer, each peer its own data shard, cut into
   hivemind's parts as one reducer of the whole vector receives them; CenteredClip of every part at each tau factor,
   for honest groups and for honest peers with sign flippers (their own honest gradient x -1000). Printed: cosine of
   the result to the honest mean, its norm over the honest mean's, and the most iterations any part took.
2. Sorting: the coordinate-wise sort CenteredClip starts from (its median), as odd-even transposition (elementwise
   min/max) against torch.sort along dim 0, on one part of 2**19 bytes per sender, for 3..64 senders. Timed on one
   torch thread by that thread's CPU time (with a thread pool, the pool's work would not be counted), alternating the
   two methods, best of --rounds: other processes on a shared machine slow both alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from hivemind.averaging.partition import TensorPartContainer

from peer.swarm.centered_clip import DEFAULT_REJECT_FACTOR, ClipSettings, centered_clip
from tests.peer.real_gradients import honest_gradients

PART_VALUES = 2**19 // 4  # hivemind's default part size, in fp32 values


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--taus", default="0.5,1,2,3", help="tau factors to sweep, comma-separated")
    parser.add_argument("--peers", type=int, default=8, help="honest gradients computed (the largest honest group)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds per method and sender count")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def flat(tensors) -> torch.Tensor:
    return torch.cat([tensor.reshape(-1) for tensor in tensors])


def robust_vector(senders: list[list[torch.Tensor]], settings: ClipSettings) -> tuple[torch.Tensor, int]:
    """The whole vector as the reducers aggregate it, part by part; and the most iterations a part took."""
    per_sender = [TensorPartContainer(grads, (1.0,)).get_raw_input_parts(0) for grads in senders]
    results = [
        centered_clip(torch.stack([parts[index] for parts in per_sender]), torch.ones(len(senders)), settings)
        for index in range(len(per_sender[0]))
    ]
    return flat(result.centre for result in results), max(result.iterations for result in results)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def tau_sweep(gradients: list[list[torch.Tensor]], taus: list[float]) -> None:
    scenarios = {
        "4 honest": (gradients[:4], 4),
        f"{len(gradients)} honest": (gradients, len(gradients)),
        "3 honest + 1 sign flip x1000": (gradients[:3] + [[-1000 * g for g in gradients[3]]], 3),
        "3 honest + 2 sign flips x1000": (gradients[:3] + [[-1000 * g for g in gradients[3]]] * 2, 3),
    }
    print("tau sweep: cosine to the honest mean / norm over the honest mean's / most iterations of a part")
    print("(clip only: without leaving out the parts beyond reject_factor median distances)")
    print(f"{'senders':44s}" + "".join(f"{'tau ' + str(tau):>24s}" for tau in taus))
    for name, (senders, honest) in scenarios.items():
        honest_mean = torch.stack([flat(grads) for grads in senders[:honest]]).mean(dim=0)
        for label, reject in (("", DEFAULT_REJECT_FACTOR), (", clip only", float("inf"))):
            cells = []
            for tau in taus:
                robust, iterations = robust_vector(senders, ClipSettings(tau_factor=tau, reject_factor=reject))
                ratio = float(robust.norm() / honest_mean.norm())
                cells.append(f"{cosine(robust, honest_mean):.3f} / {ratio:.3f} / {iterations:2d}")
            print(f"{name + label:44s}" + "".join(f"{cell:>24s}" for cell in cells))


def transposition_sort(parts: torch.Tensor) -> list[torch.Tensor]:
    """Odd-even transposition sort of the rows, coordinate-wise (what centered_clip.sorted_rows does below its
    threshold), here for any row count so both methods can be timed on each."""
    rows = list(parts)
    for sweep in range(len(rows)):
        for index in range(sweep % 2, len(rows) - 1, 2):
            rows[index], rows[index + 1] = (
                torch.minimum(rows[index], rows[index + 1]),
                torch.maximum(rows[index], rows[index + 1]),
            )
    return rows


def cpu_seconds(function, parts: torch.Tensor) -> float:
    started = time.thread_time()
    function(parts)
    return time.thread_time() - started


def sorting_speed(rounds: int) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print(f"\ncoordinate-wise sort of one {PART_VALUES}-value part per sender (1 thread, CPU ms, best of {rounds})")
    print(f"{'senders':>8s} {'transposition':>14s} {'torch.sort':>11s} {'sort / transposition':>21s}")
    for senders in (3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64):
        parts = torch.randn(senders, PART_VALUES)
        network, library = [], []
        for _ in range(rounds):
            network.append(cpu_seconds(transposition_sort, parts))
            library.append(cpu_seconds(lambda rows: rows.sort(dim=0), parts))
        fast, slow = min(network), min(library)
        print(f"{senders:8d} {fast * 1e3:14.1f} {slow * 1e3:11.1f} {slow / fast:21.1f}")
    torch.set_num_threads(threads)


def main() -> None:
    args = parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    gradients = honest_gradients(args.peers, args.seed)
    tau_sweep(gradients, [float(tau) for tau in args.taus.split(",")])
    sorting_speed(args.rounds)


if __name__ == "__main__":
    main()
