"""Byzantine members against `mean` and `centered-clip` aggregation. Run by hand, never by CI.

For every attack mode and both aggregations, one swarm on loopback: a monitor (open run), N - M honest peers and M
attackers (tests/peer/byzantine.py) that train honestly until epoch E, then attack. A clean run per aggregation has
the same processes with the attackers never attacking (same samples, seeds, data shards and peer count). Measured:

- the held-out loss at the end (the last epoch every honest peer backed up, scored on the same held-out token set
  as bench_parity, monitor.evaluation), against the clean run of the same aggregation;
- the time aggregation takes: CenteredClip's milliseconds per round and reducer (the honest peers' "Robust
  aggregation" log lines) against the median epoch time from their per-epoch log lines (mean: hivemind sums parts as
  they arrive, not logged); and the median epoch time of each run (the clean mean run is the reference);
- when the attackers first rank above every honest peer in the published scores (the monitor's /api/suspects, the
  median of the reporters' scores, polled every second), in epochs after E.

Writes DIR/bench_byzantine.json and, with matplotlib, DIR/<attack>.png (held-out loss per scored epoch); else prints
the table only and says so.

    nice -n 10 python tests/benchmarks/bench_byzantine.py --peers 4 --attackers 1 --attack-from 4 --epochs 20 \\
        --modes sign-flip,alie,ipm,label-flip,label-shift,label-invert --out-dir /tmp/bench-byzantine
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from data import BUNDLED_CORPUS, load_tokenizer, model_overrides_from_tokenizer
from model import LeanAlbertForMaskedLM, load_config
from monitor.evaluation import HeldOutSet
from tests.harness import child_env, kill_group

EPOCH_LINE = re.compile(r"^(\S+ \S+) INFO \S+: epoch (\d+) \| loss ([0-9.]+) \|", re.MULTILINE)
ROBUST_LINE = re.compile(r"Robust aggregation: \d+ parts of (\d+) round\(s\) in ([0-9.]+) ms")
TOP_SCORE = re.compile(r"Robust aggregation: .* highest sender score ([0-9.e+]+) \((\w+)\)")
GROUP_LINE = re.compile(r"Averaged gradients with (\d+) peers")
JOINED = re.compile(r"Joined run '[^']+' as (\w+)")
PEER_ID = re.compile(r"^PEER_ID (\w+)$", re.MULTILINE)
NEVER = 10**9  # an attacker's --from_epoch in the clean runs


@dataclass
class Result:
    attack: str  # "clean" or a mode of tests/peer/byzantine.py
    aggregation: str
    points: list[tuple[int, float]] = field(default_factory=list)  # (epoch, held-out loss) of honest peer 0
    final_loss: float = float("nan")
    final_epoch: int = 0
    epoch_seconds: float = float("nan")  # median over the honest peers' consecutive epoch lines
    clip_ms_per_round: float | None = None  # CenteredClip per round and reducer (median over logged epochs)
    attackers_first_at: int | None = None  # first epoch at which every attacker ranked above every honest peer
    attacker_on_top: float | None = None  # share of the honest reducers' epochs whose highest score was an attacker's
    top_score: float | None = None  # median of the highest sender score the honest reducers logged after E
    skipped_steps: int = 0  # honest optimizer steps the update guard refused
    full_groups: float | None = None  # share of the honest peers' averaged rounds in a group of all N
    own_gradient_steps: int = 0  # honest rounds that found no group and stepped on the peer's own gradients
    wall_seconds: float = 0.0
    note: str = ""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=BUNDLED_CORPUS, help="default: the corpus shipped with the project")
    parser.add_argument("--peers", type=int, default=4, help="Members of each run, attackers included (N).")
    parser.add_argument("--attackers", type=int, default=1, help="Attacking members (M).")
    parser.add_argument("--attack-from", type=int, default=4, help="Epoch the attack starts at (E).")
    parser.add_argument("--epochs", type=int, default=20, help="Epochs per run (--max_epochs).")
    parser.add_argument("--modes", default="sign-flip,alie,ipm,label-flip,label-shift,label-invert")
    parser.add_argument("--aggregations", default="mean,centered-clip")
    parser.add_argument("--scale", type=float, default=1000.0, help="sign-flip/constant/gaussian's --scale")
    parser.add_argument("--z", type=float, default=None, help="alie's z (default: the paper's formula for N, M)")
    parser.add_argument("--epsilon", type=float, default=0.1, help="ipm's epsilon")
    parser.add_argument("--target-batch-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=0.005)
    parser.add_argument(
        "--matchmaking-time",
        type=float,
        default=2.0,
        help="Seconds to gather a group: short ones split the swarm into small groups on a loaded machine.",
    )
    parser.add_argument(
        "--robust-quorum",
        type=float,
        default=0.0,
        help="centered-clip runs: --robust-quorum (the smallest group, as a share of the peers; 0: hivemind's 2).",
    )
    parser.add_argument(
        "--resume-from",
        type=Path,
        default=None,
        help="A monitor checkpoint every run starts from (its epoch counts: --attack-from and --epochs are absolute), "
        "to attack a model that is past learning token frequencies.",
    )
    parser.add_argument("--eval-every", type=int, default=4, help="Epochs between the backups that are scored.")
    parser.add_argument("--eval-sequences", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-byzantine-work"))
    parser.add_argument("--out-dir", type=Path, default=Path("bench-byzantine"))
    parser.add_argument("--timeout", type=float, default=900, help="Seconds a run may take.")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="Only print the table and plot the runs of a saved JSON."
    )
    return parser.parse_args()


def optim_flags(args, aggregation: str) -> list[str]:
    """The run's optimizer settings: every peer and the monitor pass the same (the aggregation is run-wide)."""
    return [
        *("--target_batch_size", str(args.target_batch_size), "--learning_rate", str(args.learning_rate)),
        *("--warmup_epochs", "0", "--total_epochs", "1000", "--matchmaking_time", str(args.matchmaking_time)),
        *("--averaging_timeout", "15", "--load_state_timeout", "15", "--aggregation", aggregation),
        *(("--robust_quorum", str(args.robust_quorum)) if args.robust_quorum and aggregation != "mean" else ()),
    ]


