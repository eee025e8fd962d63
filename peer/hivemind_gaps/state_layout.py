"""The layout of a training state, taken from the local averager, and the check that a downloaded state fits it
before any of it is applied.

hivemind 1.1.12 applies a downloaded state piece by piece (``TrainingStateAverager.load_state_from_peers``): the
optimizer state first, then each parameter by ``copy_``. A finite state of the wrong shape fails half-way, after the
optimizer state was replaced, and hivemind's caller retries the same (highest-priority) donor. So:

- the parameters and extra tensors must have exactly the local count, shapes and dtypes;
- the optimizer metadata (hivemind's flattened optimizer state_dict, packed into the LOCAL structure) must have the
  local number of entries, name the donor's optimizer tensors in order, each exactly once, and each tensor must have
  the local one's shape and dtype at its place. One exception, seen in honest swarms: a scalar may be a plain value on
  one side and a 0-d tensor on the other (LAMB's ``trust_ratio`` is the int 1 until the first update with a non-zero
  step, a tensor after it: a peer 2 epochs in serves 17 more tensors than a fresh one, for the tiny model).

It also bounds what a donor may stream (``StateLayout.stream_limit``): hivemind reads a donor's stream to its end.
A layout may also name the state's format (a ``"format"`` the metadata must carry: a state served by another kind of
averager under the same prefix is refused per donor, so the next donor is asked) and a bound on every value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.utils.nested import nested_flatten

VALUE = "value"  # an optimizer entry that is not a tensor (a learning rate, a parameter id, a step count, ...)

# What a donor may stream, per byte of the local state: an honest donor's stream is at most its raw size (measured for
# the tiny model: no compression 1.0x, fp16 0.50x, scaled fp16 0.52x; tests/peer/test_state_check.py). 2x leaves room
# for scaled fp16's per-row statistics on short rows and still bounds memory to a few states' worth.
STREAM_BYTES_PER_STATE_BYTE = 2
# Plus this much per tensor (protobuf framing of each 64 KiB part, the dtype name and shape of each tensor) ...
STREAM_SLACK_PER_TENSOR = 1024
# ... and this much for the metadata (msgpack of the epoch and the optimizer's flattened state_dict: hyperparameters,
# parameter ids: 3.8 KB for the tiny model)
STREAM_SLACK_BYTES = 2**20

Slot = tuple[tuple[int, ...], torch.dtype]  # a tensor's shape and dtype


class StateRefused(ValueError):
    """A downloaded state failed the check; the message names the problem."""


@dataclass(frozen=True)
class StateLayout:
    """What a state served by this process looks like: picklable, sent to the averager's process at each download.

    Args:
        fixed: the shape and dtype of each leading tensor that must be there as it is (a TrainingStateAverager's
            parameters and extra tensors; every tensor, for other averagers).
        optimizer_entries: for a TrainingStateAverager, one per entry of its optimizer's flattened state_dict (the
            metadata's ``optimizer_metadata``): that tensor's shape and dtype, or VALUE; None for other averagers.
        format: the ``"format"`` the state's metadata must name; None: not checked.
        max_value: the largest magnitude any number of the state may have; None: only finiteness is checked.
    """

    fixed: tuple[Slot, ...]
    optimizer_entries: tuple[Slot | str, ...] | None = None
    format: str | None = None
    max_value: float | None = None

    @staticmethod
    def slots(tensors: Sequence[torch.Tensor]) -> tuple[Slot, ...]:
        return tuple((tuple(tensor.shape), tensor.dtype) for tensor in tensors)

    @property
    def max_tensors(self) -> int:
        """The most tensors a state of this layout has: every optimizer entry may be a tensor (a 0-d one)."""
        return len(self.fixed) + len(self.optimizer_entries or ())

    @property
    def nbytes(self) -> int:
        """The most bytes a state of this layout decodes to (8 per optimizer entry that may be a 0-d tensor)."""
        slots = [*self.fixed, *(entry for entry in self.optimizer_entries or () if entry != VALUE)]
        scalars = sum(entry == VALUE for entry in self.optimizer_entries or ())
        return sum(_numel(shape) * dtype.itemsize for shape, dtype in slots) + 8 * scalars

    def stream_limit(self) -> int:
        """The most bytes a donor may stream for a state of this layout (see STREAM_BYTES_PER_STATE_BYTE)."""
        per_tensor = STREAM_SLACK_PER_TENSOR * self.max_tensors
        return STREAM_BYTES_PER_STATE_BYTE * self.nbytes + per_tensor + STREAM_SLACK_BYTES


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
        return StateLayout(StateLayout.slots(tensors))
    parameters = [param for group in averager.optimizer.param_groups for param in group["params"]]
    entries = tuple(
        StateLayout.slots([element])[0] if isinstance(element, torch.Tensor) else VALUE
        for element in nested_flatten(averager.optimizer.state_dict())
    )
    return StateLayout(StateLayout.slots([*parameters, *averager.extra_tensors]), entries)


def check_tensor(index: int, tensor: Any, expected: Slot) -> None:
    """Raise StateRefused unless ``tensor`` (the ``index``-th received) has the ``expected`` shape and dtype."""
    if not isinstance(tensor, torch.Tensor):
        raise StateRefused(f"tensor {index} is a {type(tensor).__name__}")
    if tuple(tensor.shape) != expected[0]:
        raise StateRefused(f"tensor {index} has shape {tuple(tensor.shape)}, expected {expected[0]}")
    if tensor.dtype != expected[1]:
        raise StateRefused(f"tensor {index} has dtype {tensor.dtype}, expected {expected[1]}")


def check_layout(metadata: dict, tensors: Sequence[Any], layout: StateLayout) -> None:
    """Raise StateRefused, naming the first mismatch, unless the state fits ``layout`` (see the module docstring)."""
    if len(tensors) < len(layout.fixed):
        raise StateRefused(f"it has {len(tensors)} tensors, expected {len(layout.fixed)} or more")
    for index, (tensor, expected) in enumerate(zip(tensors, layout.fixed)):
        check_tensor(index, tensor, expected)
    if layout.optimizer_entries is None:
        if len(tensors) != len(layout.fixed):
            raise StateRefused(f"it has {len(tensors)} tensors, expected {len(layout.fixed)}")
        return
    used = check_optimizer_entries(metadata.get("optimizer_metadata"), tensors[len(layout.fixed) :], layout)
    if used != len(tensors) - len(layout.fixed):
        raise StateRefused(f"it has {len(tensors)} tensors, its optimizer metadata names {len(layout.fixed) + used}")


def check_optimizer_entries(entries: Any, statistics: Sequence[Any], layout: StateLayout) -> int:
    """Check the optimizer metadata against the local optimizer's entries; return how many tensors it names.

    hivemind packs the entries into the local state_dict's structure, position by position: another tensor at a place
    would give a moment the wrong parameter's shape, a missing entry fails half-way (StopIteration)."""
    expected = layout.optimizer_entries
    if not isinstance(entries, list) or len(entries) != len(expected):
        count = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise StateRefused(f"its optimizer metadata has {count} entries, expected {len(expected)}")
    used = 0
    for position, (entry, wanted) in enumerate(zip(entries, expected)):
        if isinstance(entry, dict) and entry.get("type") == "value" and "value" in entry:
            if wanted != VALUE and wanted[0] != ():  # only a scalar may be a plain value on one side
                raise StateRefused(
                    f"its optimizer metadata entry {position} is a value, expected a tensor {wanted[0]}"
                )
            continue
        if not isinstance(entry, dict) or entry.get("type") != "tensor" or type(entry.get("index")) is not int:
            raise StateRefused(f"its optimizer metadata entry {position} is {str(entry)[:100]}, not a value or tensor")
        if entry["index"] != used or used >= len(statistics):  # hivemind numbers them in order, from 0
            raise StateRefused(
                f"its optimizer metadata entry {position} names tensor {entry['index']}, expected {used}"
            )
        index, tensor = len(layout.fixed) + used, statistics[used]
        if wanted != VALUE:
            check_tensor(index, tensor, wanted)
        elif (
            not isinstance(tensor, torch.Tensor) or tensor.dim() != 0
        ):  # a scalar the local optimizer holds as a value
            raise StateRefused(f"tensor {index} (optimizer entry {position}) is not a scalar, expected a value")
        used += 1
    return used


def check_streamed_tensor(index: int, tensor: torch.Tensor, decoded: int, layout: StateLayout) -> None:
    """As each tensor of a stream completes (``decoded``: the bytes of those so far, this one included): a fixed one
    must be as the local one, and there may be no more tensors nor bytes than a state of ``layout`` can have. The
    donor's declared dtype sets the decoded size (fp16 bytes declared complex128 take 8x once decoded)."""
    if index >= layout.max_tensors:
        raise StateRefused(f"it has more than the {layout.max_tensors} tensors a state of this model may have")
    if index < len(layout.fixed):
        check_tensor(index, tensor, layout.fixed[index])
    if decoded > layout.nbytes:
        raise StateRefused(f"its tensors take over {layout.nbytes} bytes, the most a state of this model may take")
