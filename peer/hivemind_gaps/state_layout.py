"""The layout of a training state (each tensor's shape and dtype, and which optimizer entries are tensors), taken from
the local averager, and the check that a downloaded state has the same one before any of it is applied.

hivemind 1.1.12 applies a downloaded state piece by piece (``TrainingStateAverager.load_state_from_peers``): the
optimizer state first, then each parameter by ``copy_``. A finite state of the wrong shape fails half-way, after the
optimizer state was replaced, and hivemind's caller retries the same (highest-priority) donor. A donor running the
same model and optimizer serves exactly the layout this process would serve, so anything else is refused whole.

It also bounds what a donor may stream (``stream_limit``): hivemind reads a donor's stream to its end, however long.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.utils.nested import nested_flatten

VALUE = "value"  # an optimizer metadata entry that is not a tensor (a learning rate, a parameter id, ...)

# What a donor may stream, per byte of the local state: an honest donor's stream of the same layout is at most its
# raw size (no compression: 1x; fp16: 0.5x; scaled fp16: 0.5x plus two float32 per row, under 1x for rows of 4 or
# more). 2x leaves room for tensors with rows shorter than 4 and still bounds memory to a few states' worth.
STREAM_BYTES_PER_STATE_BYTE = 2
# Plus this much per tensor (protobuf framing of each 64 KiB part, the dtype name and shape of each tensor) ...
STREAM_SLACK_PER_TENSOR = 1024
# ... and this much for the metadata (msgpack of the epoch and the optimizer's flattened state_dict: hyperparameters,
# parameter ids: 3.8 KB for the tiny model)
STREAM_SLACK_BYTES = 2**20


class StateRefused(ValueError):
    """A downloaded state failed the check; the message names the problem."""


@dataclass(frozen=True)
class StateLayout:
    """What a state served by this process looks like: picklable, sent to the averager's process at each download.

    Args:
        shapes: each tensor's shape, in the order hivemind streams them.
        dtypes: each tensor's dtype, same order.
        optimizer_entries: for TrainingStateAverager, one per entry of the optimizer's flattened state_dict (the
            metadata's ``optimizer_metadata``): the index of the tensor it names, or VALUE; None for other averagers.
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    optimizer_entries: tuple[int | str, ...] | None = None

    @classmethod
    def of_tensors(cls, tensors: Sequence[torch.Tensor], optimizer_entries=None) -> StateLayout:
        shapes = tuple(tuple(tensor.shape) for tensor in tensors)
        return cls(shapes, tuple(tensor.dtype for tensor in tensors), optimizer_entries)

    @property
    def nbytes(self) -> int:
        """The raw size of a state of this layout."""
        return sum(_numel(shape) * dtype.itemsize for shape, dtype in zip(self.shapes, self.dtypes))

    def stream_limit(self) -> int:
        """The most bytes a donor may stream for a state of this layout (see STREAM_BYTES_PER_STATE_BYTE)."""
        return (
            STREAM_BYTES_PER_STATE_BYTE * self.nbytes + STREAM_SLACK_PER_TENSOR * len(self.shapes) + STREAM_SLACK_BYTES
        )


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def local_layout(averager) -> StateLayout:
    """The layout of the state ``averager`` would serve itself (its get_current_state), read without copying it.

    For a TrainingStateAverager that is hivemind's order: the optimizer's parameters, the extra tensors, then the
    tensors of the optimizer's flattened state_dict (dump_optimizer_state); tests/peer/test_state_check.py checks
    that it matches get_current_state.
    """
    if not isinstance(averager, TrainingStateAverager):
        _, tensors, _ = averager.get_current_state()
        return StateLayout.of_tensors(tensors)
    parameters = [param for group in averager.optimizer.param_groups for param in group["params"]]
    statistics, entries = [], []
    for element in nested_flatten(averager.optimizer.state_dict()):
        if isinstance(element, torch.Tensor):
            entries.append(len(statistics))  # counted from 0 among the optimizer's tensors, as hivemind does
            statistics.append(element)
        else:
            entries.append(VALUE)
    return StateLayout.of_tensors([*parameters, *averager.extra_tensors, *statistics], tuple(entries))


def check_tensor(index: int, tensor: Any, layout: StateLayout) -> None:
    """Raise StateRefused unless the ``index``-th tensor received has the layout's shape and dtype there."""
    if index >= len(layout.shapes):
        raise StateRefused(f"it has more than the {len(layout.shapes)} tensors expected")
    if not isinstance(tensor, torch.Tensor):
        raise StateRefused(f"tensor {index} is a {type(tensor).__name__}")
    if tuple(tensor.shape) != layout.shapes[index]:
        raise StateRefused(f"tensor {index} has shape {tuple(tensor.shape)}, expected {layout.shapes[index]}")
    if tensor.dtype != layout.dtypes[index]:
        raise StateRefused(f"tensor {index} has dtype {tensor.dtype}, expected {layout.dtypes[index]}")


def check_layout(metadata: dict, tensors: Sequence[Any], layout: StateLayout) -> None:
    """Raise StateRefused, naming the first mismatch, unless the state has exactly ``layout``."""
    if len(tensors) != len(layout.shapes):
        raise StateRefused(f"it has {len(tensors)} tensors, expected {len(layout.shapes)}")
    for index, tensor in enumerate(tensors):
        check_tensor(index, tensor, layout)
    if layout.optimizer_entries is not None:
        check_optimizer_entries(metadata.get("optimizer_metadata"), layout.optimizer_entries)


def check_optimizer_entries(entries: Any, expected: Sequence[int | str]) -> None:
    """The optimizer metadata must name the same tensor at the same place as the local optimizer's: hivemind packs it
    into the local state_dict's structure, so another tensor there would give a moment the wrong parameter's shape."""
    if not isinstance(entries, list) or len(entries) != len(expected):
        count = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise StateRefused(f"its optimizer metadata has {count} entries, expected {len(expected)}")
    for position, (entry, wanted) in enumerate(zip(entries, expected)):
        if not isinstance(entry, dict):
            raise StateRefused(f"its optimizer metadata entry {position} is a {type(entry).__name__}, not a dict")
        if wanted == VALUE:
            if entry.get("type") != "value" or "value" not in entry:
                raise StateRefused(f"its optimizer metadata entry {position} is {entry!r}, expected a value")
        elif entry.get("type") != "tensor" or type(entry.get("index")) is not int or entry["index"] != wanted:
            raise StateRefused(f"its optimizer metadata entry {position} is {entry!r}, expected tensor {wanted}")