def spawn(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            ["nice", "-n", "10", sys.executable, *command],
            cwd=REPO,
            env=child_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: the kill reaches p2pd and hivemind's children too
        )


def get_json(port: int, path: str):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


def peer_command(args, name: str, initial: list[str], aggregation: str) -> list[str]:
    return [
        *("--run_id", name, "--initial_peers", *initial, "--host_maddrs", "/ip4/127.0.0.1/tcp/0"),
        *("--torch_threads", "1", "--model", "tiny", "--corpus", args.corpus, "--batch_size", str(args.batch_size)),
        *("--max_length", str(args.max_length), "--max_epochs", str(args.epochs), "--record_expiration", "10"),
        *("--backup_every", str(args.eval_every), "--keep_backups", "100000"),
        *optim_flags(args, aggregation),
    ]


def attacker_flags(args, attack: str) -> list[str]:
    mode = "sign-flip" if attack == "clean" else attack  # clean: the same process, never attacking
    flags = ["--attack", mode, "--from_epoch", str(NEVER if attack == "clean" else args.attack_from)]
    flags += ["--scale", str(args.scale), "--peers", str(args.peers), "--attackers", str(args.attackers)]
    flags += ["--epsilon", str(args.epsilon)] + (["--z", str(args.z)] if args.z is not None else [])
    return flags


class Ranking:
    """Polls /api/suspects; remembers the first swarm epoch at which every attacker outranked every honest peer."""

    def __init__(self, port: int):
        self.port, self.first_at = port, None

    def poll(self, attackers: set[str], honest: set[str]) -> None:
        if self.first_at is not None or not attackers:
            return
        rows = get_json(self.port, "/api/suspects") or []
        status = get_json(self.port, "/api/status") or {}
        score = {row["peer_id"]: row["suspicion"] for row in rows}
        if not attackers <= score.keys():
            return
        if min(score[peer] for peer in attackers) > max((score.get(peer, 0.0) for peer in honest), default=0.0):
            self.first_at = int(status.get("epoch") or 0)


