"""A downloaded state must have the local layout and fit the stream bound: check_state on crafted states, the layout
read from a real averager, and real downloads from real hivemind donors (their own DHTs and averager processes here)
serving a wrong layout or too many bytes at the highest priority, beside an honest donor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass
from functools import partial
from typing import AsyncIterator  # noqa: UP035 - hivemind's servicer tells a stream by typing's alias only

import hivemind
import pytest
import torch
from hivemind.compression import CompressionInfo
from hivemind.optim.state_averager import TrainingStateAverager, dump_optimizer_state
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from monitor.state import build_run_model
from peer.hivemind_gaps.averagers import CheckedTrainingStateAverager, HivemindHandleNames
from peer.hivemind_gaps.state_check import PACE_GRACE_SECONDS, StateRefused, check_state
from peer.hivemind_gaps.state_layout import VALUE, StateLayout, local_layout
from peer.swarm.config import OptimConfig
from peer.swarm.optimizer import COMPRESSION_FACTORIES, make_optimizer, make_scheduler, param_groups
from tests.harness import TINY_OPTIM, wait_until

OPTIM = OptimConfig(**TINY_OPTIM)
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def honest_state(epoch: int = 7) -> tuple[dict, list[torch.Tensor], StateLayout]:
    """Two parameters, an optimizer state of a learning rate, one moment and a scalar held as a value locally (LAMB's
    trust ratio before its first non-zero step); and the local layout."""
    entries = [{"type": "value", "value": 0.05}, {"type": "tensor", "index": 0}, {"type": "value", "value": 1}]
    metadata = {"epoch": epoch, "group_bits": "", "optimizer_metadata": entries}
    tensors = [torch.randn(16, 4), torch.zeros(3), torch.ones(16, 4)]
    layout = StateLayout(StateLayout.slots(tensors[:2]), (VALUE, ((16, 4), torch.float32), VALUE))
    return metadata, tensors, layout


def test_a_state_of_the_local_layout_passes():
    check_state(*honest_state()[:2], 100, honest_state()[2])


def test_a_scalar_may_be_a_tensor_in_the_donors_state_and_a_value_here():
    """As in a real swarm: a donor past its first update holds LAMB's trust ratio as a 0-d tensor."""
    metadata, tensors, layout = honest_state()
    metadata["optimizer_metadata"][2] = {"type": "tensor", "index": 1}
    check_state(metadata, [*tensors, torch.tensor(0.7)], 100, layout)
    # and the other way round: a 0-d tensor here, a value there
    reverse = StateLayout(layout.fixed, (*layout.optimizer_entries[:2], ((), torch.float32)))
    check_state(*honest_state()[:2], 100, reverse)


def with_change(change: dict) -> tuple[dict, list]:
    """The honest state with tensors replaced ({index: tensor}, None drops it) or optimizer entries replaced
    ({"entries": list}), plus tensors appended ({"append": tensor})."""
    metadata, tensors, _ = honest_state()
    for key, value in change.items():
        if key == "entries":
            metadata["optimizer_metadata"] = value
        elif key == "append":
            tensors.append(value)
        else:
            tensors[key : key + 1] = [] if value is None else [value]
    return metadata, tensors


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({0: torch.randn(8, 4)}, r"^tensor 0 has shape \(8, 4\), expected \(16, 4\)$"),
        ({1: torch.zeros(3, 1)}, r"^tensor 1 has shape \(3, 1\), expected \(3,\)$"),
        ({1: torch.zeros(3, dtype=torch.float64)}, "^tensor 1 has dtype torch.float64, expected torch.float32$"),
        ({1: [0.0, 0.0, 0.0]}, "^tensor 1 is a list$"),
        ({2: torch.ones(8, 4)}, r"^tensor 2 has shape \(8, 4\), expected \(16, 4\)$"),
        ({2: torch.ones(16, 4, dtype=torch.float16)}, "^tensor 2 has dtype torch.float16, expected torch.float32$"),
        ({2: None, 1: None}, "^it has 1 tensors, expected 2 or more$"),
        ({"append": torch.zeros(1)}, "^it has 4 tensors, its optimizer metadata names 3$"),
        ({2: None}, "entry 1 names tensor 0, expected 0"),  # names a tensor that is not there
    ],
)
def test_a_state_of_another_layout_is_refused_naming_the_first_mismatch(change, match):
    with pytest.raises(StateRefused, match=match):
        check_state(*with_change(change), 100, honest_state()[2])


