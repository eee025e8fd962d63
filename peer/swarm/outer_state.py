"""The outer state of a local-steps (DiLoCo) run as every node speaks it: what a donor serves, where, and the layout
a downloaded one must have (peer/local_steps.py serves and downloads it; the monitor keeps and serves it too).

A served outer state is ``(metadata, tensors)``: metadata ``{"epoch": E, "format": STATE_FORMAT}`` and the tensors
of the model's trainable parameters in ``model.parameters()`` order, float32, the outer weights then the outer
momentum. Donors offer it under the DHT prefix ``outer_prefix(run_id)`` at priority = its epoch (the monitor at
epoch - 0.5, so a trainer at the same epoch is asked first).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peer.hivemind_gaps.state_layout import StateLayout

STATE_FORMAT = "local-steps/1"  # in every served state's metadata: a state of another layout is refused by name
# The largest magnitude a downloaded outer weight or momentum may have. float16 ends at 65504: an outer weight near it
# would turn inf in any fp16 pass or codec. Honest states are far below: the largest entry of the tiny preset's outer
# weights grew to 16.1 (momentum 2.6) by outer step 21 of tests/peer/test_local_steps.py (H=2, DiLoCo's 0.7/0.9,
# read from the peers' backups). A donor's 1e30 is refused per donor and the next one asked.
MAX_OUTER_VALUE = 1e4


def outer_prefix(run_id: str) -> str:
    """The DHT prefix of the run's local-steps averagers (pseudo-gradient rounds and the served outer state)."""
    return f"{run_id}_outer"


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the outer state holds, in its order."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def outer_state_layout(tensors: list[torch.Tensor]) -> StateLayout:
    """What a served outer state (outer weights then momentum) must look like to a node holding ``tensors``."""
    return StateLayout(StateLayout.slots(tensors), format=STATE_FORMAT, max_value=MAX_OUTER_VALUE)


@torch.no_grad()
def copy_into(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """Copy each source into its target (across devices and dtypes); ValueError, nothing copied, if a shape differs."""
    for target, source in zip(targets, sources, strict=True):
        if target.shape != source.shape:
            raise ValueError(f"a tensor of shape {tuple(source.shape)} cannot replace one of {tuple(target.shape)}")
    for target, source in zip(targets, sources):
        target.copy_(source)
