"""`albert-checkpoint`: fetch a checkpoint directory that transformers loads without this project installed.

albert-checkpoint download --from http://HOST:PORT --run-key FINGERPRINT [--epoch N] --out DIR  # signed by the run
albert-checkpoint pull --initial-peers MADDR... --run-id RUN --run-key FINGERPRINT --out DIR    # from the swarm
albert-checkpoint eval DIR --corpus CORPUS [--max-sequences N] [--seed S]  # held-out masked-LM loss and accuracy

The server is not trusted: a download is accepted only if its manifest is signed by the run key whose fingerprint
the user gives (the monitor prints it at start, the organiser hands it out), every file matches the manifest, the
model code is this project's own, and the archive is a plain tar within --max-size (monitor/safe_tar.py,
monitor/checkpoint_trust.py). Any refusal is one line on stderr and exit code 1; --out is then left as it was.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from monitor.checkpoint import MANIFEST, write_manifest
from monitor.checkpoint_trust import UntrustedCheckpoint, verify_checkpoint
from monitor.safe_tar import UnsafeArchive, extract_checkpoint
from peer.swarm.manifest import sha256_file
from peer.swarm.run_key import normalize_fingerprint

logger = logging.getLogger("albert-checkpoint")
CHUNK = 1 << 20
# Room for the largest preset (ruleanalbert: ~1.1 GB of weights, ~2.2 GB of LAMB moments) with a wide margin.
DEFAULT_MAX_SIZE = 16 << 30
RUN_KEY_HELP = (
    "the run key's fingerprint (64 hex digits): the monitor prints `--run-key FINGERPRINT` when it starts and the "
    "organiser hands it out with the initial peers"
)


class CheckpointError(RuntimeError):
    """The checkpoint could not be fetched or failed verification."""


def trusted_fingerprint(run_key: str | None) -> str:
    """The --run-key fingerprint in canonical form; CheckpointError saying where to get it if missing or malformed."""
    if not run_key:
        raise CheckpointError(f"--run-key is required: {RUN_KEY_HELP}")
    try:
        return normalize_fingerprint(run_key)
    except ValueError as error:
        raise CheckpointError(f"--run-key: {error}") from error


def authorization_header(base_url: str, run_secret_file: str | None, join_key_file: str | None) -> str | None:
    """For a closed run, `Bearer TOKEN` from the monitor for a run secret or join key; None for an open run."""
    if not (run_secret_file or join_key_file):
        return None
    from peer.swarm.join_client import JoinCredential, http_access_token  # hivemind: imported only when needed

    try:
        return http_access_token(base_url.rstrip("/"), JoinCredential(run_secret_file, join_key_file))
    except (RuntimeError, OSError, ValueError) as error:  # JoinRefused, JoinUnavailable, an unreadable file
        raise CheckpointError(f"cannot get an access token from {base_url}: {error}") from error


def download(
    base_url: str,
    out: Path,
    epoch: int | None = None,
    timeout: float = 60.0,
    *,
    run_key: str,
    max_size: int = DEFAULT_MAX_SIZE,
    authorization: str | None = None,
) -> dict:
    """Fetch a checkpoint archive from a monitor, unpack it safely, verify it against the trusted run key, install.

    Args:
        run_key: fingerprint of the run key the checkpoint must be signed by.
        max_size: bytes the archive (and what it unpacks to) may not exceed; the download stops past it.
        authorization: the `Authorization` header value for a closed run (see authorization_header).
    """
    trusted = trusted_fingerprint(run_key)
    _check_out(out)
    headers = {"Authorization": authorization} if authorization else {}
    base = base_url.rstrip("/")
    listing = _listing(f"{base}/api/checkpoints", timeout, headers)
    url = f"{base}/checkpoints/{'latest' if epoch is None else epoch}"
    tmp = Path(tempfile.mkdtemp(prefix=".albert-checkpoint-", dir=_parent(out)))
    try:
        archive = tmp / "checkpoint.tar"
        got_epoch, expected = _fetch(url, archive, headers, timeout, max_size)
        listed = listing.get(got_epoch, {})
        actual = sha256_file(archive)
        if not expected or actual != expected or (listed.get("sha256") and listed["sha256"] != actual):
            raise CheckpointError(f"archive sha256 {actual} does not match the monitor's {expected or listed}")
        unpacked = tmp / "unpacked"
        unpacked.mkdir()
        # a tar holds at least what it unpacks to: its own size bounds the content
        directory = extract_checkpoint(archive, unpacked, min(max_size, archive.stat().st_size))
        manifest = verify_checkpoint(directory, trusted)
        if epoch is not None and manifest.get("epoch") != epoch:  # an old signed checkpoint replayed as this one
            raise CheckpointError(f"asked for epoch {epoch}, the signed manifest says epoch {manifest.get('epoch')}")
        return _install(directory, out)
    except (UnsafeArchive, UntrustedCheckpoint) as error:
        raise CheckpointError(str(error)) from error
    except OSError as error:
        raise CheckpointError(f"file system error while unpacking the checkpoint: {error}") from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch(url: str, archive: Path, headers: dict, timeout: float, max_size: int) -> tuple[int, str | None]:
    """Stream the archive to a file, stopping past `max_size`; its epoch and sha256 as the monitor's headers say."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_size:
                raise CheckpointError(f"{url} is {int(length)} bytes, over the size limit of {max_size} (--max-size)")
            expected = response.headers.get("X-Checkpoint-SHA256")
            got_epoch = response.headers.get("X-Checkpoint-Epoch", "")
            written = 0
            with open(archive, "wb") as file:
                while chunk := response.read(CHUNK):
                    written += len(chunk)
                    if written > max_size:
                        raise CheckpointError(f"{url} sent more than the size limit of {max_size} bytes (--max-size)")
                    file.write(chunk)
    except urllib.error.HTTPError as error:
        raise CheckpointError(f"{url}: HTTP {error.code} {error.read(1000).decode(errors='replace')}") from error
    except (urllib.error.URLError, OSError, ValueError) as error:  # ValueError: e.g. a malformed header
        raise CheckpointError(f"cannot download {url}: {error}") from error
    return int(got_epoch) if got_epoch.isdigit() else -1, expected


