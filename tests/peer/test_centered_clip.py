"""CenteredClip on crafted parts, and hivemind's reducer replaced by it: the mean without outliers, one outlier's
pull bounded by tau, NaN/inf and lying weights as outliers, weights respected, scores that single out the outlier."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.averaging.partition import AllreduceException, TensorPartReducer

from peer.hivemind_gaps.robust_allreduce import CenteredClipReducer
from peer.swarm.centered_clip import MAX_SCORE, ClipSettings, centered_clip, coordinate_median
from peer.swarm.config import OptimConfig
from tests.peer import byzantine

DIM = 4096


def honest_parts(count: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Gradient-like parts: a shared signal plus per-peer noise of the same size."""
    generator = torch.Generator().manual_seed(seed)
    signal = torch.randn(DIM, generator=generator)
    return signal + scale * torch.randn(count, DIM, generator=generator)


def test_without_outliers_it_is_the_weighted_mean():
    """Exactly, once every part lies within tau of the centre (here: tau at 1.5 median distances); at the default
    tau (one median distance) the farthest honest parts are pulled in a little."""
    parts, weights = honest_parts(5), torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0])
    expected = (weights @ parts) / weights.sum()
    result = centered_clip(parts, weights, ClipSettings(tau_factor=1.5))
    assert torch.allclose(result.centre, expected, atol=1e-5)
    assert max(result.scores) < 1.5 and min(result.scores) > 0.5, result.scores
    default = centered_clip(parts, weights).centre
    spread = float((parts - expected).norm(dim=1).mean())
    assert float((default - expected).norm()) < 0.05 * spread


@pytest.mark.parametrize("magnitude", [10.0, 1e3, 1e6, 1e30])
def test_one_outlier_moves_the_result_by_at_most_about_tau(magnitude):
    honest = honest_parts(4)
    outlier = -magnitude * honest.mean(dim=0, keepdim=True)  # a sign flip, scaled
    parts = torch.cat([honest, outlier])
    settings = ClipSettings()
    result = centered_clip(parts, torch.ones(5), settings)
    clean = centered_clip(honest, torch.ones(4), settings).centre
    spread = float((honest - coordinate_median(honest)).norm(dim=1).median())
    pull = float((result.centre - clean).norm())
    # one of five equal weights clipped to tau moves the fixed point by tau/5 per iteration at most, and the four
    # honest senders pull it back: measured ~0.2-0.4 tau; the mean moves by |outlier|/5, up to 1e29 here
    assert pull <= settings.tau_factor * spread * 0.5, (pull, spread)
    mean_pull = float((parts.mean(dim=0) - clean).norm())
    print(f"x{magnitude:g}: CenteredClip pulled {pull / spread:.3f} spreads, the mean {mean_pull / spread:.3g}")
    assert pull < mean_pull
    assert result.scores[4] == max(result.scores) and result.scores[4] > 3, result.scores


def test_two_far_senders_of_five_are_left_out_where_clipping_alone_turns_the_result():
    """Two sign flippers x1000 of five, at a low signal-to-noise ratio (the spread 3x the signal, as small batches
    give): left out, the result is the three honest parts' CenteredClip exactly; clipped only (reject_factor inf),
    each pulls by tau and the result turns away from the honest mean."""
    honest = honest_parts(3, seed=2, scale=3.0)
    flippers = -1000 * honest[:2]
    parts, weights = torch.cat([honest, flippers]), torch.ones(5)
    result = centered_clip(parts, weights)
    alone = centered_clip(honest, torch.ones(3)).centre
    assert torch.allclose(result.centre, alone, atol=1e-5)
    assert min(result.scores[3:]) > 100 * max(result.scores[:3]), result.scores

    clipped_only = centered_clip(parts, weights, ClipSettings(reject_factor=float("inf"))).centre
    cosine = torch.nn.functional.cosine_similarity
    honest_mean = honest.mean(dim=0)
    kept, turned = float(cosine(result.centre, honest_mean, dim=0)), float(cosine(clipped_only, honest_mean, dim=0))
    print(f"cosine to the honest mean: {kept:.3f} left out, {turned:.3f} clipped only")
    assert kept > 0.95 and turned < kept - 0.1


