"""Error feedback for lossy pseudo-gradient codecs: what a peer's codec dropped this round is sent the next.

Each round a peer means to send ``s = pseudo_gradient + residual``; it quantizes ``s`` itself with the codec's
``round_trip`` (peer/swarm/codecs.py), hands hivemind the quantized ``q`` and keeps ``residual = s - q``. The codecs
re-encode ``q`` to the same values, so what the swarm receives from this peer is ``q``, exactly (to float32
rounding), for the parts it sends and for the part it reduces itself (which hivemind never encodes). Over rounds the
sum of what a peer delivered differs from the sum of its pseudo-gradients by its last residual alone, instead of by
every round's rounding (DeMo, Streaming DiLoCo and SparseLoCo do the same).

Not covered: the deltas each reducer sends back are rounded too (the average minus the sender's own part, in the same
codec); that error is each receiver's and is undone by the re-sync of the outer state (peer/local_steps.py). With a
lossless codec (none) or one that is not idempotent (scaled-fp16: its statistics are per part) there is no feedback
and the residual stays zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hivemind.compression import CompressionBase


class ErrorFeedback:
    """This peer's quantization residual, one float32 tensor per pseudo-gradient tensor (zero at the start).

    Args:
        codec: the pseudo-gradients' codec; feedback is on if it has ``round_trip``, else ``apply`` passes through.
        shapes: tensors of the pseudo-gradient's shapes.
    """

    def __init__(self, codec: CompressionBase, shapes: Sequence[torch.Tensor]):
        self.round_trip = getattr(codec, "round_trip", None)  # a codec without it (none, fp16...) has no feedback
        self.residual = [torch.zeros_like(tensor, dtype=torch.float32) for tensor in shapes]

    @property
    def enabled(self) -> bool:
        return self.round_trip is not None

    @torch.no_grad()
    def apply(self, pseudo: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """What to send this round (on the codec's grid), keeping the new residual."""
        if self.round_trip is None:
            return list(pseudo)
        meant = [gradient + residual for gradient, residual in zip(pseudo, self.residual, strict=True)]
        sent = [self.round_trip(tensor) for tensor in meant]
        self.residual = [want - got for want, got in zip(meant, sent)]
        return sent

    def reset(self) -> None:
        """Forget the residual (a peer that takes the swarm's state drops the work it belonged to)."""
        self.residual = [torch.zeros_like(tensor) for tensor in self.residual]

    def problem(self, residual: Sequence[torch.Tensor]) -> str | None:
        """Why a backup's residual does not fit this peer's pseudo-gradient, or None."""
        if len(residual) != len(self.residual):
            return f"the backup's residual has {len(residual)} tensors, the pseudo-gradient {len(self.residual)}"
        for mine, theirs in zip(self.residual, residual):
            if mine.shape != theirs.shape:
                return f"a residual of shape {tuple(theirs.shape)} cannot replace one of {tuple(mine.shape)}"
            if not bool(torch.isfinite(theirs).all()):
                return "the backup's residual is not finite"
        return None

    def load(self, residual: Sequence[torch.Tensor]) -> None:
        """Take a backup's residual; ValueError naming the problem if its shapes or values do not fit."""
        problem = self.problem(residual)
        if problem is not None:
            raise ValueError(problem)
        self.residual = [tensor.detach().float().clone() for tensor in residual]
