"""A downloaded training state is checked before it is applied: the local layout, finite numbers, a plausible epoch.

hivemind 1.1.12 applies whatever state a donor sends (``TrainingStateAverager.load_state_from_peers``): a NaN
tensor poisons the joiner (and the monitor's checkpoints), an epoch of 2**62 makes it step its scheduler once per
epoch it "catches up", which never ends, and a finite tensor of the wrong shape fails half-way through applying it
(then hivemind's caller asks the same donor again). Here each download is checked in the averager's process as it
arrives (hivemind's loop over donors, in ``DecentralizedAverager._load_state_from_peers``, redone with the check):
its bytes are bounded while it streams, and a refused state is logged, counted and dropped, and the next donor is
asked; if none is left, hivemind keeps the local state. hivemind bounds only the wait for each next part, so a donor
at the top priority that sends a part just in time holds every joiner for ever: here a donor whose pace could not
deliver the smallest honest state of the model before the attempt ends is cut (after a 10 s grace), the attempt ends
at its time, and a donor refused, cut, or still sending then is asked after all others for ten minutes. The
scheduler catch-up is also made O(1) for closed-form schedules, whatever the epoch. The layout and the stream bound
are in state_layout.py."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import multiprocessing as mp
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture, ValueWithExpiration
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.streaming import combine_from_streaming

from peer.hivemind_gaps.state_layout import (
    StateLayout,
    StateRefused,
    check_layout,
    check_streamed_tensor,
    local_layout,
)

logger = logging.getLogger(__name__)

# No real run gets near this many epochs (the default schedule is 20000); far above, and a downloaded epoch is
# refused whatever the peer's own view of the swarm says.
MAX_EPOCH = 2**31
# How far ahead of the swarm epoch this process knows a donor's epoch may be: the tracker lags the swarm by a few
# epochs at most (progress entries are refreshed every few seconds), so 1000 is generous and still bounds the
# scheduler's catch-up.
EPOCH_MARGIN = 1000
# A donor must keep a pace at which it could still send the smallest honest state of this model before the attempt's
# time runs out: one that sends a part just before each next-part timeout (which alone would hold a joiner for ever)
# is cut once PACE_GRACE_SECONDS have passed. The smallest honest stream is about half the raw state (fp16: 0.50x,
# scaled fp16: 0.52x, none: 1.0x, measured in tests/peer/test_state_check.py); the margin allows for rounding.
PACE_GRACE_SECONDS = 10.0
MIN_STREAM_FRACTION = 0.45
# A donor refused or too slow is asked after all others this long (it claimed the top priority once, it would again).
SET_ASIDE_SECONDS = 600.0
MAX_SET_ASIDE = 1024


def check_state(metadata: Any, tensors: Sequence[torch.Tensor], max_epoch: int, layout: StateLayout) -> None:
    """Raise StateRefused unless the state has the local ``layout`` (tensor count, shapes, dtypes, optimizer entries),
    its epoch is an int in [0, max_epoch] and every number in it is finite."""
    if not isinstance(metadata, dict):
        raise StateRefused(f"its metadata is a {type(metadata).__name__}, not a dict")
    epoch = metadata.get("epoch")
    if type(epoch) is not int:  # bool is an int subclass; msgpack gives plain ints for honest states
        raise StateRefused(f"its epoch {epoch!r} is not an integer")
    if not 0 <= epoch <= max_epoch:
        raise StateRefused(f"its epoch {epoch} is outside [0, {max_epoch}]")
    if layout.format is not None and metadata.get("format") != layout.format:
        raise StateRefused(f"its format is {str(metadata.get('format'))[:60]!r}, not {layout.format!r}")
    check_layout(metadata, tensors, layout)  # before the values: a check of the wrong tensors proves nothing
    for index, tensor in enumerate(tensors):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise StateRefused(f"tensor {index} (shape {tuple(tensor.shape)}) holds NaN or infinite values")
        largest = float(tensor.abs().max()) if layout.max_value is not None and tensor.numel() else 0.0
        if layout.max_value is not None and largest > layout.max_value:
            raise StateRefused(f"tensor {index} holds a value of magnitude {largest:.3g}, over {layout.max_value:g}")
    for value in _numbers(metadata.get("optimizer_metadata")):  # learning rates, betas, ... of the param groups
        if isinstance(value, float) and not math.isfinite(value):
            raise StateRefused(f"its optimizer metadata holds a non-finite value {value}")


def _numbers(tree: Any):
    """Every leaf of a nested structure of lists, tuples and dicts (metadata as msgpack decodes it)."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _numbers(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _numbers(value)
    else:
        yield tree


