"""The blockwise int8/int4 codecs (peer/swarm/codecs.py): exact layout, idempotent round trip, crafted parts, the
config rules that admit them, and the error feedback's residual (peer/error_feedback.py).

A crafted part is what an attacker peer's all-reduce would send: a ``runtime_pb2.Tensor`` message of the codec's wire
type whose fields it chose. Each must be refused with a ValueError naming the problem, before the decoder allocates
anything sized by the attacker's numbers (hivemind then bans that sender for the round: see
test_a_peer_sending_crafted_parts_is_dropped_from_the_round in test_pseudo_gradient_codecs.py).
"""

from __future__ import annotations

import math
import struct
import zlib

import pytest
import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from peer.error_feedback import ErrorFeedback
from peer.swarm.codecs import DEFLATED, HEADER, MAGIC, Int4BlockCompression, Int8BlockCompression, TopKInt4Compression
from peer.swarm.config import OptimConfig
from peer.swarm.optimizer import COMPRESSION_FACTORIES

CODECS = {"int8-block": Int8BlockCompression, "int4-block": Int4BlockCompression}


def encode(codec, tensor: torch.Tensor) -> runtime_pb2.Tensor:
    return codec.compress(tensor, CompressionInfo.from_tensor(tensor))


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("count", [1, 127, 128, 129, 1001])
def test_a_round_trip_is_within_half_a_step_and_idempotent(name, count):
    codec = CODECS[name]()
    tensor = torch.randn(count, generator=torch.Generator().manual_seed(count)) * 1e-3
    serialized = encode(codec, tensor)
    decoded = deserialize_torch_tensor(serialized)  # through hivemind's table, as the all-reduce decodes
    blocks = math.ceil(count / codec.block_size)
    assert len(serialized.buffer) == HEADER.size + 4 * blocks + math.ceil(count * codec.bits / 8)
    assert decoded.dtype == torch.float32 and decoded.shape == tensor.shape
    assert torch.equal(decoded, codec.round_trip(tensor))
    steps = torch.nn.functional.pad(tensor.abs(), (0, -count % codec.block_size)).reshape(blocks, -1).amax(1)
    step = (steps / codec.qmax).repeat_interleave(codec.block_size)[:count]
    assert bool(((decoded - tensor).abs() <= step / 2 * (1 + 1e-5)).all())
    # a decoded tensor encodes to itself (to float32 rounding): error feedback relies on it
    assert torch.allclose(codec.round_trip(decoded), decoded, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_zero_blocks_and_shapes_survive(name):
    codec = CODECS[name]()
    tensor = torch.zeros(3, 5, 70)
    tensor[2, 4, 69] = -2.5
    decoded = deserialize_torch_tensor(encode(codec, tensor))
    assert decoded.shape == (3, 5, 70) and decoded[2, 4, 69] == -2.5 and int((decoded != 0).sum()) == 1


def test_hiveminds_table_sends_each_codec_under_its_own_type():
    tensor = torch.randn(300)
    for name, codec in CODECS.items():
        via_table = serialize_torch_tensor(tensor, codec.compression_type)  # how a reducer encodes its deltas
        assert via_table.buffer == encode(COMPRESSION_FACTORIES[name](), tensor).buffer


def test_topk_int4_sends_each_blocks_largest_values_deflated():
    codec = TopKInt4Compression()
    tensor = torch.randn(128 * 500 + 77, generator=torch.Generator().manual_seed(5))
    sent = codec.round_trip(tensor)
    blocks = torch.nn.functional.pad(tensor, (0, -tensor.numel() % 128)).reshape(-1, 128)
    kept = torch.nn.functional.pad(sent, (0, -sent.numel() % 128)).reshape(-1, 128) != 0
    assert int(kept.sum(1).max()) <= codec.keep
    # every kept value is at least as large as every dropped one of its block (4-bit rounding may zero a kept one)
    smallest_kept = torch.where(kept, blocks.abs(), torch.inf).amin(1)
    largest_dropped = torch.where(kept, 0.0, blocks.abs()).amax(1)
    assert bool((smallest_kept >= largest_dropped).all())
    assert torch.equal(codec.round_trip(sent), sent)  # idempotent: error feedback relies on it
    serialized = encode(codec, sent)
    assert HEADER.unpack_from(serialized.buffer)[2] == DEFLATED
    bits = 8 * len(serialized.buffer) / tensor.numel()
    print(f"topk-int4: {bits:.3f} bits per value on the wire at density {float(kept.float().mean()):.4f}")
    assert bits < 1.2  # int4-block: 4.25
    assert torch.equal(deserialize_torch_tensor(serialized), sent)  # hivemind's table decodes it as int4-block
    # a dense part is not deflated: its bytes are int4-block's exactly (test_a_round_trip_is_within_half_a_step...)
    assert HEADER.unpack_from(encode(codec, tensor).buffer)[2] == 0


def deflated(codec, payload: bytes, *, count=300, size=None, flags=DEFLATED) -> runtime_pb2.Tensor:
    """A part of ``codec``'s type whose scales and codes are ``payload``, deflated already."""
    return runtime_pb2.Tensor(
        compression=codec.compression_type,
        buffer=HEADER.pack(MAGIC, codec.bits, flags, codec.block_size, count) + payload,
        size=[count] if size is None else size,
        dtype="float32",
    )


def honest_payload(codec, count=300) -> bytes:
    return struct.pack(
        f"<{math.ceil(count / codec.block_size)}f", *[0.01] * math.ceil(count / codec.block_size)
    ) + bytes(math.ceil(count * codec.bits / 8))


BOMB = zlib.compress(bytes(2**27), 9)  # 130 kB that inflate to 128 MB

# case -> (the part, what the refusal says)
DEFLATE_HOSTILE = {
    # refused after inflating one byte more than the header implies
    "inflates past its size": (lambda codec: deflated(codec, BOMB), "exactly its"),
    # the header matches the bomb: refused before inflating anything, as over one of hivemind's parts
    "declares the bomb's size": (
        lambda codec: deflated(codec, BOMB, count=2**27 * 8 // (codec.bits + 1)),
        "over a part's",
    ),
    "declares 2**64 values": (
        lambda codec: deflated(codec, BOMB, count=(2**32 - 1) ** 2, size=[2**32 - 1] * 2),
        "over",
    ),
    "inflates short of its size": (
        lambda codec: deflated(codec, zlib.compress(honest_payload(codec)[:-1])),
        "exactly its",
    ),
    "not a zlib stream": (lambda codec: deflated(codec, b"\x00garbage" * 10), "does not inflate"),
    "truncated stream": (lambda codec: deflated(codec, zlib.compress(honest_payload(codec))[:-3]), "exactly its"),
    "bytes after the stream": (
        lambda codec: deflated(codec, zlib.compress(honest_payload(codec)) + b"x"),
        "exactly its",
    ),
    "unknown flag": (
        lambda codec: deflated(codec, zlib.compress(honest_payload(codec)), flags=DEFLATED | 4),
        "unknown flags",
    ),
}


@pytest.mark.parametrize("case", sorted(DEFLATE_HOSTILE))
@pytest.mark.parametrize("name", sorted(CODECS))
def test_a_crafted_deflated_part_is_refused_by_name(name, case):
    codec = CODECS[name]()
    assert deserialize_torch_tensor(deflated(codec, zlib.compress(honest_payload(codec)))).shape == (300,)
    part, refusal = DEFLATE_HOSTILE[case]
    with pytest.raises(ValueError, match=refusal):
        deserialize_torch_tensor(part(codec))


def crafted(codec, *, magic=MAGIC, bits=None, block=None, count=None, size=None, dtype="float32", scales=None, tail=0):
    """A part of ``codec``'s type built field by field; by default a valid part of 300 values."""
    bits = codec.bits if bits is None else bits
    block = codec.block_size if block is None else block
    honest = 300
    count = honest if count is None else count
    blocks = math.ceil(honest / codec.block_size)
    scales = [0.01] * blocks if scales is None else scales
    body = struct.pack(f"<{len(scales)}f", *scales) + bytes(math.ceil(honest * codec.bits / 8) + tail)
    return runtime_pb2.Tensor(
        compression=codec.compression_type,
        buffer=HEADER.pack(magic, bits, 0, block, count) + body,
        size=[count] if size is None else size,
        dtype=dtype,
    )


HOSTILE = {
    "short of its header": lambda codec: runtime_pb2.Tensor(compression=codec.compression_type, buffer=b"AQ\x08"),
    "hivemind's own format": lambda codec: crafted(codec, magic=b"\x00\x01"),
    "other bit width": lambda codec: crafted(codec, bits=12 - codec.bits),
    "zero block size": lambda codec: crafted(codec, block=0),
    "huge block size": lambda codec: crafted(codec, block=2**31),
    "count over its buffer": lambda codec: crafted(codec, count=2**62, size=[2**31, 2**31]),
    "shape disagrees": lambda codec: crafted(codec, size=[299]),
    "a zero dimension": lambda codec: crafted(codec, size=[0, 300]),
    "not float32": lambda codec: crafted(codec, dtype="float64"),
    "trailing bytes": lambda codec: crafted(codec, tail=1),
    "NaN scale": lambda codec: crafted(codec, scales=[float("nan"), 0.01, 0.01][: math.ceil(300 / codec.block_size)]),
    "infinite scale": lambda codec: crafted(codec, scales=[float("inf")] * math.ceil(300 / codec.block_size)),
    "negative scale": lambda codec: crafted(codec, scales=[-1.0] * math.ceil(300 / codec.block_size)),
    # finite, but a code of -(qmax + 1) (all-zero bytes are -8 as nibbles) times it is -inf
    "overflowing scale": lambda codec: crafted(codec, scales=[3e38] * math.ceil(300 / codec.block_size)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("name", sorted(CODECS))
def test_a_crafted_part_is_refused_by_name(name, case):
    codec = CODECS[name]()
    assert deserialize_torch_tensor(crafted(codec)).shape == (300,)  # the unaltered craft decodes
    with pytest.raises(ValueError, match="part"):
        deserialize_torch_tensor(HOSTILE[case](codec))


def test_only_float32_is_sent():
    with pytest.raises(ValueError, match="float32"):
        encode(Int8BlockCompression(), torch.ones(4, dtype=torch.float64))


def test_quantized_codecs_need_local_steps_and_never_carry_state():
    assert OptimConfig(local_steps=2, grad_compression="int4-block").grad_compression == "int4-block"
    with pytest.raises(ValueError, match="int8-block needs --local-steps"):
        OptimConfig(grad_compression="int8-block")
    with pytest.raises(ValueError, match="--state-compression int4-block"):
        OptimConfig(local_steps=2, state_compression="int4-block")
    with pytest.raises(ValueError, match="topk-int4 needs --local-steps"):
        OptimConfig(grad_compression="topk-int4")


def test_error_feedback_keeps_what_the_codec_dropped_and_refuses_a_bad_backup():
    feedback = ErrorFeedback(Int4BlockCompression(), [torch.zeros(3, 100)])
    pseudo = [torch.randn(3, 100)]
    sent = feedback.apply(pseudo)
    assert torch.allclose(sent[0] + feedback.residual[0], pseudo[0])
    assert torch.equal(Int4BlockCompression().round_trip(sent[0]), sent[0])
    feedback.load([torch.ones(3, 100)])
    assert torch.equal(feedback.residual[0], torch.ones(3, 100))
    for bad, problem in (
        ([torch.ones(300)], "shape"),
        ([], "tensors"),
        ([torch.full((3, 100), float("nan"))], "finite"),
    ):
        with pytest.raises(ValueError, match=problem):
            feedback.load(bad)
    assert torch.equal(feedback.residual[0], torch.ones(3, 100))  # a refused backup changes nothing
    lossless = ErrorFeedback(COMPRESSION_FACTORIES["none"](), [torch.zeros(2)])
    assert not lossless.enabled and lossless.apply(pseudo) == pseudo
