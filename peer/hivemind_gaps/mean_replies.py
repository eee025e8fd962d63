"""Mean replies: every member of an all-reduce ends the round holding bit for bit the same result.

hivemind 1.1.12's reducer sends each sender the *difference* between the mean of a part and that sender's own part,
compressed (``AllReduceRunner._accumulate_parts_streaming``), and the sender adds it to its own part; the reducer
itself adds the exact difference. With a lossy codec each peer therefore ends the round with the mean plus its own
rounding of its own difference: the peers' results differ, round after round. In the local-steps mode that is the
drift of the outer weights that the outer-state re-sync (a whole-model round) exists to undo, and in the measured
H = 32 runs the re-sync carried ~70% of all the bytes (docs/experiments.md).

Here the reducer compresses the mean itself, once per receiver as hivemind does (so the traffic counters see every
reply), and sends every member the same bytes; it takes for its own part the mean as the others decode it (the same
codec's round trip), and each member *copies* what it receives in place of its own values (``x + (m - x)`` is not
always ``m`` in floating point). The outer step being the same arithmetic on the same inputs, peers that took part in
the same whole rounds hold the same outer weights, and the re-sync has nothing left to undo but the rounds a peer
missed or received in part. A part whose reducer failed keeps this peer's own values, as hivemind does
(``TensorPartContainer.return_deltas = False``: its own part instead of a zero delta).

What goes over the wire is the same protobuf in the same codecs; only the meaning of a reply changed (the mean, not
a difference), which a peer of the earlier protocol would misread as a difference. So each member declares the
protocol in its gathered data (``MeanReplies.step`` wraps the caller's), and a peer refuses a group in which any
member does not: hivemind then looks for another group, and its caller sees only the caller's gathered data.
"""

from __future__ import annotations

import asyncio
import logging

import torch
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import CompressionInfo, deserialize_torch_tensor, serialization
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import amap_in_executor, as_aiter, azip

from peer.hivemind_gaps.averager_guard import fail_group
from peer.hivemind_gaps.robust_allreduce import register_runner, runner_options
from peer.hivemind_gaps.traffic import uncounted

logger = logging.getLogger(__name__)
PROTOCOL = "mean-replies/1"  # what each member declares in its gathered data (module docstring)


def as_decoded(part: torch.Tensor, compression_type: int) -> torch.Tensor:
    """``part`` as a receiver decodes it after hivemind's serialize_torch_tensor in ``compression_type`` (bit for
    bit: the same codec of hivemind's table, the same CompressionInfo), through the codec itself, so that no traffic
    counter counts it."""
    codec = uncounted(serialization._BASE_COMPRESSION_TYPES[runtime_pb2.CompressionType.Name(compression_type)])
    return codec.extract(codec.compress(part, CompressionInfo.from_tensor(part)))


class MeanReplyRunner(AllReduceRunner):
    """hivemind's AllReduceRunner (1.1.12) whose reducer replies with the compressed mean and whose output is the
    result itself, not a difference (module docstring)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tensor_part_container.return_deltas = False  # a failed reducer's parts: this peer's own values

    async def _communicate_with_peer(self, peer_id):
        if peer_id != self.peer_id:
            await super()._communicate_with_peer(peer_id)  # registers what the reducer sends: now the mean
            return
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        compression_type = self.tensor_part_container.compression.compression_type
        loop = asyncio.get_event_loop()
        for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
            averaged_part = await self.tensor_part_reducer.accumulate_part(
                sender_index, part_index, tensor_part, weight=self.weight
            )
            # what every other member decodes from this peer's reply, so that this peer holds the same
            decoded = await loop.run_in_executor(None, as_decoded, averaged_part, compression_type)
            self.tensor_part_container.register_processed_part(peer_index, part_index, decoded)

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        """hivemind's (1.1.12), replying with the mean in the sender's compression instead of the difference."""
        part_index = 0
        try:
            loop = asyncio.get_event_loop()
            async for tensor_part, weight, part_compression in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight, msg.tensor_part.compression),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                try:
                    averaged_part = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight
                    )
                    part_index += 1
                except BannedException:
                    logger.debug(f"Sender {sender_index} is already banned")
                    break
                serialized = await loop.run_in_executor(
                    None, serialization.serialize_torch_tensor, averaged_part, part_compression
                )
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


class MeanReplies:
    """Averager mixin: its all-reduce rounds run MeanReplyRunner, and only with members that declare the protocol.

    ``step(gather=...)`` returns the members' gathered data as the callers gave it (the declaration is taken off).
    """

    def step(self, *args, gather=None, **kwargs):
        return super().step(*args, gather={"protocol": PROTOCOL, "data": gather}, **kwargs)

    async def _aggregate_with_group(self, group_info: GroupInfo, *args, **kwargs):
        unwrapped, strangers = [], []
        for peer_id, entry in zip(group_info.peer_ids, group_info.gathered):
            try:  # hivemind serializes each member's data twice: [bandwidth, mode, dumps(gather)]
                bandwidth, mode, user_bytes = self.serializer.loads(entry)
                declared = self.serializer.loads(user_bytes)
            except Exception:  # noqa: BLE001 - whatever a member sent: not the protocol
                declared = None
            if not isinstance(declared, dict) or declared.get("protocol") != PROTOCOL:
                strangers.append(peer_id.to_base58())
                continue
            unwrapped.append(self.serializer.dumps([bandwidth, mode, self.serializer.dumps(declared.get("data"))]))
        if strangers:
            refusal = AllreduceException(
                f"members {strangers} do not declare {PROTOCOL} (a peer of another version?): their replies would "
                "be misread"
            )
            logger.warning(f"Not averaging in this group: {refusal}")
            fail_group(self._running_groups, group_info.group_id, refusal)
        group = GroupInfo(group_info.group_id, group_info.peer_ids, tuple(unwrapped))
        return await super()._aggregate_with_group(group, *args, **kwargs)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id: bytes | None = None, **kwargs):
        """hivemind's DecentralizedAverager._run_allreduce_inplace_ (1.1.12) with a MeanReplyRunner, whose outputs
        replace the tensors (hivemind adds its differences, scaled by an averaging alpha this averager leaves at 1)."""
        group_id = group_info.group_id if group_id is None else group_id
        runner = MeanReplyRunner(**runner_options(self, tensors, group_info, group_id, **kwargs))
        register_runner(self, runner, group_id)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, result in azip(as_aiter(*tensors), runner):
                tensor.copy_(result)
                self.last_updated = get_dht_time()
                self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")