VALUE_ENTRY, MOMENT = {"type": "value", "value": 0.05}, {"type": "tensor", "index": 0}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"entries": [VALUE_ENTRY, MOMENT]}, "^its optimizer metadata has 2 entries, expected 3$"),
        ({"entries": {"0": MOMENT}}, "^its optimizer metadata has dict entries, expected 3$"),
        (
            {"entries": [MOMENT, VALUE_ENTRY, VALUE_ENTRY]},
            r"^tensor 2 \(optimizer entry 0\) is not a scalar, expected",
        ),
        ({"entries": [VALUE_ENTRY] * 3}, r"^its optimizer metadata entry 1 is a value, expected a tensor \(16, 4\)$"),
        (
            {"entries": [VALUE_ENTRY, {"type": "tensor", "index": 1}, VALUE_ENTRY]},
            "entry 1 names tensor 1, expected 0",
        ),
        ({"entries": [VALUE_ENTRY, {"type": "tensor", "index": True}, VALUE_ENTRY]}, "entry 1 is .* not a value or"),
        (
            {"entries": [VALUE_ENTRY, MOMENT, MOMENT], "append": torch.tensor(1.0)},
            "entry 2 names tensor 0, expected 1",
        ),
        ({"entries": [VALUE_ENTRY, MOMENT, "tensor"]}, "^its optimizer metadata entry 2 is tensor, not a value or"),
        (
            {"entries": [VALUE_ENTRY, MOMENT, {"type": "tensor", "index": 1}], "append": torch.zeros(2)},
            r"^tensor 3 \(optimizer entry 2\) is not a scalar, expected a value$",
        ),
    ],
)
def test_optimizer_metadata_naming_other_tensors_is_refused(change, match):
    with pytest.raises(StateRefused, match=match):
        check_state(*with_change(change), 100, honest_state()[2])


def test_a_non_finite_tensor_of_the_right_layout_is_still_refused():
    metadata, tensors, layout = honest_state()
    tensors[1][0] = float("inf")
    with pytest.raises(StateRefused, match="tensor 1 .* NaN or infinite"):
        check_state(metadata, tensors, 100, layout)


def test_the_stream_bound_of_a_layout():
    _, _, layout = honest_state()
    # 16*4*4 + 3*4 fixed, 16*4*4 moment, 8 per scalar-or-value entry (2)
    assert layout.nbytes == 256 + 12 + 256 + 16
    assert layout.max_tensors == 2 + 3
    assert layout.stream_limit() == 2 * layout.nbytes + 1024 * 5 + 2**20


def make_averager(cls, dht: hivemind.DHT, prefix: str, model: torch.nn.Module, **kwargs):
    """A state averager built as the monitor's StateKeeper builds one (not offloaded, the run's factories)."""
    return cls(
        dht=dht,
        prefix=prefix,
        params=param_groups(model, OPTIM.weight_decay),
        optimizer=partial(make_optimizer, optim=OPTIM),
        scheduler=partial(make_scheduler, optim=OPTIM),
        offload_optimizer=False,
        state_compression=COMPRESSION_FACTORIES[OPTIM.state_compression](),
        start=True,
        **kwargs,
    )


@pytest.fixture(scope="module")
def bootstrap():
    dht = hivemind.DHT(start=True, host_maddrs=LOOPBACK)
    yield dht
    dht.shutdown()