def _check_out(out: Path) -> None:
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise CheckpointError(f"--out {out} exists and is not empty; choose a new directory")


def _install(directory: Path, out: Path) -> dict:
    """Move a checkpoint directory whose files match its manifest to `out` (which must not hold files).

    Callers have just verified it (download: verify_checkpoint hashed every file) or just written its manifest from
    the files themselves (pull), so the files are not hashed a second time here.
    """
    _check_out(out)
    if out.exists():
        out.rmdir()
    shutil.move(str(directory), str(out))
    return json.loads((out / MANIFEST).read_text())


def _listing(url: str, timeout: float, headers: dict) -> dict:
    """The monitor's checkpoint list by epoch (only a cross-check: the signature is what is trusted)."""
    listing = _get_json(url, timeout, headers)
    if not isinstance(listing, list):
        raise CheckpointError(f"{url} did not answer with a list of checkpoints")
    return {entry.get("epoch"): entry for entry in listing if isinstance(entry, dict)}


def _get_json(url: str, timeout: float, headers: dict):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            return json.loads(response.read(16 << 20))  # a listing is small; a flood is cut off and fails to parse
    except urllib.error.HTTPError as error:
        raise CheckpointError(f"{url}: HTTP {error.code} {error.read(1000).decode(errors='replace')}") from error
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {url}: {error}") from error


def _parent(out: Path) -> Path:
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent  # unpack next to the destination, so the final move is a rename on the same file system


def pull(args: argparse.Namespace) -> dict:
    """Join the swarm as a client, download the averaged state with the peers' layout, write a checkpoint dir."""
    import hivemind  # noqa: F401  (heavy imports only for this subcommand)

    from monitor.checkpoint import checkpoint_mode
    from monitor.outer_state import OuterStateKeeper
    from monitor.records import monitor_validators
    from monitor.state import StateKeeper, build_run_model
    from peer.swarm.config import OptimConfig, SwarmConfig
    from peer.swarm.dht import build_dht
    from peer.swarm.run_record import check_model_matches, fetch_run_records

    trusted = trusted_fingerprint(args.run_key)
    swarm = SwarmConfig(
        run_id=args.run_id, initial_peers=args.initial_peers, host_maddrs=args.host_maddrs, client_mode=True
    )
    optim = OptimConfig(optimizer=args.optimizer, local_steps=args.local_steps)
    run_model = build_run_model(args.model, args.tokenizer)
    dht = build_dht(swarm, monitor_validators(args.run_id))  # also strips the signatures of the records it reads
    keeper = None
    try:
        mismatch = check_model_matches(dht, args.run_id, run_model.fingerprint, trusted_key=trusted)
        if mismatch:
            raise CheckpointError(mismatch)
        # the epoch a donor may claim is bounded by what the run's own monitor (signing with the run key) holds
        monitor_epoch = max(
            (record.state_epoch for record in fetch_run_records(dht, args.run_id, trusted)), default=-1
        )
        # local steps: the outer weights and momentum (peers serve them under another prefix), else the training state
        keeper_class = OuterStateKeeper if optim.local_steps else StateKeeper
        keeper = keeper_class(dht, swarm, optim, run_model, client_mode=True)
        if monitor_epoch < 0:
            logger.warning("The run's monitor holds no state yet: a donor's epoch is bounded by the absolute cap only")
        if not keeper.fetch(timeout=args.timeout, swarm_epoch=monitor_epoch if monitor_epoch >= 0 else None):
            mode = f"--local-steps {optim.local_steps}" if optim.local_steps else "synchronous: without --local-steps"
            raise CheckpointError(
                f"no peer of run {args.run_id!r} shared a {optim.training_mode} state in {args.timeout:g} s "
                f"(is the run training, and in this mode ({mode})?)"
            )
        # whichever peer served it, a NaN state is no checkpoint
        problem = keeper.state_problem() if optim.local_steps else non_finite_tensor(keeper)
        if problem and optim.local_steps:
            raise CheckpointError(f"the outer state downloaded from the swarm is no checkpoint: {problem}")
        if problem:
            raise CheckpointError(f"the state downloaded from the swarm holds non-finite numbers in {problem}")
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
                **checkpoint_mode(optim, keeper.epoch),
            )
            return _install(directory, args.out)
    finally:
        if keeper is not None:
            keeper.shutdown()
        dht.shutdown()


