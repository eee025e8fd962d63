"""A hostile DHT peer for tests: joins a run and writes hostile progress records.

python -m tests.peer.hostile_peer --initial-peers MADDR... --run-id RUN --victim-key HEX [--flood N]
python -m tests.peer.hostile_peer --initial-peers MADDR... --run-id RUN --bounds --model-hash HASH [--linger]
python -m tests.peer.hostile_peer --initial-peers MADDR... --run-id RUN --names --model-hash HASH [--linger]

The first form writes a forged, oversized and malformed records. The second (--bounds) writes well-formed, validly
signed records whose numbers are out of bounds (2**64 - 1 samples, 1e308 loss or speed, epoch 2**62), one dated an
hour ahead, one at an epoch nobody vouches for and one of another protocol version: each under a key of its own, so
each record's fate is independent. It skips the run's schema and size validators, so nothing stops it locally (its
own node stores them all): only the other peers' validators can refuse what it sends, or what they read from it.
The third (--names) writes honest-looking records whose display names are hostile (HOSTILE_NAMES), one key each.
Prints one JSON line: what each store returned; with --linger it then stays up (its node keeps serving the
records) until killed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from peer.swarm.progress import PROTOCOL_VERSION, local_public_key, progress_key
from tests.harness import REPO, kill_group

HONEST_LOOKING = {
    "epoch": 3,
    "samples_per_second": 1.0,
    "samples_accumulated": 8,
    "loss_sum": 9.0,
    "mini_steps": 1,
    "device": "cpu",
    "version": "dev",
    "model_hash": "0123456789abcdef",
}


def attacks(victim_key: bytes, own_key: bytes, flood: int) -> list[tuple[str, bytes, dict]]:
    """(name, subkey, value) of every record to write."""
    now = float(get_dht_time())
    return [
        # someone else's record, which only its owner can sign: the signature is missing or made with the wrong key
        ("forged", victim_key, dict(HONEST_LOOKING, epoch=10**6, time=now)),
        # its own record, signed, but twice the size limit (far larger values crashed the sender's own DHT process:
        # hivemind passes them through a pipe that uvloop made non-blocking, and a partial read raised EAGAIN)
        *[(f"oversized-{i}", own_key, dict(HONEST_LOOKING, time=now, padding="x" * 8_000)) for i in range(flood)],
        # its own record, signed, small, but of the wrong types
        ("malformed", own_key, dict(HONEST_LOOKING, epoch="three", time=now, loss_sum=-1.0)),
    ]


# Each (name, changes) is signed by a key of its own. Expected refusal reason in the comment.
OUT_OF_BOUNDS = [
    ("samples", {"samples_accumulated": 2**64 - 1}),  # range: crashed history.record with an OverflowError
    ("future", {"time_ahead": 3600.0}),  # future: kept a ghost peer alive for an hour
    ("epoch-huge", {"epoch": 2**62}),  # range: above 2**53
    ("epoch-ahead", {"epoch": 10**6}),  # epoch: in range, but nobody vouches for it
    ("loss", {"loss_sum": 1e308}),  # range: overflowed the swarm's loss sum to inf
    ("speed", {"samples_per_second": 1e308}),  # range: overflowed the swarm's speed to inf
    ("protocol", {"protocol": PROTOCOL_VERSION + 1}),  # refused peer: another protocol version
]


# Display names a stranger may sign (peer/swarm/names.py). Expected fate in the comment.
HOSTILE_NAMES = [
    ("markup", "<img src=x onerror=alert(1)>"),  # passes the schema: every page must show it as text
    ("bidi", "Ada\u202egnp.exe"),  # schema: a right-to-left override makes one name read as another
    ("long", "x" * 33),  # schema: over MAX_NAME_CHARS
]


class MultiKeySigner(RecordValidatorBase):
    """Signs each record with whichever of its keys owns the subkey, and accepts everything (a hostile node)."""

    def __init__(self, keys: list[RSAPrivateKey]):
        self.signers = [RSASignatureValidator(key) for key in keys]

    def validate(self, record: DHTRecord) -> bool:
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        for signer in self.signers:
            if signer.local_public_key in record.subkey:
                return signer.sign_value(record)
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        return self.signers[0].strip_value(record)

    @property
    def priority(self) -> int:
        return 10


def out_of_bounds(model_hash: str) -> list[tuple[str, dict]]:
    """(name, value) of every --bounds record, each otherwise an honest record of the run's model."""
    now = float(get_dht_time())
    records = []
    for name, changes in OUT_OF_BOUNDS:
        changes = dict(changes)
        ahead = changes.pop("time_ahead", 0.0)
        value = dict(HONEST_LOOKING, model_hash=model_hash, time=now + ahead, protocol=PROTOCOL_VERSION)
        records.append((name, dict(value, **changes)))
    return records