@pytest.fixture(scope="module")
def tiny_averager(bootstrap):
    averager = make_averager(CheckedTrainingStateAverager, bootstrap, "layout", build_run_model("tiny", None).model)
    yield averager
    averager.shutdown()


def test_the_local_layout_is_what_the_averager_serves(tiny_averager):
    metadata, tensors, _ = tiny_averager.get_current_state()
    layout = local_layout(tiny_averager)
    flat_metadata, statistics = dump_optimizer_state(tiny_averager.optimizer)
    assert flat_metadata == metadata["optimizer_metadata"]
    fixed = len(tensors) - len(statistics)
    assert layout.fixed == StateLayout.slots(tensors[:fixed])
    served = [
        StateLayout.slots([statistics[entry["index"]]])[0] if entry["type"] == "tensor" else VALUE
        for entry in flat_metadata
    ]
    assert list(layout.optimizer_entries) == served
    check_state(metadata, tensors, 0, layout)


@pytest.mark.parametrize("compression", sorted(COMPRESSION_FACTORIES))
def test_an_honest_stream_fits_the_bound_with_every_compression(tiny_averager, compression):
    """What rpc_download_state streams for the tiny model's state, measured message by message as it is sent."""
    metadata, tensors, infos = tiny_averager.get_current_state()
    serialized_metadata = tiny_averager.serializer.dumps(metadata)
    compressor = COMPRESSION_FACTORIES[compression]()
    streamed = len(serialized_metadata)
    for tensor, info in zip(tensors, infos):
        if compression == "scaled-fp16" and tensor.dim() == 0:
            continue  # hivemind cannot compress a 0-d tensor (LAMB's step) so: such a donor serves no state at all
        for part in split_for_streaming(compressor.compress(tensor, info, allow_inplace=False)):
            streamed += averaging_pb2.DownloadData(tensor_part=part).ByteSize()
    layout = local_layout(tiny_averager)
    print(
        f"{compression}: {len(tensors)} tensors, raw {layout.nbytes} bytes, streamed {streamed} bytes "
        f"(metadata {len(serialized_metadata)}), limit {layout.stream_limit()}"
    )
    assert streamed <= layout.stream_limit()
    assert 2 * layout.nbytes <= layout.stream_limit() <= 2 * layout.nbytes + 2**21  # the bound is what docs say


class Donor(HivemindHandleNames, TrainingStateAverager):
    """A plain hivemind state averager (hivemind's RPC names) serving its state through ``poison``, if given."""

    def __init__(self, *args, poison=None, **kwargs):
        self.poison = poison  # set before start: hivemind serves get_current_state from this (the host) process
        super().__init__(*args, **kwargs)

    def get_current_state(self):
        metadata, tensors, infos = super().get_current_state()
        return self.poison(metadata, list(tensors), list(infos)) if self.poison else (metadata, tensors, infos)


