"""Parity: does a swarm learn as well as one process on the same samples? Run by hand, never by CI.

Runs (same preset, tokenizer, corpus, effective batch, LAMB + linear schedule, total samples):
  reference  one process, a plain loop with peer.swarm.optimizer's optimizer and scheduler, no hivemind
  swarm-2    2 peers on loopback (a monitor bootstraps them)
  swarm-4    4 peers
  churn-4    4 peers, one SIGKILLed and a fresh one started every --churn-every epochs
  local-4    4 peers in local-steps (DiLoCo) mode: --local-steps H inner steps per outer step, with --local-args
  overlap-4  the same, the outer all-reduce overlapping the next inner phase (--delay_optimizer_step)
  localchurn-4  local-4 with churn-4's kills and joins (every --churn-every outer steps)
Every run is scored every --eval-every epochs on the same held-out token set (monitor.evaluation); swarm runs are
scored from the peers' backups (every live peer holds the same averaged weights; in local-steps mode, the outer
weights). A local-steps epoch is one outer step of H x --target-batch-size samples: its schedule (warm-up, total)
counts outer steps, so it gets --warmup-epochs / H of them. Prints a table, saves a PNG.

    nice -n 10 python tests/benchmarks/bench_parity.py --samples 16384 --max-length 64 --learning-rate 0.01 \
        --warmup-epochs 16 --eval-every 16 --churn-every 16 --save-models models --out parity.png
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
MINE = re.compile(r"\| mine (\d+) samples")  # a peer's per-epoch log line: the samples it computed that epoch
sys.path.insert(0, str(REPO))

from data import MLMDataset, WholeWordMaskCollator, load_tokenizer, model_overrides_from_tokenizer
from model import LeanAlbertForMaskedLM, load_config
from monitor.evaluation import HeldOutSet
from peer.swarm.config import OptimConfig
from peer.swarm.optimizer import make_optimizer, make_scheduler, param_groups
from peer.swarm.outer_state import trainable
from tests.harness import child_env
from tests.harness import kill_group as kill_process_group


@dataclass
class Run:
    name: str
    points: list[tuple[int, float, float]] = field(default_factory=list)  # (samples, loss, accuracy)
    used: int = 0  # samples whose gradients went into a step (a swarm overshoots its target while matchmaking)
    seconds: float = 0.0
    note: str = ""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=str(REPO.parent / "shared/corpora/ruslit"))
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--samples", type=int, default=8192, help="Training samples per run (the budget).")
    parser.add_argument("--target-batch-size", type=int, default=64, help="Effective batch = swarm epoch size.")
    parser.add_argument("--batch-size", type=int, default=8, help="Per forward/backward pass.")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=0.005)
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=4, help="Epochs between evaluations.")
    parser.add_argument("--eval-sequences", type=int, default=128)
    parser.add_argument(
        "--matchmaking-time",
        type=float,
        default=2.0,
        help="Swarm peers' --matchmaking_time: seconds to gather an averaging group (longer on a loaded machine).",
    )
    parser.add_argument(
        "--peer-args",
        default="",
        help='Extra flags for every swarm peer, one string (e.g. "--average_state_every 4"): ablations.',
    )
    parser.add_argument("--churn-every", type=int, default=4, help="Epochs between churn events.")
    parser.add_argument("--local-steps", type=int, default=4, help="H of the local-N and overlap-N runs.")
    parser.add_argument(
        "--local-args",
        default="--grad_compression fp16",
        help='Extra flags for the local-steps runs\' peers and monitor (e.g. "--inner_optimizer adamw").',
    )
    parser.add_argument("--runs", default="reference,swarm-2,swarm-4,churn-4")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-parity"))
    parser.add_argument("--out", type=Path, default=Path("parity.png"))
    parser.add_argument(
        "--save-models", type=Path, default=None, help="Save each run's final model in DIR/<run> (save_pretrained)."
    )
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds a swarm run may take.")
    return parser.parse_args()


def optim_config(args, epochs: int, local_steps: int = 0) -> OptimConfig:
    """The run's optimizer settings; with local steps, epochs are outer steps, and so is the warm-up (at least 1)."""
    return OptimConfig(
        target_batch_size=args.target_batch_size,
        learning_rate=args.learning_rate,
        warmup_epochs=max(1, args.warmup_epochs // local_steps) if local_steps else args.warmup_epochs,
        total_epochs=epochs,
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=30.0,
        load_state_timeout=30.0,
    )


def fresh_model(args, tokenizer) -> LeanAlbertForMaskedLM:
    """The peers' initial weights: peer.runtime.build_model seeds with --seed 0 before building."""
    torch.manual_seed(0)
    return LeanAlbertForMaskedLM(load_config(args.model, **model_overrides_from_tokenizer(tokenizer)))


def run_reference(args, tokenizer, held_out: HeldOutSet, epochs: int) -> Run:
    """A plain loop: `target_batch_size` samples of accumulated gradients per LAMB step, scheduler per step."""
    run, started = Run("reference"), time.time()
    model, optim = fresh_model(args, tokenizer), optim_config(args, epochs)
    optimizer = make_optimizer(param_groups(model, optim.weight_decay), optim)
    scheduler = make_scheduler(optimizer, optim)
    dataset = MLMDataset(args.corpus, tokenizer, max_length=args.max_length, peer_id="reference", split="train")
    batches = iter(torch.utils.data.DataLoader(dataset, args.batch_size, collate_fn=WholeWordMaskCollator(tokenizer)))
    steps_per_epoch = args.target_batch_size // args.batch_size
    run.points.append((0, *astuple(held_out.score(model))))
    for epoch in range(1, epochs + 1):
        model.train()
        for _ in range(steps_per_epoch):
            (model(**next(batches)).loss / steps_per_epoch).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        run.used += args.target_batch_size
        if epoch % args.eval_every == 0 or epoch == epochs:
            run.points.append((epoch * args.target_batch_size, *astuple(held_out.score(model))))
            print(f"  reference epoch {epoch}: held-out loss {run.points[-1][1]:.4f}", flush=True)
            save_model(args, run, model, tokenizer)  # at every evaluation: a long run stopped early still leaves one
    run.seconds = time.time() - started
    return run


def save_model(args, run: Run, model, tokenizer) -> None:
    """Keep a run's final weights loadable by transformers, e.g. for bench_downstream.py --checkpoint."""
    if args.save_models:
        model.save_pretrained(args.save_models / run.name)
        tokenizer.save_pretrained(args.save_models / run.name)


def astuple(result) -> tuple[float, float]:
    return result.loss, result.accuracy


def optim_flags(args, epochs: int, local_steps: int = 0) -> list[str]:
    """The run-wide flags; with local steps, epochs are outer steps (and so are the schedule's warm-up and total)."""
    optim = optim_config(args, epochs, local_steps)
    return [
        *("--target_batch_size", str(optim.target_batch_size), "--learning_rate", str(optim.learning_rate)),
        *("--warmup_epochs", str(optim.warmup_epochs), "--total_epochs", str(optim.total_epochs)),
        *("--matchmaking_time", str(optim.matchmaking_time), "--averaging_timeout", str(optim.averaging_timeout)),
        *("--load_state_timeout", str(optim.load_state_timeout)),
    ]


def spawn(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "a") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            ["nice", "-n", "10", sys.executable, *command],
            cwd=REPO,
            env=child_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: the kill reaches p2pd and hivemind's children too
        )