def hostile_names(model_hash: str) -> list[tuple[str, dict]]:
    """(name, value) of every --names record: an honest record of the run's model, under a hostile display name."""
    now = float(get_dht_time())
    value = dict(HONEST_LOOKING, model_hash=model_hash, time=now, protocol=PROTOCOL_VERSION)
    return [(name, dict(value, name=display)) for name, display in HOSTILE_NAMES]


class LingeringHostilePeer:
    """`--bounds --linger` (or another `mode`) in a process of its own: it serves its records until `stop()`."""

    def __init__(self, initial_peers: list[str], run_id: str, model_hash: str, workdir: Path, mode: str = "--bounds"):
        self.stdout = workdir / f"hostile-{mode.lstrip('-')}.out"
        command = [
            *(sys.executable, "-m", "tests.peer.hostile_peer", "--initial-peers", *initial_peers, "--run-id", run_id),
            *(mode, "--model-hash", model_hash, "--linger"),
        ]
        with open(self.stdout, "w") as out, open(workdir / f"hostile-{mode.lstrip('-')}.err", "w") as err:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err, start_new_session=True)

    def stored(self, timeout: float = 120.0) -> dict:
        """What each store returned, once it printed it."""
        deadline = time.monotonic() + timeout
        while not self.stdout.read_text().strip():
            assert self.process.poll() is None, f"the hostile peer exited with {self.process.returncode}"
            assert time.monotonic() < deadline, "the hostile peer did not report its stores"
            time.sleep(0.5)
        return json.loads(self.stdout.read_text().strip().splitlines()[-1])

    def stop(self) -> None:
        kill_group(self.process.pid)  # its DHT process and p2pd too
        self.process.wait(timeout=30)


def run_hostile_peer(initial_peers: list[str], run_id: str, victim_key: bytes, workdir: Path, flood: int = 1) -> dict:
    """Run this module in a process of its own, to completion; returns what each of its stores reported.

    Its output goes to files under `workdir`; the process group is killed at the end, p2pd included.
    """
    stdout, stderr = workdir / "hostile.out", workdir / "hostile.err"
    command = [
        *(sys.executable, "-m", "tests.peer.hostile_peer", "--initial-peers", *initial_peers, "--run-id", run_id),
        *("--victim-key", victim_key.hex(), "--flood", str(flood)),
    ]
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err, start_new_session=True)
        try:
            code = process.wait(timeout=120)
        finally:
            kill_group(process.pid)  # its DHT process and p2pd, if anything is left
    assert code == 0, stderr.read_text()[-3000:]
    return json.loads(stdout.read_text().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--victim-key", default="", help="hex of the public key (subkey) of a peer to impersonate")
    parser.add_argument("--flood", type=int, default=1, help="how many oversized records to write")
    parser.add_argument("--bounds", action="store_true", help="write the out-of-bounds records instead")
    parser.add_argument("--names", action="store_true", help="write records with hostile display names instead")
    parser.add_argument("--model-hash", default=HONEST_LOOKING["model_hash"], help="the run's model fingerprint")
    parser.add_argument("--linger", action="store_true", help="stay up after the stores, until killed")
    args = parser.parse_args()
    if args.bounds or args.names:
        named = out_of_bounds(args.model_hash) if args.bounds else hostile_names(args.model_hash)
        keys = [RSAPrivateKey() for _ in named]
        records = [(name, local_public_key(key), value) for key, (name, value) in zip(keys, named)]
        validator = MultiKeySigner(keys)
    else:
        keys = [RSAPrivateKey()]
        records = attacks(bytes.fromhex(args.victim_key), local_public_key(keys[0]), args.flood)
        validator = RSASignatureValidator(keys[0])
    dht = hivemind.DHT(
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        initial_peers=args.initial_peers,
        record_validators=[validator],
    )
    try:
        expiration = get_dht_time() + (3600 if args.linger else 60)
        results = {}
        for name, subkey, value in records:
            stored = dht.store(progress_key(args.run_id), subkey=subkey, value=value, expiration_time=expiration)
            results[name] = bool(stored)
        print(json.dumps(results), flush=True)
        while args.linger:
            time.sleep(60)
    finally:
        dht.shutdown()


if __name__ == "__main__":
    main()