class SlowDonor(Donor):
    """A donor at the top priority that sends a part of one byte every SLOW_PART_SECONDS for ever: each within the
    downloader's next-part timeout, never a byte near the stream bound, never a whole state (a slow-loris)."""

    async def rpc_download_state(
        self, _request: averaging_pb2.DownloadRequest, _context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        while True:
            await asyncio.sleep(SLOW_PART_SECONDS)
            yield averaging_pb2.DownloadData(tensor_part=runtime_pb2.Tensor(buffer=b"\0"))


SLOW_PART_SECONDS = 1.0


def replace(tensors, infos, index: int, tensor: torch.Tensor):
    tensors[index] = tensor
    infos[index] = CompressionInfo.from_tensor(tensor, key=infos[index].key, role=infos[index].role)


def halve_first_matrix(metadata, tensors, infos):
    index = next(index for index, tensor in enumerate(tensors) if tensor.dim() == 2)
    replace(tensors, infos, index, torch.randn(tensors[index].shape[0] // 2, *tensors[index].shape[1:]))
    return metadata, tensors, infos


def oversize_first_tensor(metadata, tensors, infos):
    state_bytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    replace(tensors, infos, 0, torch.randn(3 * state_bytes // 4 + 2**20))  # 3x the state in float32, + 4 MiB
    return metadata, tensors, infos


def swap_optimizer_tensors(metadata, tensors, infos):
    """The optimizer metadata names its first two tensors the other way round: same tensors, moved moments."""
    entries = [dict(entry) for entry in metadata["optimizer_metadata"]]
    first, second = [entry for entry in entries if entry["type"] == "tensor"][:2]
    first["index"], second["index"] = second["index"], first["index"]
    return dict(metadata, optimizer_metadata=entries), tensors, infos


POISONS = {
    "shape": (halve_first_matrix, r"tensor \d+ has shape \(\d+, \d+\), expected \(\d+, \d+\)"),
    "oversize": (oversize_first_tensor, r"it streamed over \d+ bytes"),
    "optimizer-entries": (swap_optimizer_tensors, r"optimizer metadata entry \d+ names tensor 1, expected 0"),
}


@pytest.fixture
def refusal_log(tmp_path):
    """A file that state_check's log records go to, in this process and in averager processes forked meanwhile (the
    refusal is logged in the averager's process, whose inherited pytest handlers keep records in its own memory)."""
    handler = logging.FileHandler(tmp_path / "state_check.log")
    logger = logging.getLogger("peer.hivemind_gaps.state_check")
    logger.addHandler(handler)
    yield tmp_path / "state_check.log"
    logger.removeHandler(handler)
    handler.close()


@dataclass
class DownloadScene:
    downloader: TrainingStateAverager
    own_model: torch.nn.Module  # the downloader's parameters
    honest_model: torch.nn.Module  # the honest donor's


@contextlib.contextmanager
def download_scene(
    bootstrap: hivemind.DHT, prefix: str, poison, downloader_class, donor_class=Donor, chunk_timeout=30
):
    """Real averagers on DHTs of their own: a ``donor_class`` serving ``poison(state)`` at the highest priority, an
    honest one below it (parameters +1, so that taking its state shows), and a downloader of ``downloader_class``."""
    initial_peers = [str(maddr) for maddr in bootstrap.get_visible_maddrs()]
    dhts = [hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=initial_peers) for _ in range(3)]
    scene, averagers = DownloadScene(None, tiny_model(), tiny_model()), []
    with torch.no_grad():
        for param in scene.honest_model.parameters():
            param.add_(1.0)
    try:
        for dht, priority, model, served, cls in [
            (dhts[0], 1e9, tiny_model(), poison, donor_class),
            (dhts[1], 5.0, scene.honest_model, None, Donor),
        ]:
            averagers.append(make_averager(cls, dht, prefix, model, poison=served, allow_state_sharing=True))
            averagers[-1].state_sharing_priority, averagers[-1].local_epoch = priority, 5
        # 30 s between chunks: the default 3 s cuts a donor compressing a huge tensor on a busy machine (not a refusal)
        scene.downloader = make_averager(
            downloader_class,
            dhts[2],
            prefix,
            scene.own_model,
            allow_state_sharing=False,
            next_chunk_timeout=chunk_timeout,
        )
        averagers.append(scene.downloader)
        wait_until(lambda: len(offers(dhts[2], prefix)) == 2, 60, "both donors' offers in the DHT")
        yield scene
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("poison", sorted(POISONS))
def test_a_donor_of_another_layout_is_refused_and_the_next_one_used(bootstrap, poison, refusal_log):
    poison_state, refusal = POISONS[poison]
    with download_scene(bootstrap, f"layout-{poison}", poison_state, CheckedTrainingStateAverager) as scene:
        scene.downloader.load_state_from_peers(timeout=60)
        refused = [line for line in refusal_log.read_text().splitlines() if "Refused the training state" in line]
        print(refused)
        assert len(refused) == 1 and re.search(refusal, refused[0]), refused
        assert scene.downloader.refused_states == 1
        assert scene.downloader.local_epoch == 5
        for mine, honest in zip(scene.own_model.parameters(), scene.honest_model.parameters()):
            assert torch.equal(mine, honest)


@pytest.mark.timeout(300)
def test_a_donor_that_streams_for_ever_is_cut_for_its_pace_then_asked_last(bootstrap, refusal_log):
    """hivemind bounds only the wait for each next part: this donor, asked first, would hold the download for ever.
    After the grace its pace (1 B/s) cannot deliver the model's state before the attempt ends: it is cut, the honest
    donor's state is taken, and the next attempt asks it last."""
    with download_scene(bootstrap, "slow", None, CheckedTrainingStateAverager, SlowDonor, chunk_timeout=3) as scene:
        started = time.monotonic()
        scene.downloader.load_state_from_peers(timeout=120)
        first = time.monotonic() - started
        assert scene.downloader.local_epoch == 5 and scene.downloader.refused_states == 0
        for mine, honest in zip(scene.own_model.parameters(), scene.honest_model.parameters()):
            assert torch.equal(mine, honest)
        with torch.no_grad():
            for param in scene.own_model.parameters():
                param.zero_()
        started = time.monotonic()
        scene.downloader.load_state_from_peers(timeout=120)
        second = time.monotonic() - started
        cut = [line for line in refusal_log.read_text().splitlines() if "Gave up the state download" in line]
        print(f"first download {first:.1f} s (the grace: {PACE_GRACE_SECONDS:.0f} s), second {second:.1f} s; {cut}")
        assert len(cut) == 1 and "at that pace it cannot send" in cut[0]
        assert PACE_GRACE_SECONDS <= first < 60 and second < 15
        for mine, honest in zip(scene.own_model.parameters(), scene.honest_model.parameters()):
            assert torch.equal(mine, honest)


class PlainDownloader(HivemindHandleNames, TrainingStateAverager):
    """hivemind's own TrainingStateAverager (the handle names only so that it finds the donors' handlers)."""


def marked_statistics(metadata, tensors, infos):
    """The optimizer statistics filled with 0.5 (finite; a fresh LAMB's are 0), so a test sees if they were applied."""
    count = sum(entry["type"] == "tensor" for entry in metadata["optimizer_metadata"])
    for index in range(len(tensors) - count, len(tensors)):
        if tensors[index].is_floating_point() and tensors[index].dim() > 0:
            replace(tensors, infos, index, torch.full_like(tensors[index], 0.5))
    return metadata, tensors, infos


@pytest.mark.timeout(300)
def test_hivemind_alone_applies_half_a_state_of_another_shape_and_asks_no_other_donor(bootstrap):
    """Gap 3 on plain hivemind: the optimizer statistics of a wrong-shape state are applied, then copying the
    parameters fails; the honest donor is never asked (hivemind.Optimizer then retries the same donor)."""
    poison = lambda *state: halve_first_matrix(*marked_statistics(*state))
    with download_scene(bootstrap, "plain-hivemind", poison, PlainDownloader) as scene:
        with pytest.raises(RuntimeError, match="must match the size of tensor"):
            scene.downloader.load_state_from_peers(timeout=60)
        statistics = [
            value
            for state in scene.downloader.optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0
        ]
        assert statistics and all(bool((value == 0.5).all()) for value in statistics)  # the poisoner's, applied
        assert scene.downloader.local_epoch == 0  # but not its epoch, nor anyone's parameters
        assert not torch.equal(next(scene.own_model.parameters()), next(scene.honest_model.parameters()))


def tiny_model() -> torch.nn.Module:
    return build_run_model("tiny", None).model


def offers(dht: hivemind.DHT, prefix: str) -> dict:
    found = dht.get(f"{prefix}.all_averagers", latest=True)
    return found.value if found is not None and isinstance(found.value, dict) else {}
