"""An intruder of a closed run, run as its own process by the tests: it knows the initial peers, the run id and the
members' peer ids, holds no access token, and tries to read and write the run's DHT records, join an averaging group,
send huge gradients and download the training state. It prints one line per attempt: REFUSED or ACCEPTED.

    python tests/peer/intruder.py --run_id RUN --initial_peers MADDR... --targets PEER_ID... [--local_steps]

With --local_steps it attacks the averager of the local-steps mode (``{run_id}_outer``, peer/local_steps.py), which
answers all three RPCs, instead of the synchronous mode's gradient and state averagers.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from functools import partial

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import serialize_torch_tensor
from hivemind.dht.routing import DHTID
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time

HUGE = 1e30
RPC_TIMEOUT = 10.0


def report(attempt: str, refused: bool, detail: str) -> None:
    print(f"{'REFUSED' if refused else 'ACCEPTED'} {attempt}: {detail}", flush=True)


async def direct_find(peer: PeerID, key: str, _dht, node):
    """Ask one member's DHT node for a key, bypassing this node's (empty) routing table."""
    return await node.protocol.call_find(peer, [DHTID.generate(source=key)])


async def direct_store(peer: PeerID, key: str, _dht, node):
    value = MSGPackSerializer.dumps({"epoch": 10**6})
    return await node.protocol.call_store(peer, [DHTID.generate(source=key)], [value], get_dht_time() + 600)


def attack_dht(dht: hivemind.DHT, run_id: str, targets: list[PeerID]) -> None:
    for key in (f"{run_id}_progress", f"{run_id}_run", f"{run_id}_members", f"{run_id}_state_averager.all_averagers"):
        found = dht.get(key, latest=True)
        report(f"DHT read of {key}", found is None, "nothing found" if found is None else repr(found)[:200])
    for peer in targets:
        found = dht.run_coroutine(partial(direct_find, peer, f"{run_id}_progress"))
        report(f"DHT find at {peer}", found is None, "no answer" if found is None else "answered")
        stored = dht.run_coroutine(partial(direct_store, peer, f"{run_id}_progress"))
        report(f"DHT store at {peer}", not stored, f"result {stored}")


async def first_message(stream) -> object | None:
    async for message in stream:
        return message
    return None


def huge_gradients() -> averaging_pb2.AveragingData:
    tensor = serialize_torch_tensor(torch.full((4096,), HUGE))
    return averaging_pb2.AveragingData(code=averaging_pb2.PART_FOR_AVERAGING, group_id=b"intruder", tensor_part=tensor)


async def attack_averagers(p2p, run_id: str, peer: PeerID, local_steps: bool = False) -> None:
    if local_steps:  # one averager serves matchmaking, all-reduce and the state; it keeps hivemind's handler names
        grad = state = DecentralizedAverager.get_stub(p2p, peer, namespace=f"{run_id}_outer")
        group_key = f"{run_id}_outer.0b"
    else:
        grad = GradientAverager.get_stub(p2p, peer, namespace=f"{run_id}_grad_averager")
        state = TrainingStateAverager.get_stub(p2p, peer, namespace=f"{run_id}_state_averager")
        group_key = f"{run_id}_grad_averager.0b"
    join = averaging_pb2.JoinRequest(expiration=get_dht_time() + 30, group_key=group_key)
    attempts = {
        "rpc_join_group": lambda: grad.rpc_join_group(join),
        "rpc_aggregate_part": lambda: grad.rpc_aggregate_part(_stream(huge_gradients(), 4)),
        "rpc_download_state": lambda: state.rpc_download_state(averaging_pb2.DownloadRequest()),
    }
    for name, call in attempts.items():
        try:
            message = await asyncio.wait_for(first_message(await call()), RPC_TIMEOUT)
        except Exception as error:  # noqa: BLE001  (any failure to get data is a refusal; print what it was)
            report(f"{name} at {peer}", True, f"error {error!r}"[:300])
            continue
        code = getattr(message, "code", None)
        refused = message is None or code == averaging_pb2.PROTOCOL_VIOLATION
        detail = "no data" if message is None else f"code {averaging_pb2.MessageCode.Name(code or 0)}"
        report(f"{name} at {peer}", refused, detail)


async def _stream(message, count: int):
    for _ in range(count):
        yield message


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run_id", required=True)
    parser.add_argument("--initial_peers", nargs="+", required=True)
    parser.add_argument("--targets", nargs="+", required=True, help="peer ids of run members to attack")
    parser.add_argument("--local_steps", action="store_true", help="attack the local-steps mode's averager")
    args = parser.parse_args()
    torch.set_num_threads(1)
    targets = [PeerID.from_base58(target) for target in args.targets]
    dht = hivemind.DHT(
        initial_peers=args.initial_peers,
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        ensure_bootstrap_success=False,
    )
    try:
        print(f"Intruder {dht.peer_id} attacks run {args.run_id!r}", flush=True)
        attack_dht(dht, args.run_id, targets)

        async def attack_all():
            p2p = await dht.replicate_p2p()
            for peer in targets:
                await attack_averagers(p2p, args.run_id, peer, args.local_steps)

        asyncio.run(attack_all())
    finally:
        dht.shutdown()
    print("Intruder done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