def test_a_far_honest_part_within_the_radius_is_kept_and_an_attacker_just_inside_is_clipped():
    """Nothing within reject_factor median distances is left out: an honest part at 9x (as sparse embedding rows
    give with 8 peers) still counts, and an attacker just inside the radius pulls by about tau, as without the rule."""
    honest = honest_parts(5, seed=3)
    centre = coordinate_median(honest)
    spread = float((honest - centre).norm(dim=1).median())
    direction = torch.randn(DIM, generator=torch.Generator().manual_seed(4))
    direction /= direction.norm()
    for distance in (9.0, 29.0):
        outer = (centre + distance * spread * direction)[None]
        result = centered_clip(torch.cat([honest, outer]), torch.ones(6))
        without = centered_clip(honest, torch.ones(5)).centre
        assert not torch.allclose(result.centre, without, atol=1e-3), f"the part at {distance}x was left out"
        assert float((result.centre - without).norm()) <= 0.5 * spread, distance


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_part_is_an_outlier_not_a_poison(poison):
    honest = honest_parts(3)
    bad = honest[:1].clone()
    bad[0, 17] = poison
    result = centered_clip(torch.cat([honest, bad]), torch.ones(4))
    assert torch.isfinite(result.centre).all()
    assert torch.allclose(result.centre, centered_clip(honest, torch.ones(3)).centre, atol=1e-5)
    assert result.scores[3] == MAX_SCORE


def test_a_lying_weight_is_capped_and_a_nonsense_weight_ignored():
    honest = honest_parts(4)
    attacker = 1e3 * honest.mean(dim=0, keepdim=True)
    parts = torch.cat([honest, attacker])
    fair = centered_clip(parts, torch.ones(5)).centre
    for weight in (1e9, float("inf")):
        lying = centered_clip(parts, torch.tensor([1.0, 1.0, 1.0, 1.0, weight])).centre
        # capped at 4x the median weight (1): the same as an honest peer of weight 4, not 1e9
        assert torch.isfinite(lying).all()
        assert float((lying - fair).norm()) < float((attacker[0] - fair).norm()) * 1e-2
    ignored = centered_clip(parts, torch.tensor([1.0, 1.0, 1.0, 1.0, float("nan")])).centre
    assert torch.allclose(ignored, centered_clip(honest, torch.ones(4)).centre, atol=1e-5)


def test_nothing_finite_gives_nan_for_the_update_guard_to_refuse():
    result = centered_clip(torch.full((3, 8), float("nan")), torch.ones(3))
    assert torch.isnan(result.centre).all() and result.scores == [MAX_SCORE] * 3


