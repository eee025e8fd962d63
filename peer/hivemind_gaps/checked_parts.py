"""Every part of an all-reduce is checked where it arrives: a sender's part at its reducer, a reducer's reply at the
member that asked for it.

hivemind 1.1.12's ``TensorPartReducer`` adds each sender's part into a running sum with the weight the sender
declares (``accumulator.add_(part, alpha=weight)``, divided by the sum of the weights at the end), and each member
adds whatever its reducers reply. Nothing checks either, so:

- one member sending NaN (a broken GPU) makes the whole part NaN at every reducer, for every member; one declaring a
  NaN weight the same; one declaring a negative weight makes the denominator as small as it likes, and the mean as
  large;
- a reducer replying NaN for its share makes that share of every member's result NaN.

In the synchronous mode each peer's update guard then skipped the step (peer/hivemind_gaps/update_guard.py): one such
member stopped the whole swarm for as long as it stayed.

Here:

- ``CheckedPartReducer`` refuses a part of the wrong shape or not of floating point, values not finite in float32,
  and a weight outside [0, MAX_WEIGHT] or one that with the part's values could overflow hivemind's float32 sum (an
  AllreduceException raised before the part is counted, logged with the sender's peer id): hivemind
  bans that sender for the round, and the reducer averages the other senders' parts, so the rest of the group's
  round completes without it. A runner that refuses its own part bans itself as a sender the same way.
- ``refuse_non_finite_results``: a reply of the wrong shape or dtype, or not finite, fails that reducer at
  this member, which keeps its own values for the rest of that reducer's share (a zero delta, or its own part with
  mean replies), as for a reducer that timed out. A finite but outsized reply is the update guard's to judge.
- ``CheckedAllReduceRunner``: hivemind's AllReduceRunner with both; ``CheckedRounds``: an averager mixin whose rounds
  run it. The swarm's other runners (mean_replies.py, robust_allreduce.py) extend it; CenteredClip keeps NaN parts
  and weights of its own accord (an outlier, scored), so it takes the size check only.

Bytes are still the sender's to choose within those checks: finite values far from the others are the robust
aggregation's business (``--aggregation centered-clip``), and what a mean run cannot refuse.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException, TensorPartContainer, TensorPartReducer
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import as_aiter, azip

logger = logging.getLogger(__name__)


def check_size(sender_index: int, part_index: int, tensor_part: torch.Tensor, shape: torch.Size) -> None:
    """Refuse a part of another shape than the reducer's: hivemind's sum would broadcast a one-value part across the
    whole part, and fail on others (a (1, n) part of n values too) only after counting the sender, so that the part
    never completes and every other sender waits for the reducer's timeout."""
    if tensor_part.shape != shape:
        raise AllreduceException(
            f"sender {sender_index} sent a part of shape {tuple(tensor_part.shape)} for part {part_index}, "
            f"expected {tuple(shape)}"
        )


# the largest weight a sender may declare: honest weights are sample counts (or 1 in state rounds); counts anywhere
# in the run are bounded by 2**53 (peer/swarm/progress.py)
MAX_WEIGHT = float(2**53)
FLOAT32_MAX = torch.finfo(torch.float32).max


def check_part(
    sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float, shape, num_senders: int = 1
) -> None:
    """Refuse what a mean cannot take from a sender: a part of the wrong shape, not of floating point, with values not
    finite in float32 (hivemind's sum is float32: a float64 1e300 is inf there), a weight that is not a number in
    [0, MAX_WEIGHT], or a weighted part whose share of the sum could overflow float32 (a weight of 1e36 with values of
    1000: each sender's term must stay under FLOAT32_MAX / num_senders)."""
    check_size(sender_index, part_index, tensor_part, shape)
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and 0 <= weight <= MAX_WEIGHT):
        raise AllreduceException(f"sender {sender_index} declared a weight of {weight!r}")
    if not tensor_part.is_floating_point():
        raise AllreduceException(f"sender {sender_index} sent a part of {tensor_part.dtype} for part {part_index}")
    values = tensor_part.float()
    if not bool(torch.isfinite(values).all()):
        raise AllreduceException(f"sender {sender_index} sent non-finite values in part {part_index}")
    largest = float(values.abs().max()) if values.numel() else 0.0
    if weight * largest > FLOAT32_MAX / max(num_senders, 1):
        raise AllreduceException(
            f"sender {sender_index} sent values up to {largest:.3g} at a weight of {weight:.3g} in part "
            f"{part_index}: their sum would overflow"
        )