def non_finite_tensor(keeper) -> str | None:
    """The name of the first parameter or optimizer-state tensor holding NaN or inf, or None."""
    import torch

    for name, parameter in keeper.run_model.model.named_parameters():
        if not torch.isfinite(parameter).all():
            return f"parameter {name}"
    for index, state in keeper.averager.optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                return f"optimizer state {key} of parameter {index}"
    return None


def parse_size(text: str) -> int:
    """Bytes from `123`, `200M`, `16G` (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 16G)")
    return int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="albert-checkpoint", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="Download a verified checkpoint from a monitor.")
    get.add_argument("--from", dest="url", required=True, help="The monitor's base URL, e.g. http://host:8080")
    get.add_argument("--epoch", type=int, default=None, help="Epoch of the checkpoint (default: the newest).")
    get.add_argument("--out", type=Path, required=True, help="New directory to write the checkpoint to.")
    get.add_argument("--timeout", type=float, default=60.0, help="Network timeout in seconds.")
    get.add_argument("--run-key", default=None, help=f"Required: {RUN_KEY_HELP}.")
    get.add_argument(
        "--max-size",
        type=parse_size,
        default=DEFAULT_MAX_SIZE,
        help="Refuse an archive larger than this (bytes, or with K/M/G/T); the download stops past it. Default 16G.",
    )
    credential = get.add_mutually_exclusive_group()
    credential.add_argument("--run-secret-file", default=None, help="A closed run's secret file (as for a peer).")
    credential.add_argument("--join-key-file", default=None, help="A closed run's allowlisted join key (as a peer's).")
    swarm = commands.add_parser("pull", help="Download the current state straight from the swarm (no monitor).")
    swarm.add_argument("--initial-peers", nargs="+", required=True, help="Multiaddrs of any peers of the run.")
    swarm.add_argument("--run-id", required=True, help="The run's id.")
    swarm.add_argument("--run-key", default=None, help=f"Required: {RUN_KEY_HELP}.")
    swarm.add_argument("--out", type=Path, required=True, help="New directory to write the checkpoint to.")
    swarm.add_argument("--model", default="tiny", help="The run's model preset or config.json path.")
    swarm.add_argument("--tokenizer", default=None, help="The run's tokenizer directory (default: bundled).")
    swarm.add_argument(
        "--optimizer",
        default="lamb",
        choices=["lamb", "lamb-8bit"],
        help="The run's optimizer (its state layout must match the peers').",
    )
    swarm.add_argument(
        "--local-steps",
        type=int,
        default=0,
        help="The run's --local-steps: above 0, pull the outer weights and momentum of a local-steps run.",
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
        if args.command == "download":
            authorization = authorization_header(args.url, args.run_secret_file, args.join_key_file)
            manifest = download(
                args.url,
                args.out,
                args.epoch,
                args.timeout,
                run_key=args.run_key,
                max_size=args.max_size,
                authorization=authorization,
            )
        else:
            manifest = pull(args)
    except (CheckpointError, ValueError, RuntimeError, OSError) as error:  # RuntimeError: also SwarmJoinError
        logger.error(" ".join(str(error).split()))  # one line, whatever a server put in its error body
        return 1
    print(f"checkpoint of epoch {manifest['epoch']} written to {args.out} ({len(manifest['files'])} files verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