def run_swarm(args, attack: str, aggregation: str) -> tuple[Result, Path]:
    name = f"{attack}-{aggregation}"
    workdir = args.workdir / name
    workdir.mkdir(parents=True, exist_ok=True)
    result, started, port = Result(attack, aggregation), time.time(), 18000 + random.randint(0, 999)
    monitor = spawn(
        [
            *("-m", "monitor", "--run_id", name, "--run_dir", str(workdir / "monitor")),
            *("--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--http_host", "127.0.0.1", "--http_port", str(port)),
            *("--refresh_period", "1", "--model", "tiny", "--checkpoint_every", "0"),
            *(("--resume_from", str(args.resume_from.resolve())) if args.resume_from else ()),
            *optim_flags(args, aggregation),
        ],
        workdir / "monitor.log",
    )
    processes = [monitor]
    try:
        peers_file = workdir / "monitor" / "initial_peers.txt"
        deadline = time.monotonic() + 180
        while not peers_file.is_file():
            if monitor.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the monitor did not start: {workdir / 'monitor.log'}")
            time.sleep(0.5)
        initial = peers_file.read_text().split()
        honest = args.peers - args.attackers
        for index in range(args.peers):
            command = peer_command(args, name, initial, aggregation)
            command += ["--backup_dir", str(workdir / "backups" / f"peer-{index}")]
            module = (
                ["-m", "peer"] if index < honest else ["-m", "tests.peer.byzantine", *attacker_flags(args, attack)]
            )
            processes.append(spawn([*module, *command], workdir / f"peer-{index}.log"))
        ranking, deadline = Ranking(port), time.monotonic() + args.timeout
        while any(process.poll() is None for process in processes[1 : honest + 1]) and time.monotonic() < deadline:
            time.sleep(1)
            if attack != "clean":
                ranking.poll(*peer_ids(workdir, honest, args.peers))
        if time.monotonic() >= deadline:
            result.note += "TIMED OUT; "
        result.attackers_first_at = ranking.first_at
    finally:
        for process in reversed(processes):
            kill_group(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            kill_group(process.pid)
    result.wall_seconds = time.time() - started
    read_logs(result, workdir, args.peers - args.attackers, args.peers)
    read_top_scores(result, workdir, args.peers - args.attackers, args.peers)
    return result, workdir / "backups"


def peer_ids(workdir: Path, honest: int, peers: int) -> tuple[set[str], set[str]]:
    """(attackers, honest peers) by libp2p id, from the lines each process logs once it joined."""
    logs = [(workdir / f"peer-{index}.log").read_text(errors="replace") for index in range(peers)]
    attackers = {found for log in logs[honest:] for found in PEER_ID.findall(log)}
    return attackers, {found for log in logs[:honest] for found in JOINED.findall(log)}


def read_logs(result: Result, workdir: Path, honest: int, peers: int) -> None:
    """Epoch times, CenteredClip's time per round, the update guard's refusals, group sizes and rounds without a
    group, from the honest peers' logs."""
    gaps, clip, groups = [], [], []
    for index in range(honest):
        log = (workdir / f"peer-{index}.log").read_text(errors="replace")
        times = [
            datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() for stamp, _, _ in EPOCH_LINE.findall(log)
        ]
        gaps += [later - earlier for earlier, later in itertools.pairwise(times)]
        clip += [float(ms) / int(rounds) for rounds, ms in ROBUST_LINE.findall(log)]
        result.skipped_steps += log.count("Skipping the optimizer step")
        result.own_gradient_steps += log.count("Proceeding with local gradients")
        groups += [int(size) for size in GROUP_LINE.findall(log)]
    result.full_groups = sum(size == peers for size in groups) / len(groups) if groups else None
    result.epoch_seconds = statistics.median(gaps) if gaps else float("nan")
    result.clip_ms_per_round = statistics.median(clip) if clip else None


def read_top_scores(result: Result, workdir: Path, honest: int, peers: int) -> None:
    """Whom the honest reducers scored highest each epoch (their logs name the top sender), from the last half of
    the run (past the attack's start)."""
    attackers, _ = peer_ids(workdir, honest, peers)
    tops = []
    for index in range(honest):
        found = TOP_SCORE.findall((workdir / f"peer-{index}.log").read_text(errors="replace"))
        tops += found[len(found) // 2 :]
    if tops:
        result.attacker_on_top = sum(peer in attackers for _, peer in tops) / len(tops)
        result.top_score = statistics.median(float(score) for score, _ in tops)


def score(args, result: Result, backups: Path, tokenizer, held_out: HeldOutSet, honest: int) -> None:
    """Score honest peer 0's backups; the final loss is the mean over the honest peers at their last common epoch."""
    config = load_config("tiny", **model_overrides_from_tokenizer(tokenizer))
    model = LeanAlbertForMaskedLM(config)

    def loss_of(path: Path) -> float:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])
        return held_out.score(model).loss

    epochs = [
        {int(path.stem.split("-")[1]): path for path in (backups / f"peer-{i}").glob("epoch-*.pt")}
        for i in range(honest)
    ]
    result.points = [(epoch, loss_of(path)) for epoch, path in sorted(epochs[0].items()) if epoch > 0]
    common = set.intersection(*(set(found) for found in epochs)) - {0}
    if not common:
        result.note += "no common backup; "
        return
    result.final_epoch = max(common)
    result.final_loss = statistics.mean(loss_of(found[result.final_epoch]) for found in epochs)