class CheckedPartReducer(TensorPartReducer):
    """hivemind's TensorPartReducer (the weighted mean) that refuses, before counting it, a part ``check_part``
    refuses.

    Args:
        part_shapes, num_senders: as TensorPartReducer.
        sender_names: each sender's name for the log (its base58 peer id).
    """

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, sender_names: Sequence[str]):
        self.sender_names = list(sender_names)
        super().__init__(part_shapes, num_senders)

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        assert 0 <= sender_index < self.num_senders and 0 <= part_index < self.num_parts, "invalid index"
        try:
            check_part(sender_index, part_index, tensor_part, weight, self.part_shapes[part_index], self.num_senders)
        except AllreduceException as refusal:
            logger.warning(f"Refused a part from peer {self.sender_names[sender_index]} for this round: {refusal}")
            raise
        return await super().accumulate_part(sender_index, part_index, tensor_part, weight)


def refuse_non_finite_results(container: TensorPartContainer) -> None:
    """Make ``container`` refuse (AllreduceException) a reducer's result of another shape than this peer's part, not
    of floating point, or not finite: hivemind's runner then registers that reducer as failed for the rest of its
    share (this peer's own values there, which are registered unchecked: hivemind's register_failed_reducer calls
    the same method)."""
    register = container.register_processed_part

    def register_finite(peer_index: int, part_index: int, part: torch.Tensor) -> None:
        own = container._input_parts_by_peer[peer_index][part_index][0]
        if part is not own:
            if part.shape != own.shape or not part.is_floating_point():
                # hivemind would fail the whole round at its concatenation, or shift values to wrong places
                raise AllreduceException(
                    f"reducer {peer_index} returned a part of shape {tuple(part.shape)} and {part.dtype} for part "
                    f"{part_index}, expected {tuple(own.shape)}"
                )
            if not bool(torch.isfinite(part).all()):
                raise AllreduceException(f"reducer {peer_index} returned non-finite values for part {part_index}")
        register(peer_index, part_index, part)

    container.register_processed_part = register_finite


class CheckedAllReduceRunner(AllReduceRunner):
    """hivemind's AllReduceRunner (1.1.12) whose reducer is ``make_reducer()``'s (CheckedPartReducer here) and
    whose received results must be finite (module docstring)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # nothing ran yet (the runner's tasks start when it is iterated), so hivemind's reducer is replaced; marked
        # finished first, or its __del__ logs "received 0.0% of input tensors" on every round
        self.tensor_part_reducer.finished.set()
        self.tensor_part_reducer = self.make_reducer()
        refuse_non_finite_results(self.tensor_part_container)

    def make_reducer(self) -> TensorPartReducer:
        shapes = tuple(part.shape for part in self.parts_for_local_averaging)
        names = [peer_id.to_base58() for peer_id in self.sender_peer_ids]
        return CheckedPartReducer(shapes, len(self.sender_peer_ids), names)

    async def own_result(self, part_index: int, own_part: torch.Tensor, reduced: torch.Tensor) -> torch.Tensor:
        """What this peer registers for a part of its own share, reduced to ``reduced``: hivemind's difference."""
        return reduced - own_part

    async def _communicate_with_peer(self, peer_id):
        if peer_id != self.peer_id:
            await super()._communicate_with_peer(peer_id)  # a refused reply: hivemind fails that reducer
            return
        await self._reduce_own_share()

    async def _reduce_own_share(self) -> None:
        """hivemind's own path of _communicate_with_peer (1.1.12), which has no failure handling: a part of this
        peer's refused by its own reducer (the others' parts waited for it) bans this peer as a sender and keeps its
        own values for the rest of its share, and a result this peer cannot take (not finite: another sender's doing)
        keeps its own values for that part, while its own parts go on being reduced for the others."""
        container = self.tensor_part_container
        peer_index = self.ordered_peer_ids.index(self.peer_id)
        sender_index = self.sender_peer_ids.index(self.peer_id)
        for part_index, own_part in enumerate(self.parts_for_local_averaging):
            try:
                reduced = await self.tensor_part_reducer.accumulate_part(
                    sender_index, part_index, own_part, weight=self.weight
                )
            except AllreduceException:  # refused, banned in background, or the round is over
                await self._ban_sender(self.peer_id)
                if not container.finished.is_set():
                    container.register_failed_reducer(peer_index)
                raise
            try:
                result = await self.own_result(part_index, own_part, reduced)
            except Exception as error:  # noqa: BLE001 - whatever it was, this part is not left unregistered
                logger.warning(f"This peer's own share: part {part_index} could not be taken ({error!r})")
                result = None
            if result is None or not bool(torch.isfinite(result).all()):
                logger.warning(
                    f"This peer's own share reduced to non-finite values in part {part_index}: keeping its own"
                )
                result = own_part if not container.return_deltas else torch.zeros_like(own_part)
            container.register_processed_part(peer_index, part_index, result)