def kill_group(process: subprocess.Popen, signum: int = signal.SIGKILL) -> None:
    kill_process_group(process.pid, signum)


def swarm_epoch(http_port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/status", timeout=5) as response:
            return int(json.load(response).get("epoch") or 0)
    except (OSError, ValueError):
        return 0


def local_flags(args, kind: str) -> list[str]:
    """The flags of a local-steps run (kind local, overlap or localchurn), for its peers and its monitor alike; []
    otherwise."""
    if kind not in ("local", "overlap", "localchurn"):
        return []
    overlap = ["--delay_optimizer_step"] if kind == "overlap" else []
    return ["--local_steps", str(args.local_steps), *shlex.split(args.local_args), *overlap]


def run_swarm(args, name: str, peers: int, churn: bool, epochs: int, local: list[str]) -> tuple[Run, Path]:
    """Monitor + `peers` trainers until --max-epochs (outer steps with ``local``, the local-steps flags); returns the
    run and the directory holding the backups."""
    steps = args.local_steps if local else 0
    backup_every = max(1, args.eval_every // steps) if steps else args.eval_every
    workdir = args.workdir / name
    # a run left there (its backups, its monitor's state) would be resumed: the peers would start at its last epoch
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    http_port, run = 18000 + random.randint(0, 999), Run(name)
    monitor = spawn(
        [
            *("-m", "monitor", "--run_id", name, "--run_dir", str(workdir / "monitor")),
            *("--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--http_host", "127.0.0.1", "--http_port", str(http_port)),
            *("--refresh_period", "2", "--model", args.model, "--checkpoint_every", "0"),
            *optim_flags(args, epochs, steps),
            *local,
        ],
        workdir / "monitor.log",
    )
    processes, started = [monitor], time.time()
    try:
        peers_file = workdir / "monitor" / "initial_peers.txt"
        wait_for(lambda: peers_file.is_file(), 180, "the monitor's initial_peers.txt", monitor)
        initial = peers_file.read_text().split()

        def start_peer(index: int) -> subprocess.Popen:
            process = spawn(
                [
                    *("-m", "peer", "--run_id", name, "--initial_peers", *initial),
                    *("--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--torch_threads", "1", "--model", args.model),
                    *("--corpus", args.corpus, "--batch_size", str(args.batch_size)),
                    *("--max_length", str(args.max_length), "--max_epochs", str(epochs)),
                    *("--backup_dir", str(workdir / "backups" / f"peer-{index}"), "--keep_backups", "100000"),
                    *("--backup_every", str(backup_every), "--record_expiration", "15"),
                    *optim_flags(args, epochs, steps),
                    *shlex.split(args.peer_args),
                    *local,
                ],
                workdir / f"peer-{index}.log",
            )
            processes.append(process)
            return process

        trainers = [start_peer(index) for index in range(peers)]
        next_index, next_churn = peers, args.churn_every
        deadline = time.monotonic() + args.timeout
        while any(p.poll() is None for p in trainers) and time.monotonic() < deadline:
            time.sleep(2)
            if churn and swarm_epoch(http_port) >= next_churn and next_churn < epochs - 1:
                victim = random.choice([p for p in trainers if p.poll() is None])
                kill_group(victim)  # a machine dying: no backup, no goodbye
                victim.wait()
                trainers.remove(victim)
                trainers.append(start_peer(next_index))
                run.note += f"e{next_churn}: killed one, started peer-{next_index}; "
                next_index, next_churn = next_index + 1, next_churn + args.churn_every
        if time.monotonic() >= deadline:
            run.note += f"TIMED OUT at swarm epoch {swarm_epoch(http_port)}; "
    finally:
        for process in reversed(processes):
            kill_group(process, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            kill_group(process)
    run.seconds = time.time() - started
    run.used = sum(int(n) for log in workdir.glob("peer-*.log") for n in MINE.findall(log.read_text(errors="replace")))
    return run, workdir / "backups"


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}")
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def score_backups(
    args, run: Run, backups: Path, tokenizer, held_out: HeldOutSet, epochs: int, samples_per_epoch: int
) -> None:
    """Score, per evaluation epoch, one peer's backup of it (all peers hold the same averaged weights; in local-steps
    mode its outer weights, not the local weights of the moment it was written)."""
    by_epoch: dict[int, Path] = {}
    for path in sorted(backups.glob("peer-*/epoch-*.pt")):
        by_epoch.setdefault(int(path.stem.split("-")[1]), path)
    model = fresh_model(args, tokenizer)
    run.points.append((0, *astuple(held_out.score(model))))
    for epoch in sorted(e for e in by_epoch if 0 < e <= epochs):
        state = torch.load(by_epoch[epoch], map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        if "local_steps" in state:
            with torch.no_grad():
                for parameter, outer in zip(trainable(model), state["local_steps"]["outer"], strict=True):
                    parameter.copy_(outer)
        run.points.append((epoch * samples_per_epoch, *astuple(held_out.score(model))))
        print(f"  {run.name} epoch {epoch}: held-out loss {run.points[-1][1]:.4f}", flush=True)
    if len(run.points) == 1:
        run.note += "FAILED: no backup past epoch 0, see the peers' logs; "
    else:
        save_model(args, run, model, tokenizer)  # the last scored epoch's weights


def plot(runs: list[Run], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        axis.plot([p[0] for p in run.points], [p[1] for p in run.points], marker="o", label=run.name)
    axis.set_xlabel("samples seen (optimizer steps x target batch size)")
    axis.set_ylabel("held-out masked-LM loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the swarm's processes
    torch.set_num_threads(1)
    epochs = args.samples // args.target_batch_size
    tokenizer = load_tokenizer()
    held_out = HeldOutSet(args.corpus, tokenizer, args.eval_sequences, seed=0, max_length=args.max_length)
    print(f"{epochs} epochs of {args.target_batch_size} samples; held-out: {held_out.sequences} sequences", flush=True)
    runs = []
    for name in args.runs.split(","):
        print(f"run {name} ...", flush=True)
        if name == "reference":
            runs.append(run_reference(args, tokenizer, held_out, epochs))
            continue
        kind, peers = name.split("-")[0], int(name.split("-")[1])
        local = local_flags(args, kind)
        outer_epochs = epochs // args.local_steps if local else epochs  # the same samples in outer steps
        run, backups = run_swarm(args, name, peers, kind in ("churn", "localchurn"), outer_epochs, local)
        per_epoch = args.target_batch_size * (args.local_steps if local else 1)
        score_backups(args, run, backups, tokenizer, held_out, outer_epochs, per_epoch)
        runs.append(run)
    report(runs, args, epochs)


def report(runs: list[Run], args, epochs: int) -> None:
    reference = next((run for run in runs if run.name == "reference" and run.points), None)
    print(f"\n{'run':<10} {'samples':>8} {'used':>6} {'loss':>8} {'acc':>7} {'vs ref':>8} {'wall s':>7}  note")
    for run in runs:
        samples, loss, accuracy = run.points[-1] if run.points else (0, float("nan"), float("nan"))
        gap = f"{100 * (loss / reference.points[-1][1] - 1):+.2f}%" if reference else "-"
        print(
            f"{run.name:<10} {samples:>8} {run.used:>6} {loss:>8.4f} {accuracy:>7.4f} {gap:>8} {run.seconds:>7.0f}  "
            f"{run.note}"
        )
    title = f"{args.model}, {epochs} x {args.target_batch_size} samples, max_length {args.max_length}"
    try:
        plot(runs, args.out, title)
    except ImportError as error:  # the table above is the result; the plot is a convenience
        print(f"no plot ({error}): pip install -e '.[bench]'")
        return
    print(f"plot: {args.out.resolve()}")


if __name__ == "__main__":
    main()
