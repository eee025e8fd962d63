"""Synchronous training against local steps on slow links: utilisation, bytes per sample, swarm samples/s (by hand).

    sudo python -m tests.benchmarks.bench_wan [--mbit 5] [--window 180] [--configs sync,h8-fp16,h32-fp16,...]

Four peers and a monitor of the tiny preset, each peer in a network namespace of the chaos harness (tests/chaos). For
each configuration a fresh swarm boots and trains until all four peers are in step; then each peer's upload and
download are shaped by ``tc tbf`` to --mbit, and after --settle seconds, for --window seconds, the peers' /metrics are
read at the start and the end (no latency is added: the tbf queue's own delay only):

- utilisation: a peer's seconds of compute over the window's seconds (the median peer, and the lowest): forward and
  backward, plus the inner optimizer's steps with --local-steps (they are compute, as in DiLoCo's utilisation; the
  synchronous mode's optimizer step is not told apart from its all-reduce and is not counted); the forward and
  backward share alone is printed beside it (``fb med``);
- bytes per trained sample: all-reduce payload bytes sent and received by every peer (gradients, or pseudo-gradients
  with --local-steps) over the samples the peers trained; ``+state`` adds the local-steps mode's outer re-syncs
  (weights and momentum, every --average-state-every outer steps; the synchronous mode's state rounds run inside
  hivemind's state averager and are not counted, which only flatters the reference);
- samples/s of the swarm: samples every peer trained, over the window;
- partial rounds: hivemind's warnings of rounds that left some member's parts out (each peer kept its own values
  there: the round did not really average), in the four peers' logs during the window;
- loss: the median peer's mean training loss over its last epoch at the window's end (at equal wall time, not equal
  samples: a rough check only that a configuration still learns).

It also prints how the link compares with the model: one synchronous fp32 all-reduce of the tiny model over --mbit
against one local step (the regime the issue asks for: at least 10x), and the model size whose fp32 all-reduce takes
as long at 100 Mbit/s. The machine is shared and has 2 cores for five processes: compare configurations within one
run (the synchronous row is the reference), not with another run's figures. Results go to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from monitor.state import build_run_model
from tests.chaos.netns import Network, NetworkUnavailable, check_support, network_prefix
from tests.chaos.swarm import ChaosRun
from tests.harness import TINY_PEER

PEERS = ("a", "b", "c", "d")
METRICS_PORT = 9100
# a round that left a member's parts out (hivemind's warning): peers kept their own values for them
PARTIAL = re.compile(r"Averaging: received [\d.]+% results")
# name -> run-wide flags; the synchronous mode at its default wire format (scaled fp16) is the reference
CONFIGS = {
    "sync": ["--grad_compression", "scaled-fp16"],
    "h8-fp16": ["--local_steps", "8", "--grad_compression", "fp16"],
    "h32-fp16": ["--local_steps", "32", "--grad_compression", "fp16"],
    "h32-int8": ["--local_steps", "32", "--grad_compression", "int8-block"],
    "h32-int4": ["--local_steps", "32", "--grad_compression", "int4-block"],
    "h128-int4": ["--local_steps", "128", "--grad_compression", "int4-block"],
    # the outer all-reduce overlapping the next inner phase (its update lands one round late)
    "h8-fp16-overlap": ["--local_steps", "8", "--grad_compression", "fp16", "--delay_optimizer_step"],
    "h32-int4-overlap": ["--local_steps", "32", "--grad_compression", "int4-block", "--delay_optimizer_step"],
    "h128-int4-overlap": ["--local_steps", "128", "--grad_compression", "int4-block", "--delay_optimizer_step"],
    # 4 of every 128 values, deflated; the re-sync (weights and momentum in --state-compression fp16, 70% of the
    # bytes of an h32-topk run at every 10, docs/experiments.md) every 10 outer steps as the others, or every 30
    "h32-topk-overlap": ["--local_steps", "32", "--grad_compression", "topk-int4", "--delay_optimizer_step"],
    # the same with a gentler inner LAMB (the harness's 0.05 without warm-up diverges in local steps: the outer
    # weights grew 57 -> 5,504 in 16 outer steps in a topk run, docs/experiments.md)
    "h32-topk-overlap-lr": [
        "--local_steps", "32", "--grad_compression", "topk-int4", "--delay_optimizer_step", "--learning_rate", "0.005",
    ],
    "h32-topk-overlap-s30": [
        "--local_steps", "32", "--grad_compression", "topk-int4", "--delay_optimizer_step",
        "--average_state_every", "30",
    ],
}  # fmt: skip
# The chaos suite's every-epoch state rounds, uncompressed formats and short timeouts are for judging faults within a
# minute; over these slow links a run needs the defaults back (an fp16 all-reduce of the tiny model takes ~8 s at
# 5 Mbit/s, longer than the suite's 8 s averaging timeout)
# and a member's next part is awaited --next_chunk_timeout 15 s (the default --matchmaking_time's): at the harness's
# 2 s most parts over these links arrived late, the rounds were partial ("Averaging: received 52.5% results") and
# every peer kept its own values for the rest (the runs of docs/experiments.md before this was set)
RUN_DEFAULTS = [
    "--next_chunk_timeout", "15",
    "--average_state_every", "10",
    "--state_compression", "fp16",
    "--averaging_timeout", "120",
    "--load_state_timeout", "120",
]  # fmt: skip
# the monitor downloads the state every 10 epochs (its default) over a peer's slow link, not every 2
MONITOR_DEFAULTS = ["--fetch_state_every", "10", "--checkpoint_every", "50"]
# peers back up every epoch, as the harness's do: the harness reads the epochs from the backups. At H = 32 each backup
# (39 MB of the tiny preset) is written on the training thread once per outer round; a run with --backup_every 10
# (docs/experiments.md; its epochs then read in tens) measured the same utilisation
PEER_DEFAULTS = ["--metrics_port", str(METRICS_PORT)]


@dataclass
class Reading:
    """One peer's counters at one moment."""

    time: float
    compute_seconds: float
    inner_step_seconds: float
    samples: float
    bytes: float
    state_bytes: float
    loss: float


