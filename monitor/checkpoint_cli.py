"""`albert-checkpoint`: fetch a checkpoint directory that transformers loads without this project installed.

albert-checkpoint download --from http://HOST:PORT [--epoch N] --out DIR   # from a monitor, sha256-verified
albert-checkpoint pull --initial-peers MADDR... --run-id RUN --out DIR     # straight from the swarm
albert-checkpoint eval DIR --corpus CORPUS [--max-sequences N] [--seed S]  # held-out masked-LM loss and accuracy
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from monitor.checkpoint import MANIFEST, verify_directory, write_manifest

logger = logging.getLogger("albert-checkpoint")
CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """The checkpoint could not be fetched or failed verification."""


def download(base_url: str, out: Path, epoch: int | None = None, timeout: float = 60.0) -> dict:
    """Fetch a checkpoint archive from a monitor, check its sha256 (header and listing), unpack it, verify files."""
    url = f"{base_url.rstrip('/')}/checkpoints/{'latest' if epoch is None else epoch}"
    listing = {entry["epoch"]: entry for entry in _get_json(f"{base_url.rstrip('/')}/api/checkpoints", timeout)}
    with tempfile.TemporaryDirectory(prefix=".albert-checkpoint-", dir=_parent(out)) as tmp:
        archive = Path(tmp) / "checkpoint.tar"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as file:
                expected = response.headers.get("X-Checkpoint-SHA256")
                got_epoch = int(response.headers.get("X-Checkpoint-Epoch", -1))
                digest = hashlib.sha256()
                while chunk := response.read(CHUNK):
                    digest.update(chunk)
                    file.write(chunk)
        except urllib.error.HTTPError as error:
            raise CheckpointError(f"{url}: HTTP {error.code} {error.read().decode(errors='replace')}") from error
        except (urllib.error.URLError, OSError) as error:
            raise CheckpointError(f"cannot download {url}: {error}") from error
        actual = digest.hexdigest()
        listed = listing.get(got_epoch, {}).get("sha256")
        if not expected or actual != expected or (listed and listed != actual):
            raise CheckpointError(f"archive sha256 {actual} does not match the monitor's {expected or listed}")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")  # the data filter refuses absolute paths, '..' and links out
        directories = [path for path in unpacked.iterdir() if path.is_dir()]
        if len(directories) != 1:
            raise CheckpointError(f"the archive should hold one checkpoint directory, found {len(directories)}")
        return _install(directories[0], out)


def _install(directory: Path, out: Path) -> dict:
    """Verify every file against the manifest, then move the directory to `out` (which must not hold files)."""
    problem = verify_directory(directory)
    if problem:
        raise CheckpointError(f"checkpoint failed verification: {problem}")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"--out {out} exists and is not empty; choose a new directory")
    if out.exists():
        out.rmdir()
    shutil.move(str(directory), str(out))
    return json.loads((out / MANIFEST).read_text())


def _get_json(url: str, timeout: float):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {url}: {error}") from error


def _parent(out: Path) -> Path:
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent  # unpack next to the destination, so the final move is a rename on the same file system


def pull(args: argparse.Namespace) -> dict:
    """Join the swarm as a client, download the averaged state with the peers' layout, write a checkpoint dir."""
    import hivemind  # noqa: F401  (heavy imports only for this subcommand)

    from monitor.records import monitor_validators
    from monitor.state import StateKeeper, build_run_model
    from peer.config import OptimConfig, SwarmConfig
    from peer.run_record import check_model_matches
    from peer.swarm import build_dht

    swarm = SwarmConfig(
        run_id=args.run_id, initial_peers=args.initial_peers, host_maddrs=args.host_maddrs, client_mode=True
    )
    optim = OptimConfig(optimizer=args.optimizer)
    run_model = build_run_model(args.model, args.tokenizer)
    dht = build_dht(swarm, monitor_validators(args.run_id))  # also strips the signatures of the records it reads
    keeper = None
    try:
        mismatch = check_model_matches(dht, args.run_id, run_model.fingerprint)
        if mismatch:
            raise CheckpointError(mismatch)
        keeper = StateKeeper(dht, swarm, optim, run_model, client_mode=True)
        if not keeper.fetch(timeout=args.timeout):
            raise CheckpointError(f"no peer of run {args.run_id!r} shared a training state (is the run training?)")
        with tempfile.TemporaryDirectory(prefix=".albert-checkpoint-", dir=_parent(args.out)) as tmp:
            directory = Path(tmp) / "checkpoint"
            directory.mkdir()
            keeper.write(directory)
            write_manifest(
                directory,
                epoch=keeper.epoch,
                run_id=args.run_id,
                source="swarm",
                model_fingerprint=run_model.fingerprint,
            )
            return _install(directory, args.out)
    finally:
        if keeper is not None:
            keeper.shutdown()
        dht.shutdown()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="albert-checkpoint", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="Download a verified checkpoint from a monitor.")
    get.add_argument("--from", dest="url", required=True, help="The monitor's base URL, e.g. http://host:8080")
    get.add_argument("--epoch", type=int, default=None, help="Epoch of the checkpoint (default: the newest).")
    get.add_argument("--out", type=Path, required=True, help="New directory to write the checkpoint to.")
    get.add_argument("--timeout", type=float, default=60.0, help="Network timeout in seconds.")
    swarm = commands.add_parser("pull", help="Download the current state straight from the swarm (no monitor).")
    swarm.add_argument("--initial-peers", nargs="+", required=True, help="Multiaddrs of any peers of the run.")
    swarm.add_argument("--run-id", required=True, help="The run's id.")
    swarm.add_argument("--out", type=Path, required=True, help="New directory to write the checkpoint to.")
    swarm.add_argument("--model", default="tiny", help="The run's model preset or config.json path.")
    swarm.add_argument("--tokenizer", default=None, help="The run's tokenizer directory (default: bundled).")
    swarm.add_argument(
        "--optimizer",
        default="lamb",
        choices=["lamb", "lamb-8bit"],
        help="The run's optimizer (its state layout must match the peers').",
    )
    swarm.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"], help="Multiaddrs to listen on.")
    swarm.add_argument("--timeout", type=float, default=120.0, help="Seconds the state download may take.")
    score = commands.add_parser("eval", help="Held-out masked-LM loss and accuracy of a checkpoint directory.")
    score.add_argument("directory", type=Path, help="A checkpoint directory (save_pretrained layout).")
    score.add_argument(
        "--corpus", default=None, help="The run's corpus: file, directory or glob (default: the bundled corpus)."
    )
    score.add_argument("--tokenizer", default=None, help="Tokenizer directory (default: the checkpoint's own).")
    score.add_argument("--max-sequences", type=int, default=256, help="Held-out sequences to score.")
    score.add_argument("--max-length", type=int, default=128, help="Tokens per sequence (the run's --max-length).")
    score.add_argument("--seed", type=int, default=0, help="Seed of the whole-word masks.")
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> int:
    """Print the held-out figures of one checkpoint; the same checkpoint and flags always print the same."""
    from monitor.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.directory, args.corpus, args.tokenizer, args.max_sequences, args.seed, args.max_length
    )
    print(
        f"{args.directory}: held-out masked-LM loss {result.loss:.4f} accuracy {result.accuracy:.4f} "
        f"({result.targets} masked tokens in {result.sequences} sequences, seed {args.seed})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        if args.command == "eval":
            return evaluate(args)
        manifest = download(args.url, args.out, args.epoch, args.timeout) if args.command == "download" else pull(args)
    except (CheckpointError, ValueError, RuntimeError) as error:  # RuntimeError: also SwarmJoinError
        logger.error(str(error))
        return 1
    print(f"checkpoint of epoch {manifest['epoch']} written to {args.out} ({len(manifest['files'])} files verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