def runner_options(averager, tensors, group_info: GroupInfo, group_id: bytes, **kwargs) -> dict:
    """The arguments hivemind's _run_allreduce_inplace_ (1.1.12) builds its AllReduceRunner with."""
    return dict(
        p2p=averager._p2p,
        servicer_type=type(averager),
        prefix=averager.prefix,
        tensors=tensors,
        group_id=group_id,
        ordered_peer_ids=group_info.peer_ids,
        **kwargs,
    )


def register_runner(averager, runner: AllReduceRunner, group_id: bytes) -> None:
    """Hand ``runner`` to the averager's group (hivemind's _run_allreduce_inplace_ does so before running it)."""
    assert group_id in averager._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
    averager._running_groups[group_id].set_result(runner)


def start_runner(averager, runner_class, tensors, group_info: GroupInfo, group_id: bytes | None = None, **kwargs):
    """``runner_class`` built as hivemind's _run_allreduce_inplace_ (1.1.12) builds its AllReduceRunner (``kwargs``
    passed on: hivemind's and the class's own), and handed to the averager's group."""
    group_id = group_info.group_id if group_id is None else group_id
    runner = runner_class(**runner_options(averager, tensors, group_info, group_id, **kwargs))
    register_runner(averager, runner, group_id)
    return runner


async def run_inplace(averager, runner, tensors, group_info, apply: Callable[[torch.Tensor, torch.Tensor], None]):
    """The rest of hivemind's _run_allreduce_inplace_: each output of ``runner`` applied to its tensor with
    ``apply(tensor, output)`` as it arrives (an aux peer receives none)."""
    if runner.modes[group_info.peer_ids.index(averager.peer_id)] == AveragingMode.AUX:
        async for _ in runner:
            raise ValueError("aux peers should not receive averaged tensors")
        return
    async for tensor, output in azip(as_aiter(*tensors), runner):
        apply(tensor, output)
        averager.last_updated = get_dht_time()
        averager._state_updated.set()


async def collect_outputs(averager, runner, group_info) -> list[torch.Tensor]:
    """Every output of ``runner``, in the order of its tensors, once all are in (an aux peer receives none: [])."""
    if runner.modes[group_info.peer_ids.index(averager.peer_id)] == AveragingMode.AUX:
        async for _ in runner:
            raise ValueError("aux peers should not receive averaged tensors")
        return []
    return [output async for output in runner]


class CheckedRounds:
    """Averager mixin: its all-reduce rounds run a CheckedAllReduceRunner (hivemind's rounds otherwise unchanged:
    members add the differences their reducers reply)."""

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id: bytes | None = None, **kwargs):
        runner = start_runner(self, CheckedAllReduceRunner, tensors, group_info, group_id, **kwargs)
        alpha = self._averaging_alpha
        await run_inplace(self, runner, tensors, group_info, lambda tensor, delta: tensor.add_(delta, alpha=alpha))
