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

The reply's rounding is the same for every member, but it is a rounding of the mean itself (hivemind's rounded the
mean minus each member's own part, small where members agree), and a persistent direction's rounding adds up round
after round. So the reducer carries it forward (``ReplyFeedback``): it replies with the mean plus what its last
replies of that part of the vector dropped, and keeps what this one drops, as each peer's error feedback does for
what it sends (peer/error_feedback.py). Only where the mean is non-zero: a topk-int4 mean (non-zero on the members'
supports) stays as sparse, and a dropped value waits for its coordinate's next non-zero mean.

What goes over the wire is the same protobuf in the same codecs; only the meaning of a reply changed (the mean, not
a difference), which a peer of the earlier protocol would misread as a difference. So each member declares the
protocol in its gathered data (``MeanReplies.step`` wraps the caller's), and a peer refuses a group in which any
member does not: hivemind then looks for another group, and its caller sees only the caller's gathered data. (The run's
PROTOCOL_VERSION refuses such a peer at join already; this covers a peer that skipped the check.)

Only for averagers whose result replaces the local values as a whole (the pseudo-gradients): a state round in a
lossy format would leave every member the *rounded* state, where hivemind's differences leave each its own values
plus a rounded small change. ``mean_replies=False`` keeps hivemind's rounds (the local-steps re-sync).
"""

from __future__ import annotations

import asyncio
import logging

import torch
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import CompressionInfo, deserialize_torch_tensor, serialization
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import amap_in_executor

from peer.hivemind_gaps.averager_guard import fail_group
from peer.hivemind_gaps.checked_parts import CheckedAllReduceRunner, run_inplace, start_runner
from peer.hivemind_gaps.traffic import uncounted
from peer.swarm.access_tokens import RateLimitedWarning

logger = logging.getLogger(__name__)
PROTOCOL = "mean-replies/1"  # what each member declares in its gathered data (module docstring)


def as_decoded(part: torch.Tensor, compression_type: int) -> torch.Tensor:
    """``part`` as a receiver decodes it after hivemind's serialize_torch_tensor in ``compression_type`` (bit for
    bit: the same codec of hivemind's table, the same CompressionInfo), through the codec itself, so that no traffic
    counter counts it."""
    codec = uncounted(serialization._BASE_COMPRESSION_TYPES[runtime_pb2.CompressionType.Name(compression_type)])
    return codec.extract(codec.compress(part, CompressionInfo.from_tensor(part)))


class ReplyFeedback:
    """A reducer's error feedback on its replies: per part of the vector (keyed by tensor and part within it, which
    never change: hivemind splits each tensor at fixed sizes), what the reply's encoding dropped. It lives in the
    averager's process and outlives rounds; a part this peer no longer reduces keeps its residual for when it does."""

    def __init__(self):
        self.residuals: dict[tuple, torch.Tensor] = {}

    def reply(self, key: tuple, mean: torch.Tensor, compression_type: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(what to encode, what every member decodes from it) for ``mean``, updating the residual of ``key``."""
        residual = self.residuals.get(key)
        support = mean != 0
        target = mean if residual is None or residual.shape != mean.shape else mean + residual * support
        if not bool(torch.isfinite(target).all()):  # a crafted weight's mean: the encoding refuses it, and no
            self.residuals.pop(key, None)  # residual is kept from it
            return mean, as_decoded(mean, compression_type)
        sent = as_decoded(target, compression_type)
        dropped = target - sent
        if not bool(dropped.any()) or dropped.norm() > 0.5 * target.norm():
            # nothing dropped (a lossless codec: no residual to keep), or more than a rounding (fp16 clamps at
            # 65504: a crafted mean's excess would come back in every later reply)
            self.residuals.pop(key, None)
            return target, sent
        self.residuals[key] = (
            dropped if residual is None or residual.shape != mean.shape else (torch.where(support, dropped, residual))
        )
        return target, sent


class MeanReplyRunner(CheckedAllReduceRunner):
    """hivemind's AllReduceRunner (1.1.12) whose reducer replies with the compressed mean and whose output is the
    result itself, not a difference (module docstring); parts and results are checked (checked_parts.py).

    Args:
        reply_feedback: the averager's residuals of its replies (a fresh one: none carried from earlier rounds).
        kwargs: as AllReduceRunner.
    """

    def __init__(self, *, reply_feedback: ReplyFeedback | None = None, **kwargs):
        super().__init__(**kwargs)
        self.tensor_part_container.return_deltas = False  # a failed reducer's parts: this peer's own values
        self.reply_feedback = reply_feedback or ReplyFeedback()
        own = self.ordered_peer_ids.index(self.peer_id)
        # which part of which tensor each part this peer reduces is (CompressionInfo.get_part: key, part_index)
        self._part_keys = [
            (info.key, info.part_index) for _, info in self.tensor_part_container._input_parts_by_peer[own]
        ]
        self._replies: dict[int, asyncio.Future] = {}  # part index -> (what to encode, what members decode)

    async def _reply(self, part_index: int, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reply to every sender of part ``part_index``, made once (its residual moves once) in an executor."""
        if part_index not in self._replies:
            compression_type = self.tensor_part_container.compression.compression_type
            self._replies[part_index] = asyncio.get_event_loop().run_in_executor(
                None, self.reply_feedback.reply, self._part_keys[part_index], mean, compression_type
            )
        # shielded: one sender's handler cancelled (its connection dropped) must not cancel every sender's reply
        return await asyncio.shield(self._replies[part_index])

    async def own_result(self, part_index: int, own_part: torch.Tensor, reduced: torch.Tensor) -> torch.Tensor | None:
        """What every other member decodes from this peer's reply, so that this peer holds the same (None if the
        codec refuses the mean, e.g. a non-finite one: this peer keeps its own values there, checked_parts.py)."""
        try:
            _, decoded = await self._reply(part_index, reduced)
        except Exception as error:  # noqa: BLE001 - whatever the codec raised: the senders' replies fail with it too
            logger.warning(f"The reply to part {part_index} of this peer's share could not be encoded: {error!r}")
            return None
        return decoded

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        """hivemind's (1.1.12), replying with the mean (and the reply's residual) in the sender's compression instead of
        the difference."""
        part_index = 0
        try:
            loop = asyncio.get_event_loop()
            async for tensor_part, weight, part_compression in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight, msg.tensor_part.compression),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                reduced_index = part_index
                try:
                    averaged_part = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight
                    )
                    part_index += 1
                except BannedException:
                    logger.debug(f"Sender {sender_index} is already banned")
                    break
                reply, _ = await self._reply(reduced_index, averaged_part)
                serialized = await loop.run_in_executor(
                    None, serialization.serialize_torch_tensor, reply, part_compression
                )
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