@pytest.mark.parametrize("senders", [1, 2, 3, 8, 9, 64, 65, 70])
def test_the_median_is_torch_sorts_on_both_sides_of_the_sorting_network_threshold(senders):
    parts = torch.randn(senders, 513)
    parts[:, 0] = 1.0  # ties
    ordered = parts.sort(dim=0).values
    middle = (ordered[(senders - 1) // 2] + ordered[senders // 2]) / 2
    assert torch.equal(coordinate_median(parts), middle)


def test_identical_and_single_parts():
    same = torch.ones(3, 8)
    assert torch.equal(centered_clip(same, torch.ones(3)).centre, torch.ones(8))
    one = torch.arange(8.0)[None]
    assert torch.equal(centered_clip(one, torch.ones(1)).centre, one[0])


def test_the_reducer_returns_the_robust_average_and_scores_each_sender():
    async def reduce() -> tuple[list[torch.Tensor], dict[int, float]]:
        honest = honest_parts(3, seed=1)
        senders = [*honest, -1000 * honest.mean(dim=0)]
        reducer = CenteredClipReducer([torch.Size([DIM // 2]), torch.Size([DIM // 2])], 4, ClipSettings())
        tasks = [
            reducer.accumulate_part(sender, index, part.view(2, -1)[index], weight=1.0)
            for index in range(2)
            for sender, part in enumerate(senders)
        ]
        results = await asyncio.gather(*tasks)
        return results, reducer.mean_scores()

    results, scores = asyncio.run(reduce())
    honest = honest_parts(3, seed=1)
    senders = torch.cat([honest, -1000 * honest.mean(dim=0, keepdim=True)])
    for index, half in enumerate(senders.chunk(2, dim=1)):  # each part is clipped on its own
        assert torch.allclose(results[4 * index], centered_clip(half, torch.ones(4)).centre, atol=1e-5)
    assert max(scores, key=scores.get) == 3 and scores[3] > 100, scores


def test_the_reducer_scores_nothing_for_a_sender_that_failed():
    async def reduce() -> tuple[torch.Tensor, dict[int, float]]:
        reducer = CenteredClipReducer([torch.Size([DIM])], 4, ClipSettings())
        reducer.on_sender_failed(3)
        parts = honest_parts(3)
        results = await asyncio.gather(*(reducer.accumulate_part(i, 0, parts[i]) for i in range(3)))
        return results[0], reducer.mean_scores()

    result, scores = asyncio.run(reduce())
    assert torch.allclose(result, centered_clip(honest_parts(3), torch.ones(3)).centre) and set(scores) == {0, 1, 2}


def test_two_senders_are_averaged_but_not_scored():
    """Each of two senders is as far from their midpoint: no majority can tell which one lies."""

    async def reduce() -> tuple[torch.Tensor, dict[int, float]]:
        reducer = CenteredClipReducer([torch.Size([DIM])], 2, ClipSettings())
        parts = honest_parts(2)
        results = await asyncio.gather(*(reducer.accumulate_part(i, 0, parts[i]) for i in range(2)))
        return results[0], reducer.mean_scores()

    result, scores = asyncio.run(reduce())
    assert torch.allclose(result, honest_parts(2).mean(dim=0), atol=1e-5) and scores == {}


def test_a_part_of_another_size_fails_its_sender_alone():
    """A hostile sender's part of DIM + 1 values is refused before it is counted; the other three get their result
    once hivemind's runner reports that sender failed (as it does for the exception)."""

    async def reduce() -> tuple[torch.Tensor, str]:
        reducer = CenteredClipReducer([torch.Size([DIM])], 4, ClipSettings())
        with pytest.raises(AllreduceException, match=rf"sender 3 sent a part of shape \({DIM + 1},\)") as refused:
            await reducer.accumulate_part(3, 0, torch.zeros(DIM + 1))
        reducer.on_sender_failed(3)
        parts = honest_parts(3)
        results = await asyncio.gather(*(reducer.accumulate_part(i, 0, parts[i]) for i in range(3)))
        return results[0], str(refused.value)

    result, _ = asyncio.run(reduce())
    assert torch.allclose(result, centered_clip(honest_parts(3), torch.ones(3)).centre)


def reduce_one_part(make_reducer, parts: torch.Tensor) -> torch.Tensor:
    async def reduce() -> torch.Tensor:
        reducer = make_reducer()  # in the event loop: hivemind's reducer binds its futures to it
        results = await asyncio.gather(*(reducer.accumulate_part(i, 0, part) for i, part in enumerate(parts)))
        return results[0]

    return asyncio.run(reduce())


def test_hiveminds_reducer_lets_one_sender_drag_the_average():
    """Gap 15 on plain hivemind: its reducer returns the mean, so one sender of four sets it wherever it likes;
    the CenteredClipReducer on the same parts stays with the honest senders."""
    honest = honest_parts(3)
    target = torch.full((DIM,), 1e6)
    parts = torch.cat([honest, (4 * target - honest.sum(dim=0))[None]])  # chosen so that the mean is the target
    hiveminds = reduce_one_part(lambda: TensorPartReducer([torch.Size([DIM])], 4), parts)
    assert torch.allclose(hiveminds, target, rtol=1e-3)
    ours = reduce_one_part(lambda: CenteredClipReducer([torch.Size([DIM])], 4, ClipSettings()), parts)
    assert float((ours - honest.mean(dim=0)).norm()) < float((honest - honest.mean(dim=0)).norm(dim=1).mean())


def test_the_aggregation_setting_is_checked_and_mean_by_default():
    assert OptimConfig().aggregation == "mean"
    assert OptimConfig(aggregation="centered-clip").aggregation == "centered-clip"
    with pytest.raises(ValueError, match="aggregation must be one of"):
        OptimConfig(aggregation="median")


@pytest.mark.parametrize("attack", ["sign-flip", "constant", "gaussian"])
def test_each_attack_of_the_test_attacker_is_finite_and_1000x_the_honest_norm(attack):
    """tests/peer/byzantine.py's corruptions on a real model's gradient: outside the honest spread by the same
    factor, finite (they pass hivemind's and the update guard's finiteness checks), the constant one fixed."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    model(torch.randn(32, 16)).square().mean().backward()
    honest = [param.grad.clone() for param in model.parameters()]
    direction = byzantine.unit_direction(model, seed=1)
    byzantine.corrupt(model, attack, 1000.0, direction)
    sent = [param.grad.clone() for param in model.parameters()]
    ratio = byzantine.gradient_norm(model) / float(torch.sqrt(sum((grad**2).sum() for grad in honest)))
    assert all(torch.isfinite(grad).all() for grad in sent) and 800 < ratio < 1200, ratio
    if attack == "sign-flip":
        assert all(torch.equal(grad, -1000 * before) for grad, before in zip(sent, honest))
    if attack == "constant":
        cosine = sum((grad * fixed).sum() for grad, fixed in zip(sent, direction)) / byzantine.gradient_norm(model)
        assert float(cosine) > 0.999