class CheckedDownloads(DecentralizedAverager):
    """Checks every downloaded state (see check_state) before it is handed over, and tries the next donor after a
    refusal, so one donor serving poison (at the highest priority) cannot keep a joiner from the swarm's state.

    Put it after TrainingStateAverager among the bases. ``epoch_limit`` (settable; called at each download) bounds
    the epoch by this process's own knowledge of the swarm; MAX_EPOCH bounds it always.
    """

    def __init__(self, *args, **kwargs):
        self.epoch_limit: Callable[[], int] | None = None
        self._refused = mp.Value(ctypes.c_int64, 0)  # counted in the averager's process, read in this one
        self._set_aside_until: dict[PeerID, float] = {}  # used in the averager's process only
        super().__init__(*args, **kwargs)

    @property
    def refused_states(self) -> int:
        """Downloaded states refused so far."""
        return int(self._refused.value)

    def state_layout(self) -> StateLayout:
        """The layout a downloaded state must have: the local one (an averager that knows it better overrides this)."""
        return local_layout(self)

    def max_epoch(self) -> int:
        known = self.epoch_limit() if self.epoch_limit is not None else MAX_EPOCH
        return min(MAX_EPOCH, known)

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None):
        # hivemind's own, plus what is known in this process sent along to the averager's process: the epoch bound
        # and the layout of the local state (the averager's process holds the averaged tensors, not the optimizer)
        future = MPFuture()
        request = {"timeout": timeout, "future": future, "max_epoch": self.max_epoch(), "layout": self.state_layout()}
        self._outer_pipe.send(("_load_state_from_peers", [], request))
        return future.result(timeout=timeout) if wait else future

    async def _load_state_from_peers(
        self, future: MPFuture, timeout: float | None = None, *, max_epoch: int, layout: StateLayout
    ):
        # hivemind 1.1.12's loop over the donors by priority (averaging/averager.py), with each state checked, each
        # donor's time bounded and the donors that failed this process asked last for a while
        chunk_timeout = None
        if timeout is not None:
            chunk_timeout = self.next_chunk_timeout if self.next_chunk_timeout is not None else self.request_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for peer in await self._donors():
                if deadline is not None and time.monotonic() >= deadline:
                    break  # the caller stopped waiting: the donors not asked keep their place
                loaded = await self._bounded_download(peer, deadline, chunk_timeout, max_epoch, layout)
                if loaded is not None:
                    future.set_result(loaded)
                    return
        finally:
            if not future.done():
                future.set_result(None)

    async def _bounded_download(
        self, peer: PeerID, deadline: float | None, chunk_timeout: float | None, max_epoch: int, layout: StateLayout
    ):
        """_checked_download until ``deadline``; a donor refused, too slow, or still sending then is set aside."""
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            download = self._checked_download(peer, chunk_timeout, max_epoch, layout, deadline)
            loaded = await asyncio.wait_for(download, remaining)
        except TimeoutError:  # cancelled inside: the stream is closed there (_download_from)
            logger.warning(f"The state download from peer {peer} outlasted the attempt; it is asked last for a while")
            self._set_aside(peer)
            return None
        if loaded is False:
            self._set_aside(peer)
            return None
        return loaded

    async def _checked_download(
        self, peer: PeerID, timeout: float | None, max_epoch: int, layout: StateLayout, deadline: float | None = None
    ):
        """The donor's (metadata, tensors) if it sent a state that passes check_state; None if it sent none or
        failed; False if it was refused (logged and counted) or too slow to finish by ``deadline`` (logged)."""
        try:
            loaded = await self._download_from(peer, timeout, layout, deadline)
            if loaded is not None:
                check_state(*loaded, max_epoch, layout)
            return loaded
        except StateRefused as refusal:
            with self._refused.get_lock():
                self._refused.value += 1
            logger.error(f"Refused the training state downloaded from peer {peer}: {refusal}; trying another")
            return False
        except DonorTooSlow as slow:
            logger.warning(f"Gave up the state download from peer {peer}: {slow}; trying another")
            return False

    def _set_aside(self, peer: PeerID) -> None:
        """Ask ``peer`` after every other donor for SET_ASIDE_SECONDS (the newest MAX_SET_ASIDE remembered)."""
        self._set_aside_until.pop(peer, None)
        self._set_aside_until[peer] = time.monotonic() + SET_ASIDE_SECONDS
        while len(self._set_aside_until) > MAX_SET_ASIDE:
            self._set_aside_until.pop(next(iter(self._set_aside_until)))

    async def _donors(self) -> list[PeerID]:
        """Peers sharing their state, highest priority first (random among equals), those set aside after the others,
        this one left out."""
        key_manager = self._matchmaking.group_key_manager
        found = self.dht.get(f"{key_manager.prefix}.all_averagers", latest=True)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        priority = {
            PeerID(peer_id): (float(info.value), random.random())
            for peer_id, info in entries.items()
            # the key is hivemind's, unvalidated: anyone can write a subkey that is not a peer id
            if isinstance(peer_id, bytes)
            and isinstance(info, ValueWithExpiration)
            and isinstance(info.value, (float, int))
        }
        if not priority:
            logger.info("Could not load state from peers: nobody shares a state")
        now = time.monotonic()
        in_turn = {peer: (self._set_aside_until.get(peer, 0.0) <= now, *claim) for peer, claim in priority.items()}
        return [peer for peer in sorted(in_turn, key=in_turn.get, reverse=True) if peer != self.peer_id]

    async def _download_from(
        self, peer: PeerID, timeout: float | None, layout: StateLayout, deadline: float | None = None
    ) -> tuple[Any, list[torch.Tensor]] | None:
        """One donor's (metadata, tensors), or None if it sent none or failed; StateRefused as _read_state says."""
        started = time.monotonic()
        logger.info(f"Downloading parameters from peer {peer}")
        stream = None
        try:
            stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
            stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
            metadata, tensors, received = await self._read_state(stream, timeout, layout, deadline)
        except (StateRefused, DonorTooSlow):
            raise
        except Exception:  # a donor can fail in any way; the next one is tried
            logger.exception(f"Failed to download state from {peer}")
            return None
        finally:
            if stream is not None:  # closes the p2p stream: a refused donor's remaining bytes are never read
                with contextlib.suppress(Exception):  # a stream that failed may refuse to close: nothing left to free
                    await stream.aclose()
        if not metadata:
            logger.debug(f"Peer {peer} did not send its state")
            return None
        logger.info(f"Finished downloading state in {time.monotonic() - started:.3f}s ({received} bytes) from {peer}")
        return metadata, tensors

    async def _read_state(self, stream, timeout: float | None, layout: StateLayout, deadline: float | None = None):
        """(metadata, tensors, bytes received) from a donor's stream. Raises StateRefused as soon as the stream passes
        the layout's stream_limit or a tensor does not fit (check_streamed_tensor): what came so far is dropped, the
        rest unread. (hivemind reads each message whole before it is counted here: one message is not bounded.)"""
        limit, received, started = layout.stream_limit(), 0, time.monotonic()
        metadata, parts, tensors = None, [], []
        async for message in aiter_with_timeout(stream, timeout=timeout):
            received += message.ByteSize()
            if received > limit:
                raise StateRefused(f"it streamed over {limit} bytes, the most a state of this model may take")
            if deadline is not None:
                check_pace(received, started, deadline, layout)
            if message.metadata:
                metadata = self.serializer.loads(message.metadata)
            if message.tensor_part.dtype and parts:  # the start of the next tensor: wrap this one up
                self._add_tensor(tensors, parts, layout)
                parts = []
            parts.append(message.tensor_part)
        if parts:
            self._add_tensor(tensors, parts, layout)
        return metadata, tensors, received

    @staticmethod
    def _add_tensor(tensors: list[torch.Tensor], parts: list, layout: StateLayout) -> None:
        tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        decoded = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
        check_streamed_tensor(len(tensors) - 1, tensors[-1], decoded, layout)