class MeanReplies:
    """Averager mixin: its all-reduce rounds run MeanReplyRunner, and only with members that declare the protocol.

    ``step(gather)`` returns the members' gathered data as the callers gave it (the declaration is taken off).

    Args:
        mean_replies: False for hivemind's rounds unchanged (module docstring: state rounds in a lossy format).
        kwargs: passed to the hivemind averager.
    """

    reply_feedback_class = ReplyFeedback

    def __init__(self, *args, mean_replies: bool = True, **kwargs):
        self.mean_replies = mean_replies
        self._reply_feedback = self.reply_feedback_class()  # filled in the averager's process, kept across rounds
        self._strangers_warning = RateLimitedWarning(logger, period=60.0)  # a stranger retries at every round
        super().__init__(*args, **kwargs)

    def step(self, gather=None, *args, **kwargs):
        if self.mean_replies:
            gather = {"protocol": PROTOCOL, "data": gather}
        return super().step(gather, *args, **kwargs)

    async def _aggregate_with_group(self, group_info: GroupInfo, *args, **kwargs):
        if self.mean_replies:
            group_info = self._declared_group(group_info)
        return await super()._aggregate_with_group(group_info, *args, **kwargs)

    def _declared_group(self, group_info: GroupInfo) -> GroupInfo:
        """``group_info`` with each member's declaration taken off its gathered data; the group is refused (an
        AllreduceException: hivemind looks for another) if a member does not declare the protocol."""
        unwrapped, strangers = [], []
        for peer_id, entry in zip(group_info.peer_ids, group_info.gathered):
            undeclared = self._undeclared(entry)
            if undeclared is None:
                strangers.append(peer_id.to_base58())
            unwrapped.append(undeclared)
        if strangers:
            refusal = AllreduceException(
                f"members {strangers} do not declare {PROTOCOL} (a peer of another version?): their replies would "
                "be misread"
            )
            self._strangers_warning(",".join(strangers), f"Not averaging in this group: {refusal}")
            fail_group(self._running_groups, group_info.group_id, refusal)
        return GroupInfo(group_info.group_id, group_info.peer_ids, tuple(unwrapped))

    def _undeclared(self, entry: bytes) -> bytes | None:
        """A member's gathered entry with its declaration taken off, None if it does not declare the protocol."""
        try:  # hivemind serializes each member's data twice: [bandwidth, mode, dumps(gather)]
            bandwidth, mode, user_bytes = self.serializer.loads(entry)
            declared = self.serializer.loads(user_bytes)
            if isinstance(declared, dict) and declared.get("protocol") == PROTOCOL:
                return self.serializer.dumps([bandwidth, mode, self.serializer.dumps(declared["data"])])
        except Exception:  # noqa: BLE001 - whatever a member sent: not the protocol
            return None
        return None

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id: bytes | None = None, **kwargs):
        """hivemind's DecentralizedAverager._run_allreduce_inplace_ (1.1.12) with a MeanReplyRunner, whose outputs
        replace the tensors (hivemind adds its differences, scaled by an averaging alpha this averager leaves at 1)."""
        if not self.mean_replies:
            return await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)
        assert self._averaging_alpha == 1.0, "mean replies replace the tensors: no averaging alpha"
        options = dict(reply_feedback=self._reply_feedback, **kwargs)
        runner = start_runner(self, MeanReplyRunner, tensors, group_info, group_id, **options)
        await run_inplace(self, runner, tensors, group_info, lambda tensor, result: tensor.copy_(result))