def report(results: list[Result], args) -> None:
    clean = {r.aggregation: r for r in results if r.attack == "clean"}
    reference = clean.get("mean")
    print(f"\nN={args.peers} M={args.attackers} attack from epoch {args.attack_from}, {args.epochs} epochs")
    head = f"{'attack':<11} {'aggr':<13} {'epoch':>5} {'loss':>7} {'vs clean':>8} {'s/epoch':>7} {'vs mean':>7}"
    print(
        head + f" {'clip ms':>7} {'ranked':>6} {'top':>5} {'topscore':>8} {'skip':>4} {'full':>5} {'local':>5}  note"
    )
    for r in results:
        base = clean.get(r.aggregation)
        gap = f"{100 * (r.final_loss / base.final_loss - 1):+.2f}%" if base and base.final_loss else "-"
        slower = f"{100 * (r.epoch_seconds / reference.epoch_seconds - 1):+.0f}%" if reference else "-"
        clip = f"{r.clip_ms_per_round:.0f}" if r.clip_ms_per_round is not None else "-"
        ranked = "-" if r.attackers_first_at is None else f"+{r.attackers_first_at - args.attack_from}"
        top = "-" if r.attacker_on_top is None else f"{r.attacker_on_top:.0%}"
        topscore = "-" if r.top_score is None else f"{r.top_score:.3g}"
        full = "-" if r.full_groups is None else f"{r.full_groups:.0%}"
        print(
            f"{r.attack:<11} {r.aggregation:<13} {r.final_epoch:>5} {r.final_loss:>7.4f} {gap:>8} "
            f"{r.epoch_seconds:>7.2f} {slower:>7} {clip:>7} {ranked:>6} {top:>5} {topscore:>8} {r.skipped_steps:>4} "
            f"{full:>5} {r.own_gradient_steps:>5}  {r.note}"
        )


def plot(results: list[Result], args) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[bench]'); the table and JSON are the result")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for attack in sorted({r.attack for r in results} - {"clean"}):
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for r in results:
            if r.attack in (attack, "clean") and r.points:
                axis.plot(*zip(*r.points), marker="o", label=f"{r.attack} / {r.aggregation}")
        axis.axvline(args.attack_from, color="grey", linestyle="--", label="attack starts")
        axis.set_xlabel("epoch")
        axis.set_ylabel("held-out masked-LM loss (honest peer 0)")
        axis.set_title(f"{attack}: {args.attackers} of {args.peers} members attack")
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(args.out_dir / f"{attack}.png", dpi=120)
        plt.close(figure)
        print(f"plot: {(args.out_dir / f'{attack}.png').resolve()}")


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the swarm's processes
    torch.set_num_threads(1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.from_json:  # e.g. a bench stopped early: its JSON holds every run it finished
        saved = json.loads(args.from_json.read_text())
        for name in ("peers", "attackers", "attack_from", "epochs"):
            setattr(args, name, int(saved["args"][name]))
        results = [Result(**{**row, "points": [tuple(point) for point in row["points"]]}) for row in saved["results"]]
        for result in results:  # runs saved before these columns existed: read them from the logs if still there
            workdir = args.workdir / f"{result.attack}-{result.aggregation}"
            if result.attacker_on_top is None and result.aggregation == "centered-clip" and workdir.is_dir():
                read_top_scores(result, workdir, args.peers - args.attackers, args.peers)
        report(results, args)
        plot(results, args)
        return
    tokenizer = load_tokenizer()
    held_out = HeldOutSet(args.corpus, tokenizer, args.eval_sequences, seed=0, max_length=args.max_length)
    results = []
    for attack in ["clean", *args.modes.split(",")]:
        for aggregation in args.aggregations.split(","):
            print(f"run {attack} / {aggregation} ...", flush=True)
            result, backups = run_swarm(args, attack, aggregation)
            score(args, result, backups, tokenizer, held_out, args.peers - args.attackers)
            print(f"  {asdict(result)}", flush=True)
            results.append(result)
            out = {"args": {k: str(v) for k, v in vars(args).items()}, "results": [asdict(r) for r in results]}
            (args.out_dir / "bench_byzantine.json").write_text(json.dumps(out, indent=1))  # after every run
    report(results, args)
    plot(results, args)


if __name__ == "__main__":
    main()
