"""A member's non-finite part or bad weight is refused by every reducer, and a reducer's non-finite reply by every
member: the rest of the group averages without it (real DHTs, real averagers, a real attacking member).

On plain hivemind (the control) the same member makes every member's result NaN, or the mean as large as it likes.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.partition import AllreduceException, TensorPartContainer, TensorPartReducer

from peer.hivemind_gaps.averagers import HivemindHandleNames
from peer.hivemind_gaps.checked_parts import (
    CheckedPartReducer,
    CheckedRounds,
    check_part,
    refuse_non_finite_results,
    run_inplace,
    start_runner,
)
from peer.hivemind_gaps.mean_replies import MeanReplies, MeanReplyRunner
from tests.peer.test_averager_guard import PlainAverager
from tests.peer.test_equal_shares import SIZE, BigSwarm

HONEST_VALUES = (1.0, 3.0)
HONEST_MEAN = 2.0


class CheckedAverager(HivemindHandleNames, CheckedRounds, DecentralizedAverager):
    """hivemind's base averager with the checked rounds every averager of the swarm runs (averagers.py)."""


class DeclaredWeight(PlainAverager):
    """A member declaring ``declared`` as its weight (hivemind's step refuses a negative weight; its runner sends
    whatever it is given)."""

    declared = 1.0

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        kwargs["weight"] = self.declared
        return await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)


class NegativeWeight(DeclaredWeight):
    """-0.999 with parts of 1000: hivemind's mean of (1, 3, 1000) is then (1 + 3 - 999) / 1.001."""

    declared = -0.999


class NaNWeight(DeclaredWeight):
    declared = float("nan")


class HugeWeight(DeclaredWeight):
    """1e36 with parts of 1000: finite, but hivemind's float32 sum overflows to inf."""

    declared = 1e36


class MeanRepliesAverager(HivemindHandleNames, MeanReplies, CheckedRounds, DecentralizedAverager):
    """The local-steps averager's rounds (OuterAverager's composition, without its state serving)."""


class MeanRepliesNegativeWeight(HivemindHandleNames, MeanReplies, DecentralizedAverager):
    """A member of mean-reply rounds (it declares the protocol) sending parts of 1000 with a weight of -0.999."""

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        kwargs["weight"] = -0.999
        return await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)


class UncheckedMeanReplyRunner(MeanReplyRunner):
    """A mean-reply reducer with hivemind's unchecked mean: its own NaN part makes its replies NaN."""

    def make_reducer(self) -> TensorPartReducer:
        shapes = tuple(part.shape for part in self.parts_for_local_averaging)
        return TensorPartReducer(shapes, len(self.sender_peer_ids))


class MeanRepliesNaN(HivemindHandleNames, MeanReplies, DecentralizedAverager):
    """A member of mean-reply rounds sending NaN parts, and replying NaN to every sender of its own share."""

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        options = dict(reply_feedback=self._reply_feedback, **kwargs)
        runner = start_runner(self, UncheckedMeanReplyRunner, tensors, group_info, group_id, **options)
        await run_inplace(self, runner, tensors, group_info, lambda tensor, result: tensor.copy_(result))


ATTACKS = {  # attacker class, the value of its parts
    "nan-part": (PlainAverager, float("nan")),
    "nan-weight": (NaNWeight, 1000.0),
    "huge-weight": (HugeWeight, 1000.0),
    "negative-weight": (NegativeWeight, 1000.0),
    "mean-replies-negative-weight": (MeanRepliesNegativeWeight, 1000.0),
    "mean-replies-nan": (MeanRepliesNaN, float("nan")),
}
# the attacks whose reducer's own share is not finite: each honest member keeps its own values there
NON_FINITE_SHARE = ("nan-part", "nan-weight", "huge-weight", "mean-replies-nan")


def one_round(swarm: BigSwarm, honest_class, attack: str) -> list[torch.Tensor]:
    """Two honest members (HONEST_VALUES) and the attacker average once; the honest members' results."""
    attacker_class, value = ATTACKS[attack]
    members = [swarm.averager(honest_class, index, own) for index, own in enumerate(HONEST_VALUES)]
    members.append(swarm.averager(attacker_class, 2, value))
    rounds = [each.step(gather=index, timeout=40, wait=False) for index, each in enumerate(members)]
    for future in rounds[:2]:
        assert len(future.result(timeout=60)) == 3, "the honest members did not average in a group of three"
    with contextlib.suppress(Exception):  # the attacker's own round may fail: it was banned
        rounds[2].result(timeout=60)
    results = []
    for each in members[:2]:
        with each.get_tensors() as tensors:
            results.append(tensors[0].clone())
    return results


@pytest.fixture
def swarm_of_three():
    made = BigSwarm(3)  # vectors of SIZE values
    yield made
    made.shutdown()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_reducer_refuses_a_bad_part_or_weight_and_a_member_a_non_finite_reply(swarm_of_three, attack):
    honest_class = MeanRepliesAverager if attack.startswith("mean-replies") else CheckedAverager
    results = one_round(swarm_of_three, honest_class, attack)
    for own, result in zip(HONEST_VALUES, results, strict=True):
        assert bool(torch.isfinite(result).all()), f"{attack}: a non-finite value reached an honest member"
        averaged = int((result == HONEST_MEAN).sum())
        # the two honest reducers' shares: the honest mean, the attacker's part refused
        assert averaged >= 0.6 * SIZE, f"{attack}: only {averaged} of {SIZE} values hold the honest mean"
        rest = result[result != HONEST_MEAN]
        print(f"{attack}: {averaged} values averaged without the attacker, the rest {rest.unique()[:4].tolist()}")
        if attack in NON_FINITE_SHARE:
            # the attacker's own share: its (unchecked) reducer's mean was not finite, refused: this member's own
            # values there
            assert rest.numel() > 0 and bool((rest == own).all()), rest.unique()[:4]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", [attack for attack in ATTACKS if not attack.startswith("mean-replies")])
