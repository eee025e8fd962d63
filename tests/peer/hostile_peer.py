"""A hostile DHT peer for tests: joins a run and writes a forged, an oversized and a malformed progress record.

python -m tests.peer.hostile_peer --initial-peers MADDR... --run-id RUN --victim-key HEX [--flood N]

It signs with its own RSA key and skips the run's schema and size validators, so nothing stops it locally: only the
other peers' validators can refuse what it sends. Prints one JSON line: what each store returned.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from peer.progress import local_public_key, metrics_key

REPO = Path(__file__).resolve().parents[2]

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
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # its DHT process and p2pd, if anything is left
    assert code == 0, stderr.read_text()[-3000:]
    return json.loads(stdout.read_text().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--victim-key", required=True, help="hex of the public key (subkey) of a peer to impersonate")
    parser.add_argument("--flood", type=int, default=1, help="how many oversized records to write")
    args = parser.parse_args()
    key = RSAPrivateKey()
    dht = hivemind.DHT(
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        initial_peers=args.initial_peers,
        record_validators=[RSASignatureValidator(key)],
    )
    try:
        results = {}
        for name, subkey, value in attacks(bytes.fromhex(args.victim_key), local_public_key(key), args.flood):
            stored = dht.store(
                metrics_key(args.run_id), subkey=subkey, value=value, expiration_time=get_dht_time() + 60
            )
            results[name] = bool(stored)
        print(json.dumps(results), flush=True)
    finally:
        dht.shutdown()


if __name__ == "__main__":
    main()