@dataclass
class Row:
    config: str
    seconds: float
    utilisation_median: float
    utilisation_lowest: float
    forward_backward_median: float  # utilisation without the inner steps
    bytes_per_sample: float
    bytes_per_sample_with_state: float  # the outer re-syncs too (local steps)
    samples_per_second: float
    epochs: tuple[int, int]
    partial_rounds: int  # hivemind's "Averaging: received N% results" in the peers' logs during the window
    loss_end: float  # the median peer's mean training loss over its last epoch, at the window's end


def read_metrics(address: str) -> Reading:
    text = urllib.request.urlopen(f"http://{address}:{METRICS_PORT}/metrics", timeout=10).read().decode()

    def total(name: str) -> float:
        return sum(float(value) for value in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE))

    return Reading(
        time.time(),
        total("albert_peer_compute_seconds_total"),
        total("albert_peer_inner_step_seconds_total"),  # 0: not exported (the synchronous mode)
        total("albert_peer_samples_total"),
        total("albert_peer_allreduce_bytes_total"),
        total("albert_peer_state_round_bytes_total"),  # 0: not exported (the synchronous mode)
        total("albert_peer_loss"),
    )


def measure(name: str, flags: list[str], args, workdir: Path) -> Row:
    network = Network(f"{network_prefix()}w")
    (workdir / name).mkdir(parents=True)
    run = ChaosRun(
        network,
        workdir / name,
        run_flags=[*RUN_DEFAULTS, *flags],
        liveness_bound=600.0,
        peer_flags=PEER_DEFAULTS,
        monitor_flags=MONITOR_DEFAULTS,
    )
    try:
        run.start_monitor()
        for peer in PEERS:
            run.start_peer(peer)
        # unshaped until all four train in step: over the slow link a joiner's state download (~10 MB, 20-40 s at
        # 5 Mbit/s) outlasts a synchronous epoch of the first peer training alone, which it then never catches up
        run.wait_for_epoch(list(PEERS), 2, timeout=args.warmup)
        run.wait_for_epoch(list(PEERS), run.swarm_epoch(list(PEERS)) + 2, timeout=args.warmup)
        for peer in PEERS:
            run.network.nodes[peer].limit_rate(args.mbit)
        time.sleep(args.settle)  # rounds under way when the links were shaped end first
        nodes = {peer: run.network.nodes[peer].address for peer in PEERS}
        first = {peer: read_metrics(address) for peer, address in nodes.items()}
        start_epoch = run.swarm_epoch(list(PEERS))
        logged = {peer: len(run.peers[peer].log_text()) for peer in PEERS}
        time.sleep(args.window)
        last = {peer: read_metrics(address) for peer, address in nodes.items()}
        partial = sum(len(PARTIAL.findall(run.peers[peer].log_text()[logged[peer] :])) for peer in PEERS)
        return summarise(name, first, last, (start_epoch, run.swarm_epoch(list(PEERS))), partial)
    finally:
        left = run.close()
        if left:
            print(f"{name}: left behind {left}")


