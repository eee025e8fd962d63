"""The last gate before an optimizer step: a swarm-averaged gradient that is non-finite or absurdly large is dropped.

hivemind averages the members' gradients as they are sent. One member (broken or hostile) that sends NaN, inf or
1e30 makes the average non-finite or huge on every peer at once, and a clipped step by a NaN norm writes NaN into
every parameter and LAMB moment. The optimizer that hivemind calls with the averaged gradient (peer/swarm/optimizer.py) asks
this guard first and skips the step when it refuses: parameters and optimizer moments stay as they were.

Why the bound is safe for honest gradients (tests/peer/test_poisoning.py prints the same figure for its run):

- the relative bound is FACTOR x the median of the last WINDOW accepted norms. An average over a whole target batch
  moves slowly: in a 60-epoch two-peer run of the tiny preset (tests' settings, lr 0.05) honest norms were 0.8-1.7,
  and the largest was 1.54x the running median of the ones before it (after the warm-up; 2.7x counting the very
  first step). FACTOR = 50 leaves a margin of ~30x over that for loss spikes of real runs. A median, not a mean or
  max, so that neither an outlier let through nor a short run of them drags the bound up;
- it applies only after WARMUP accepted steps: the first steps of a run (or of a restarted peer) have nothing to
  compare with, and early norms change fastest;
- the absolute cap (ABSOLUTE_CAP) holds from the first step, warm-up included. Honest norms measured here are ~1
  (and the default --max-grad-norm of 1.0 expects that order); 1e6 is six orders of magnitude above, and far below
  where float32 squares of the gradient's entries overflow (which would turn LAMB's second moment into inf);
- zero norms (hivemind's optimizer initialisation, an empty round) are accepted but not remembered: they would drag
  the median to zero and make every later step look like an outlier.

A refusal costs the swarm one step of progress, never the run: the next round averages fresh gradients. Every peer
receives the same average, but the median is each peer's own history (a joiner's is short): peers can judge the same
step differently, and come apart until state averaging brings them together. The local-steps outer step has no such
averaging every epoch, so its guard (WeightRelativeGuard, below) judges by the weights instead. A member that poisons every round
stalls the swarm instead of corrupting it; doing better needs robust aggregation, which hivemind does not have.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
from collections import Counter, deque
from collections.abc import Iterable

import torch

logger = logging.getLogger(__name__)

FACTOR = 50.0
WINDOW = 50
WARMUP = 5
ABSOLUTE_CAP = 1e6

NON_FINITE, ABOVE_CAP, OUTLIER = "non_finite", "above_cap", "outlier"
REASONS = (NON_FINITE, ABOVE_CAP, OUTLIER)


def gradient_norm(grads: Iterable[torch.Tensor]) -> float:
    """L2 norm of all gradients together, in float32 (float64 was ~90x slower: 1.7 s for 50M entries on one core).

    inf when some entry is infinite or the sum of squares overflows (entries beyond ~1e19): see ``overflowed``.
    """
    norms = [torch.linalg.vector_norm(grad, dtype=torch.float32) for grad in grads]
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([norm.to(norms[0].device) for norm in norms])))


def overflowed(grads: Iterable[torch.Tensor]) -> bool:
    """Whether an infinite norm came from finite entries too large to square in float32 (rare: only after inf)."""
    return all(bool(torch.isfinite(grad).all()) for grad in grads)


class UpdateGuard:
    """Decides, step by step, whether an averaged gradient may be applied; counts refusals by reason.

    Thread-safe: with --delay-optimizer-step hivemind calls the optimizer from a background thread, while the
    metrics endpoint reads the counts from another.

    Args:
        factor: refuse norms above ``factor`` x the running median of accepted norms (after the warm-up).
        window: how many recent accepted norms the median is taken over.
        warmup: accepted non-zero steps before the relative bound applies.
        absolute_cap: refuse norms above this, always.
    """

    def __init__(
        self, factor: float = FACTOR, window: int = WINDOW, warmup: int = WARMUP, absolute_cap: float = ABSOLUTE_CAP
    ):
        self.factor, self.warmup, self.absolute_cap = factor, warmup, absolute_cap
        self._accepted: deque[float] = deque(maxlen=window)
        self._refused: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.last_norm: float | None = None

    def admit(self, grads: Iterable[torch.Tensor]) -> bool:
        """True if a step with these gradients may run; else logs why and counts the refusal."""
        grads = list(grads)
        norm = gradient_norm(grads)
        overflow = math.isinf(norm) and overflowed(grads)
        with self._lock:
            reason, detail = self._judge(norm, overflow)
            if reason is None:
                if norm > 0:
                    self._accepted.append(norm)
                self.last_norm = norm
                return True
            self._refused[reason] += 1
        logger.warning(f"Skipping the optimizer step: the swarm-averaged gradient {detail}; parameters kept")
        return False

    def _judge(self, norm: float, overflow: bool) -> tuple[str | None, str]:
        if overflow:
            return ABOVE_CAP, f"norm overflows float32, far above the absolute cap {self.absolute_cap:.3g}"
        if not math.isfinite(norm):
            return NON_FINITE, f"is not finite (norm {norm})"
        if norm > self.absolute_cap:
            return ABOVE_CAP, f"norm {norm:.3g} is above the absolute cap {self.absolute_cap:.3g}"
        if len(self._accepted) >= self.warmup:
            median = statistics.median(self._accepted)
            if norm > self.factor * median:
                return OUTLIER, f"norm {norm:.3g} is above {self.factor:g}x the recent median {median:.3g}"
        return None, ""

    def refused(self) -> dict[str, int]:
        """Refusals so far, by reason (every reason present, zero included)."""
        with self._lock:
            return {reason: self._refused[reason] for reason in REASONS}

    def median(self) -> float | None:
        """Median of the recently accepted non-zero norms (None before any)."""
        with self._lock:
            return statistics.median(self._accepted) if self._accepted else None


# The local-steps outer guard's bound: an averaged pseudo-gradient over this many times the outer weights' norm is
# refused. Measured in bench_wan (4 tiny peers, H = 32, topk-int4, the harness's LAMB 0.05 whose weights grew 57 to
# 5,504 in 16 outer steps): 0.04-0.42 of the outer weights' norm at every outer step; 2 leaves ~5x over that.
WEIGHT_FACTOR = 2.0


class WeightRelativeGuard(UpdateGuard):
    """An UpdateGuard whose relative bound is the norm of the weights the update applies to, not its own history.

    The local-steps mode's outer step must be the same on every peer holding the same outer weights, or they come
    apart: a median of past norms is each peer's own history (a joiner's is short, a restarted peer's empty). Seen in
    bench_wan: as the weights grew, two peers (median 60.5) refused every outer step from epoch 16 on while two others
    (median 110) took three more, and the outer weights ended 1.8x apart. The median also locks a run out for good
    once its honest norms outgrow it 50x (a refused norm is never remembered); a bound on the weights grows with them.

    Args:
        factor: refuse an update whose norm is above ``factor`` x the weights' norm.
        absolute_cap: refuse norms above this, always.
    """

    def __init__(self, factor: float = WEIGHT_FACTOR, absolute_cap: float = ABSOLUTE_CAP):
        super().__init__(factor=math.inf, absolute_cap=absolute_cap)  # no median rule
        self.weight_factor = factor
        self._weights_norm = math.inf

    def admit_for(self, update: Iterable[torch.Tensor], weights: Iterable[torch.Tensor]) -> bool:
        """``admit(update)``, judged against the norm of ``weights`` (the weights it would change). Call this, not
        ``admit``: the bound is the norm of the last weights given (none before: no relative bound)."""
        self._weights_norm = gradient_norm(weights)
        return self.admit(update)

    def _judge(self, norm: float, overflow: bool) -> tuple[str | None, str]:
        reason, detail = super()._judge(norm, overflow)
        if reason is None and norm > self.weight_factor * self._weights_norm:
            limit = f"{self.weight_factor:g}x the weights' norm {self._weights_norm:.3g}"
            return OUTLIER, f"norm {norm:.3g} is above {limit}"
        return reason, detail