class DonorTooSlow(Exception):
    """A donor's pace cannot deliver a state of this model before the download attempt ends."""


def check_pace(received: int, started: float, deadline: float, layout: StateLayout) -> None:
    """Raise DonorTooSlow if, PACE_GRACE_SECONDS after the stream began, ``received`` bytes at the pace so far could
    not reach the smallest honest stream of this model by ``deadline``."""
    now = time.monotonic()
    elapsed = now - started
    if elapsed < PACE_GRACE_SECONDS:
        return
    needed = int(MIN_STREAM_FRACTION * layout.nbytes)
    projected = received + received / elapsed * max(deadline - now, 0.0)
    if projected < needed:
        raise DonorTooSlow(
            f"{received} bytes in {elapsed:.0f} s: at that pace it cannot send the {needed} bytes a state of this "
            "model takes at least before the attempt ends"
        )


class FastSchedulerCatchUp:
    """For a TrainingStateAverager (put it before): catching the scheduler up to the epoch is one step, not one
    per epoch, for closed-form schedules (LambdaLR, which make_scheduler builds). hivemind's loop took 0.51 s per
    100k epochs here (~5 us a step): an epoch of 2**31 would hold the peer ~3 hours, 2**62 forever."""

    def _update_scheduler(self):
        scheduler = self.scheduler
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and scheduler._step_count < self.local_epoch:
            # the state hivemind's loop leaves after its last step, less one: the step below computes the rates
            scheduler._step_count, scheduler.last_epoch = self.local_epoch, self.local_epoch - 1
        super()._update_scheduler()