def summarise(
    name: str, first: dict[str, Reading], last: dict[str, Reading], epochs: tuple[int, int], partial: int
) -> Row:
    seconds = statistics.median(last[peer].time - first[peer].time for peer in first)

    def share(peer: str, *fields: str) -> float:
        busy = sum(getattr(last[peer], field) - getattr(first[peer], field) for field in fields)
        return busy / (last[peer].time - first[peer].time)

    utilisation = [share(peer, "compute_seconds", "inner_step_seconds") for peer in first]
    samples = sum(last[peer].samples - first[peer].samples for peer in first)
    traffic = sum(last[peer].bytes - first[peer].bytes for peer in first)
    state = sum(last[peer].state_bytes - first[peer].state_bytes for peer in first)
    return Row(
        name,
        seconds,
        statistics.median(utilisation),
        min(utilisation),
        statistics.median(share(peer, "compute_seconds") for peer in first),
        traffic / samples if samples else float("nan"),
        (traffic + state) / samples if samples else float("nan"),
        samples / seconds,
        epochs,
        partial,
        statistics.median(last[peer].loss for peer in last),
    )


def link_regime(mbit: float, rows: list[Row]) -> str:
    """How the link compares with the model (the fp32 all-reduce of a butterfly moves ~2x the model per peer)."""
    parameters = sum(p.numel() for p in build_run_model("tiny", None).model.parameters())
    allreduce_seconds = 2 * 4 * parameters * 8 / (mbit * 1e6)
    sync = next((row for row in rows if row.config == "sync"), None)
    step = None
    if sync is not None and sync.samples_per_second:
        # a local step: one batch of the peer, at the compute rate the synchronous peers reached while computing
        per_peer_rate = sync.samples_per_second / len(PEERS) / max(sync.utilisation_median, 1e-9)
        step = TINY_PEER["batch_size"] / per_peer_rate
    equivalent = parameters * 100 / mbit
    text = (
        f"link {mbit:g} Mbit/s: one fp32 all-reduce of the tiny model ({parameters / 1e6:.2f} M parameters) moves "
        f"~{2 * 4 * parameters / 1e6:.1f} MB per peer, {allreduce_seconds:.1f} s"
    )
    if step:
        text += f" = {allreduce_seconds / step:.0f}x one local step ({step:.2f} s)"
    return text + f"; as long as a {equivalent / 1e6:.0f} M-parameter model's at 100 Mbit/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mbit", type=float, default=5.0, help="each peer's upload and download rate")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds between shaping and measuring")
    parser.add_argument("--window", type=float, default=180.0, help="seconds measured per configuration")
    parser.add_argument("--warmup", type=float, default=600.0, help="most seconds to reach epoch 2")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--out", default="tests/benchmarks/results/wan.json")
    args = parser.parse_args()
    try:
        check_support(network_prefix())
    except NetworkUnavailable as error:
        raise SystemExit(f"bench_wan needs the chaos harness's network: {error}") from error
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-wan-") as workdir:
        for name in args.configs.split(","):
            print(f"--- {name}: {' '.join(CONFIGS[name])}", flush=True)
            rows.append(measure(name, CONFIGS[name], args, Path(workdir)))
            print_rows(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": [asdict(row) for row in rows]}, indent=1))
    print(link_regime(args.mbit, rows))
    sync = next((row for row in rows if row.config == "sync"), None)
    if sync is not None:
        for row in rows:
            if row.bytes_per_sample > 0:  # NaN or 0 when no round (or no sample) fell in the window
                print(
                    f"{row.config}: {sync.bytes_per_sample / row.bytes_per_sample:.0f}x fewer bytes per sample, "
                    f"{sync.bytes_per_sample / row.bytes_per_sample_with_state:.0f}x with the re-syncs"
                )


def print_rows(rows: list[Row]) -> None:
    print(
        f"{'config':20} {'seconds':>7} {'util med':>8} {'util min':>8} {'fb med':>6} {'bytes/sample':>12} "
        f"{'+state':>8} {'samples/s':>9} {'partial':>7} "
        f"{'loss':>6}  epochs"
    )
    for row in rows:
        print(
            f"{row.config:20} {row.seconds:7.0f} {row.utilisation_median:8.2f} {row.utilisation_lowest:8.2f} "
            f"{row.forward_backward_median:6.2f} {row.bytes_per_sample:12.0f} {row.bytes_per_sample_with_state:8.0f} "
            f"{row.samples_per_second:9.2f} "
            f"{row.partial_rounds:7d} {row.loss_end:6.2f}  {row.epochs}",
            flush=True,
        )


if __name__ == "__main__":
    main()
