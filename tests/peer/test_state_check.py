"""A downloaded state must have the local layout and fit the stream bound: check_state on crafted states, the layout
read from a real averager, and real downloads from real hivemind donors (their own DHTs and averager processes here)
serving a wrong layout or too many bytes at the highest priority, beside an honest donor.
"""

from __future__ import annotations

import logging
import re
from functools import partial

import hivemind
import pytest
import torch
from hivemind.compression import CompressionInfo
from hivemind.optim.state_averager import TrainingStateAverager, dump_optimizer_state
from hivemind.proto import averaging_pb2
from hivemind.utils.streaming import split_for_streaming

from monitor.state import build_run_model
from peer.config import OptimConfig
from peer.hivemind_gaps.averagers import CheckedTrainingStateAverager, HivemindHandleNames
from peer.hivemind_gaps.state_check import StateRefused, check_state
from peer.hivemind_gaps.state_layout import VALUE, StateLayout, local_layout
from peer.swarm import COMPRESSION_FACTORIES, make_optimizer, make_scheduler, param_groups
from tests.harness import TINY_OPTIM, wait_until

OPTIM = OptimConfig(**TINY_OPTIM)
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def honest_state(epoch: int = 7) -> tuple[dict, list[torch.Tensor], StateLayout]:
    """A small state (two parameters, one optimizer tensor) and the layout it was built with."""
    entries = [{"type": "value", "value": 0.05}, {"type": "tensor", "index": 0}]
    metadata = {"epoch": epoch, "group_bits": "", "optimizer_metadata": entries}
    tensors = [torch.randn(16, 4), torch.zeros(3), torch.arange(5)]
    return metadata, tensors, StateLayout.of_tensors(tensors, optimizer_entries=(VALUE, 0))


def test_a_state_of_the_local_layout_passes():
    metadata, tensors, layout = honest_state()
    check_state(metadata, tensors, 100, layout)


@pytest.mark.parametrize(
    ("tensors_change", "match"),
    [
        ({0: torch.randn(8, 4)}, r"^tensor 0 has shape \(8, 4\), expected \(16, 4\)$"),
        ({1: torch.zeros(3, 1)}, r"^tensor 1 has shape \(3, 1\), expected \(3,\)$"),
        ({1: torch.zeros(3, dtype=torch.float64)}, "^tensor 1 has dtype torch.float64, expected torch.float32$"),
        ({2: torch.arange(5.0)}, "^tensor 2 has dtype torch.float32, expected torch.int64$"),
        ({2: [0, 1, 2, 3, 4]}, "^tensor 2 is a list$"),
        ({2: None}, "^it has 2 tensors, expected 3$"),
        ({3: torch.zeros(1)}, "^it has 4 tensors, expected 3$"),
    ],
)
def test_a_state_of_another_layout_is_refused_naming_the_first_mismatch(tensors_change, match):
    metadata, tensors, layout = honest_state()
    for index, tensor in tensors_change.items():  # None: drop it
        tensors[index : index + 1] = [] if tensor is None else [tensor]
    with pytest.raises(StateRefused, match=match):
        check_state(metadata, tensors, 100, layout)


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([{"type": "value", "value": 0.05}], "has 1 entries, expected 2"),
        ({"0": {"type": "tensor", "index": 0}}, "has dict entries, expected 2"),
        ([{"type": "tensor", "index": 0}, {"type": "tensor", "index": 0}], "entry 0 .* expected a value"),
        ([{"type": "value", "value": 0.05}, {"type": "tensor", "index": 1}], "entry 1 .* expected tensor 0"),
        ([{"type": "value", "value": 0.05}, {"type": "tensor", "index": True}], "entry 1 .* expected tensor 0"),
        ([{"type": "value", "value": 0.05}, {"type": "value", "value": 1}], "entry 1 .* expected tensor 0"),
        ([{"type": "value", "value": 0.05}, "tensor"], "entry 1 is a str, not a dict"),
    ],
)
def test_optimizer_metadata_naming_other_tensors_is_refused(entries, match):
    metadata, tensors, layout = honest_state()
    metadata["optimizer_metadata"] = entries
    with pytest.raises(StateRefused, match=match):
        check_state(metadata, tensors, 100, layout)


def test_a_non_finite_tensor_of_the_right_layout_is_still_refused():
    metadata, tensors, layout = honest_state()
    tensors[1][0] = float("inf")
    with pytest.raises(StateRefused, match="tensor 1 .* NaN or infinite"):
        check_state(metadata, tensors, 100, layout)


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
    assert layout == StateLayout.of_tensors(tensors, layout.optimizer_entries)
    flat_metadata, _ = dump_optimizer_state(tiny_averager.optimizer)
    assert flat_metadata == metadata["optimizer_metadata"]
    expected = tuple(entry["index"] if entry["type"] == "tensor" else VALUE for entry in flat_metadata)
    assert layout.optimizer_entries == expected
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
    "optimizer-entries": (swap_optimizer_tensors, r"optimizer metadata entry \d+ .* expected tensor \d+"),
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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("poison", sorted(POISONS))
def test_a_donor_of_another_layout_is_refused_and_the_next_one_used(bootstrap, poison, refusal_log):
    """Three processes' worth of real averagers: a poisoned donor at the highest priority, an honest one below it,
    and a checked downloader; the downloader ends up with the honest state, the refusal logged and counted."""
    prefix, poisoned_model, own_model = f"layout-{poison}", build_run_model("tiny", None).model, tiny_model()
    initial_peers = [str(maddr) for maddr in bootstrap.get_visible_maddrs()]
    dhts = [hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=initial_peers) for _ in range(3)]
    honest_model = tiny_model()
    with torch.no_grad():
        for param in honest_model.parameters():
            param.add_(1.0)  # what the downloader must end up with
    averagers = []
    try:
        poison_state, refusal = POISONS[poison]
        donors = [(dhts[0], 1e9, poisoned_model, poison_state), (dhts[1], 5.0, honest_model, None)]
        for dht, priority, model, served in donors:
            averagers.append(make_averager(Donor, dht, prefix, model, poison=served, allow_state_sharing=True))
            averagers[-1].state_sharing_priority, averagers[-1].local_epoch = priority, 5
        downloader = make_averager(CheckedTrainingStateAverager, dhts[2], prefix, own_model, allow_state_sharing=False)
        averagers.append(downloader)
        wait_until(lambda: len(offers(dhts[2], prefix)) == 2, 60, "both donors' offers in the DHT")
        downloader.load_state_from_peers(timeout=60)
        refused = [line for line in refusal_log.read_text().splitlines() if "Refused the training state" in line]
        print(refused)
        assert len(refused) == 1 and re.search(refusal, refused[0]), refused
        assert downloader.refused_states == 1
        assert downloader.local_epoch == 5
        for mine, honest in zip(own_model.parameters(), honest_model.parameters()):
            assert torch.equal(mine, honest)
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


def tiny_model() -> torch.nn.Module:
    return build_run_model("tiny", None).model


def offers(dht: hivemind.DHT, prefix: str) -> dict:
    found = dht.get(f"{prefix}.all_averagers", latest=True)
    return found.value if found is not None and isinstance(found.value, dict) else {}