def test_hiveminds_rounds_take_the_bad_part_control(swarm_of_three, attack):
    results = one_round(swarm_of_three, PlainAverager, attack)
    for result in results:
        poisoned = not bool(torch.isfinite(result).all()) or int((result == HONEST_MEAN).sum()) == 0
        assert poisoned, f"{attack}: plain hivemind averaged without the attacker"
        if attack == "negative-weight":
            assert float(result.abs().max()) > 900, "the negative weight did not blow up hivemind's mean"
        if attack in NON_FINITE_SHARE:
            assert not bool(torch.isfinite(result).all()), f"{attack}: hivemind's result stayed finite"


@pytest.mark.timeout(120)
def test_a_mean_of_zero_weights_leaves_every_member_its_own_values(swarm_of_three):
    """Every member declaring 0 (no samples): each reducer's mean is 0/0. Each member keeps its own values, its own
    share included (the own-share path hivemind leaves unhandled), and the round completes."""
    members = [swarm_of_three.averager(CheckedAverager, index, float(index + 1)) for index in range(3)]
    rounds = [each.step(gather=index, weight=0.0, timeout=40, wait=False) for index, each in enumerate(members)]
    for future in rounds:
        assert len(future.result(timeout=60)) == 3
    for index, each in enumerate(members):
        with each.get_tensors() as tensors:
            assert torch.equal(tensors[0], torch.full((SIZE,), float(index + 1)))


@pytest.mark.parametrize(
    ("part", "weight", "problem"),
    [
        (torch.ones(4), float("nan"), "declared a weight of nan"),
        (torch.ones(4), -1.0, "declared a weight of -1.0"),
        (torch.ones(4), float("inf"), "declared a weight of inf"),
        (torch.zeros(4), 1e39, "declared a weight of 1e\\+39"),  # beyond float32: hivemind's add_ raises
        (torch.full((4,), 1e24), 1e15, "values up to 1e\\+24 at a weight of 1e\\+15 .* would overflow"),
        (torch.full((4,), 3e38), 10.0, "would overflow"),
        (torch.full((4,), 1e300, dtype=torch.float64), 1.0, "non-finite values in part 0"),  # inf in float32
        (torch.ones(4, dtype=torch.complex64), 1.0, "a part of torch.complex64"),
        (torch.ones(4, dtype=torch.int32), 1.0, "a part of torch.int32"),
        (torch.tensor([1.0, float("inf"), 0.0, 0.0]), 1.0, "non-finite values in part 0"),
        (torch.ones(1), 1.0, r"sent a part of shape \(1,\) for part 0, expected \(4,\)"),
        (torch.ones(1, 4), 1.0, r"shape \(1, 4\)"),  # 4 values, but hivemind's sum would fail after counting them
    ],
)
def test_the_checks_name_the_problem(part, weight, problem):
    with pytest.raises(AllreduceException, match=problem):
        check_part(2, 0, part, weight, torch.Size([4]), num_senders=3)
    check_part(2, 0, torch.ones(4), 0.0, torch.Size([4]))  # a zero weight is a member's right (no samples)
    check_part(2, 0, torch.ones(4), np.float64(64.0), torch.Size([4]))  # a sample count as numpy gives it
    check_part(2, 0, torch.ones(4, dtype=torch.float16), 4096, torch.Size([4]), num_senders=3)


def test_the_checked_reducer_averages_the_parts_it_takes():
    async def reduce() -> torch.Tensor:
        reducer = CheckedPartReducer([torch.Size([4])], 3, ["a", "b", "c"])
        first = asyncio.create_task(reducer.accumulate_part(0, 0, torch.full((4,), 1.0), weight=1.0))
        with pytest.raises(Exception, match="declared a weight of -1.0"):
            await reducer.accumulate_part(2, 0, torch.full((4,), 1000.0), weight=-1.0)
        reducer.on_sender_failed(2)  # what hivemind's runner does for a refused sender
        second = asyncio.create_task(reducer.accumulate_part(1, 0, torch.full((4,), 3.0), weight=3.0))
        return (await asyncio.gather(first, second))[0]

    assert torch.equal(asyncio.run(reduce()), torch.full((4,), 2.5))


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (torch.ones(3), r"returned a part of shape \(3,\)"),
        (torch.ones(1, 4), r"returned a part of shape \(1, 4\)"),
        (torch.ones(4, dtype=torch.complex64), "complex64"),
        (torch.tensor([1.0, float("nan"), 0.0, 0.0]), "returned non-finite values for part 0"),
    ],
)
def test_a_member_refuses_a_reply_of_another_shape_dtype_or_non_finite(reply, problem):
    container = TensorPartContainer([torch.ones(4)], peer_fractions=(1.0,), return_deltas=True)
    refuse_non_finite_results(container)
    with pytest.raises(AllreduceException, match=problem):
        container.register_processed_part(0, 0, reply)
    container.register_processed_part(0, 0, torch.zeros(4))  # a reply as it should be
