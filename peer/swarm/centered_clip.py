"""CenteredClip: a robust weighted average of the parts a reducer receives, and a score for every sender.

The algorithm (Karimireddy et al. 2021, "Learning from History for Byzantine Robust Optimization"; run per reducer
part of the butterfly all-reduce in BTARD, Gorbunov et al., arXiv 2106.11257): start from the coordinate-wise median
of the finite parts and repeat ``c <- c + sum_i w_i clip_tau(x_i - c) / sum_i w_i``, where ``clip_tau`` shrinks a
vector longer than ``tau`` to length ``tau``, until ``c`` moves by less than ``tolerance * tau`` or ``max_iterations``
is reached. One sender moves the result by at most about ``tau * w_i / sum_w`` however far it lies, so a minority of
senders cannot drag the average away; when every part lies within ``tau`` of the centre, the result is the weighted
mean exactly (honest parts far from the others are pulled in a little: the result departs slightly from the mean).

``tau`` is relative to the honest spread: ``tau_factor`` times the median over senders of their distance to the
median. A part with any NaN/inf counts as an outlier (weight 0, worst score). Weights (a sender's sample count, which
the sender itself declares) are capped at ``max_weight_ratio`` times the median weight: an uncapped weight of 1e9
would let one clipped sender win every iteration.

Before clipping, a part farther than ``reject_factor`` median distances from the coordinate-wise median is left out
(weight 0, like a non-finite part), and the median and tau are taken again without it. Clipping alone bounds a far
part's pull by about tau, but tau is the honest spread, which at small batches is larger than the mean gradient
itself: two far senders of five, each pulling by tau, still turned the result away from the honest mean (cosine
0.58). No honest part was measured beyond 9.3 median distances; a blunt attack (a sign flip x1000) lies at ~1000.

What it cannot withstand: half or more of the (capped) weight sent by attackers (the median is theirs); attacks
that hide inside the honest spread (ALIE, IPM): a part within ``tau`` of the centre is averaged in as it is; and an
attacker that knows the rule and stays just inside ``reject_factor`` median distances pulls by tau, as without it.

A sender's score is its distance to the centre in median distances, plus ``DISSENT_WEIGHT`` times its dissent: the
cosine of its part to the centre, negated, when negative. Distance alone misses inner-product manipulation (IPM),
whose small part lies nearer the centre than honest ones but points against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Measured on the tiny preset's real gradients (8-sample batches cut into hivemind's parts; docs/robust-aggregation.md,
# tests/benchmarks/bench_centered_clip.py). Honest parts are noisy: the farthest lies at up to 3.4x the median
# distance with 4-5 peers, 9.3x with 8 (sparse embedding rows), and the mean gradient is small against that spread.
# So the bias one attacker can cause, about its weight share times tau, must stay below the mean: with 3 honest
# peers and a sign flipper (its own gradient x -1000), the result's cosine to the honest mean is 0.94 at 0.5, 0.94 at
# 1.0, 0.76 at 2.0, 0.56 at 3.0. Without attackers, 1.0 stays within cosine 0.997 of the mean (4 and 8 peers).
DEFAULT_TAU_FACTOR = 1.0
# Measured (same benchmark): at tau 1.0 every part converges (moves less than TOLERANCE * tau) within 7 iterations
# on honest parts, 9-10 with flippers; at 0.5 honest parts take up to 15 and hostile ones reach the cap. BTARD used ~20.
DEFAULT_MAX_ITERATIONS = 20
DEFAULT_TOLERANCE = 1e-3
DEFAULT_MAX_WEIGHT_RATIO = 4.0
# Honest parts lie at up to 3.4 (4-5 peers) and 9.3 (8 peers) median distances (above); the monitor calls a sender
# suspect above 10. Three times the farthest honest part measured keeps honest parts in; sign flips x1000 lie at ~1000.
DEFAULT_REJECT_FACTOR = 30.0
# The score of a non-finite part, or of any part when the honest spread is zero and the part is elsewhere
MAX_SCORE = 1e6
# Measured on the tiny preset's real gradients (3 honest senders and 2 IPM senders sending -0.1 x the mean of their
# own 4 gradients, hivemind's parts; median over parts): IPM's distance score 0.67 against honest 1.0-1.3, so distance
# ranks it last; its cosine to the centre -0.55 (no part above +0.05) against honest +0.64 to +0.78 (no part below
# +0.2; 5 honest senders: no part below +0.2 either). At 10 its score is ~6: above every honest sender, short of the
# monitor's suspicion threshold (10) on its own.
DISSENT_WEIGHT = 10.0


@dataclass(frozen=True)
class ClipSettings:
    """How CenteredClip clips and when it stops.

    Args:
        tau_factor: clipping radius as a multiple of the median distance of the parts to their coordinate-wise median.
        max_iterations: most clipped-centering iterations per part.
        tolerance: stop once the centre moves by less than this fraction of tau.
        max_weight_ratio: a sender's weight counts at most this multiple of the median weight.
        reject_factor: a part farther than this many median distances from the median is left out (inf: none is).
    """

    tau_factor: float = DEFAULT_TAU_FACTOR
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    tolerance: float = DEFAULT_TOLERANCE
    max_weight_ratio: float = DEFAULT_MAX_WEIGHT_RATIO
    reject_factor: float = DEFAULT_REJECT_FACTOR

    def __post_init__(self):
        if not (
            self.tau_factor > 0
            and self.max_iterations >= 1
            and self.tolerance >= 0
            and self.max_weight_ratio > 0
            and self.reject_factor >= 1
        ):
            raise ValueError(f"CenteredClip settings out of range: {self}")


@dataclass
class ClipResult:
    """The robust average of one part, each sender's score (distance to it over the median distance) and the
    iterations it took."""

    centre: torch.Tensor
    scores: list[float]
    iterations: int


# Up to this many senders, n elementwise min/max sweeps beat torch.sort along dim 0: 8-13x fewer CPU seconds for 3-24
# senders, 4.3x at 64 (one 2**19-byte part each, one thread; tests/benchmarks/bench_centered_clip.py)
SORTING_NETWORK_MAX_ROWS = 64


def sorted_rows(parts: torch.Tensor) -> list[torch.Tensor]:
    """The rows sorted coordinate-wise (row k holds each coordinate's k-th smallest value)."""
    if parts.shape[0] > SORTING_NETWORK_MAX_ROWS:
        return list(parts.sort(dim=0).values)
    rows = list(parts)
    for sweep in range(len(rows)):  # odd-even transposition sort: len(rows) sweeps sort any input
        for index in range(sweep % 2, len(rows) - 1, 2):
            rows[index], rows[index + 1] = (
                torch.minimum(rows[index], rows[index + 1]),
                torch.maximum(rows[index], rows[index + 1]),
            )
    return rows


def coordinate_median(parts: torch.Tensor) -> torch.Tensor:
    """The coordinate-wise median of the rows (the mean of the two middle values for an even count)."""
    ordered = sorted_rows(parts)
    count = parts.shape[0]
    if count % 2:
        return ordered[count // 2].clone()
    return (ordered[count // 2 - 1] + ordered[count // 2]) / 2


def capped_weights(weights: torch.Tensor, finite: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """Weights of finite senders, each at most ``max_ratio`` times their median; 0 for non-finite parts or weights."""
    usable = finite & torch.isfinite(weights) & (weights > 0)
    capped = torch.zeros_like(weights)
    if usable.any():
        limit = max_ratio * weights[usable].median()
        capped[usable] = weights[usable].clamp(max=limit)
    return capped


def median_and_spread(parts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The coordinate-wise median of the parts and the median of their distances to it."""
    centre = coordinate_median(parts)
    return centre, float((parts - centre).norm(dim=1).median())


def clipped_step(parts: torch.Tensor, weights: torch.Tensor, centre: torch.Tensor, tau: float) -> torch.Tensor:
    """``sum_i w_i clip_tau(x_i - c) / sum_i w_i``: how far one iteration moves the centre."""
    offsets = parts - centre
    distances = offsets.norm(dim=1)
    # a part at the centre has no direction to clip, and with tau == 0 (identical parts) nothing moves
    shrink = torch.where(distances > tau, tau / distances.clamp(min=torch.finfo(parts.dtype).tiny), 1.0)
    return (weights * shrink) @ offsets / weights.sum()


def centered_clip(parts: torch.Tensor, weights: torch.Tensor, settings: ClipSettings = ClipSettings()) -> ClipResult:
    """CenteredClip of ``parts`` (senders x values) with per-sender ``weights``; see the module docstring.

    If no part is finite there is nothing to trust: the centre is NaN, so the step it feeds is refused downstream
    (peer/hivemind_gaps/update_guard.py) instead of being taken on made-up values.
    """
    parts = parts.float()
    finite = torch.isfinite(parts).all(dim=1)
    weights = capped_weights(weights.float(), finite, settings.max_weight_ratio)
    if not (weights > 0).any():
        return ClipResult(torch.full(parts.shape[1:], float("nan")), [MAX_SCORE] * parts.shape[0], 0)
    trusted, trusted_weights = parts[weights > 0], weights[weights > 0]
    centre, spread = median_and_spread(trusted)
    far = (trusted - centre).norm(dim=1) > settings.reject_factor * spread
    if far.any():  # at most half of the parts: the median distance's own part and those nearer stay
        trusted, trusted_weights = trusted[~far], trusted_weights[~far]
        centre, spread = median_and_spread(trusted)
    tau = settings.tau_factor * spread
    iterations = 0
    while iterations < settings.max_iterations:
        move = clipped_step(trusted, trusted_weights, centre, tau)
        centre += move
        iterations += 1
        if float(move.norm()) <= settings.tolerance * tau:
            break
    return ClipResult(centre, sender_scores(parts, finite, centre), iterations)


def sender_scores(parts: torch.Tensor, finite: torch.Tensor, centre: torch.Tensor) -> list[float]:
    """Each sender's distance to the centre over the median distance of the finite senders (honest: about 1), plus
    ``DISSENT_WEIGHT`` x its dissent (honest: 0)."""
    distances = torch.full((parts.shape[0],), float("inf"))
    distances[finite] = (parts[finite] - centre).norm(dim=1)
    spread = float(distances[finite].median())
    if spread > 0:
        scores = distances / spread
    else:  # identical parts: those at the centre score 0, any other the maximum
        scores = torch.where(distances > 0, MAX_SCORE, 0.0)
    scores = scores + DISSENT_WEIGHT * dissent(parts, finite, centre)
    # inf / inf (attackers the majority of a group, entries whose float32 norm overflows) is NaN: the worst score
    return [MAX_SCORE if math.isnan(score) else min(score, MAX_SCORE) for score in map(float, scores)]


def dissent(parts: torch.Tensor, finite: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """How far each finite part points against the centre: its cosine to the centre, negated, when negative (0 for a
    zero part or centre, and for non-finite parts, which score the maximum anyway)."""
    found = torch.zeros(parts.shape[0])
    if finite.any():
        cosines = torch.nn.functional.cosine_similarity(parts[finite], centre.unsqueeze(0), dim=1)
        found[finite] = (-cosines).clamp(min=0.0)
    return found
