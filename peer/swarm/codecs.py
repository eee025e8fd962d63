"""Blockwise 8-bit and 4-bit pseudo-gradient codecs (``--grad-compression int8-block`` / ``int4-block``).

hivemind 1.1.12's own 8-bit codecs cannot decode with numpy >= 2.4, so these are ours. A flattened tensor is cut into
blocks from its start (256 values for 8 bits, 128 for 4 bits: chosen by measured error against bytes,
docs/operating.md); each block is sent as one float32 scale (its largest absolute value
over ``qmax``) and one signed integer code per value, ``round(value / scale)`` in ``[-qmax, qmax]`` (127 for 8 bits,
7 for 4 bits; two 4-bit codes share a byte). Decoding gives float32 ``code * scale``. Why this design:

- absmax (symmetric) scales keep 0 exact and make encoding idempotent: a decoded tensor encodes to the same codes,
  so a peer can quantize its pseudo-gradient itself (``round_trip``), keep the residual for error feedback, and hand
  hivemind values the codec then carries exactly (peer/error_feedback.py);
- float32 scales: pseudo-gradient blocks of ~1e-6 would fall into fp16's subnormals (a coarse grid); the scale costs
  32 / block size bits per value (0.125 for 8 bits, 0.25 for 4 bits);
- ``estimate_compression_ratio`` is exactly bits / 32 (scales left out) so that hivemind's part size
  (``part_size_bytes / (4 * ratio)`` values) is a multiple of the block size and every part starts on a block boundary:
  the blocks hivemind sends are the blocks ``round_trip`` used.

Serialized buffer: a 16-byte header (magic, bits, flags, block size, value count), the block scales, the packed
codes. A part whose codes are at least half zeros (a sparse pseudo-gradient's, ``topk-int4``, and the deltas its
reducers send back) has scales and codes deflated (zlib level 1: measured 4.25 -> 0.84 bits per value at 1/32 of
3 M Gaussian values non-zero, 1.64 at 12%; a dense int4 part saves only ~13%, not worth the CPU). A part whose header
disagrees with its buffer length, its declared shape or dtype, whose deflated payload declares more values than one
of hivemind's parts holds or does not inflate to exactly the size its header implies, or whose scales are not finite
and non-negative is refused with a ValueError before anything sized by the sender's numbers is allocated (hivemind
then bans that sender for the round). Measured error and bytes: docs/operating.md.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import torch
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES
from hivemind.compression.base import CompressionBase, CompressionInfo
from hivemind.compression.floating import Float16Compression
from hivemind.proto import runtime_pb2

HEADER = struct.Struct("<2sBBIQ")  # magic, bits, flags, block size, value count
MAGIC = b"AQ"
MAX_BLOCK_SIZE = 1 << 16
DEFLATED = 1  # the one flag: scales and codes are zlib-deflated
DEFLATE_ZERO_SHARE = 0.5  # deflate a part with at least this share of zero codes


class BlockwiseQuantization(CompressionBase):
    """Blockwise absmax quantization to ``bits`` signed bits per value with float32 per-block scales.

    Args:
        bits: 8 or 4.
        block_size: values per scale.
    """

    def __init__(self, bits: int, block_size: int):
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.bits, self.block_size, self.qmax = bits, block_size, (1 << (bits - 1)) - 1
        # a plain part's memory is bounded by its own length, a deflated one's by this: zlib shrinks zeros ~1000:1,
        # so a 4 MB message could declare (and hold) billions of values. hivemind's parts hold part_size_bytes /
        # (4 * ratio) values: 2**20 for 4 bits, 2**19 for 8
        self.most_deflated_values = DEFAULT_PART_SIZE_BYTES * 32 // (4 * bits)

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        if tensor.dtype != torch.float32:
            raise ValueError(f"{type(self).__name__} sends float32 tensors only, not {tensor.dtype}")
        flat = tensor.detach().cpu().reshape(-1)
        codes, scales = self._quantize(flat)
        packed = pack_nibbles(codes) if self.bits == 4 else codes.numpy().tobytes()
        payload, flags = scales.numpy().tobytes() + packed, 0
        if 0 < codes.numel() <= self.most_deflated_values and (codes == 0).sum() >= DEFLATE_ZERO_SHARE * codes.numel():
            payload, flags = zlib.compress(payload, 1), DEFLATED
        header = HEADER.pack(MAGIC, self.bits, flags, self.block_size, flat.numel())
        return runtime_pb2.Tensor(
            compression=self.compression_type,
            buffer=header + payload,
            size=tensor.shape,
            dtype="float32",
            requires_grad=tensor.requires_grad,
        )

    def _quantize(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes (one per value) and float32 scales (one per block) of a flat float32 tensor."""
        blocks = self._blocks(flat)
        scales = blocks.abs().amax(dim=1) / self.qmax
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero block: codes 0, scale 0
        codes = torch.round(blocks / safe[:, None]).clamp_(-self.qmax, self.qmax).to(torch.int8)
        return codes.reshape(-1)[: flat.numel()], scales

    def _blocks(self, flat: torch.Tensor) -> torch.Tensor:
        padding = -flat.numel() % self.block_size
        return torch.nn.functional.pad(flat.float(), (0, padding)).reshape(-1, self.block_size)

    def round_trip(self, tensor: torch.Tensor) -> torch.Tensor:
        """What this codec delivers for ``tensor`` (float32, same shape): decode(encode(tensor)) without the bytes."""
        flat = tensor.detach().float().cpu().reshape(-1)
        codes, scales = self._quantize(flat)
        return self._dequantize(codes, scales).reshape(tensor.shape)

    def _dequantize(self, codes: torch.Tensor, scales: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
        block_size = block_size or self.block_size
        count = codes.numel()
        padded = torch.nn.functional.pad(codes.float(), (0, -count % block_size))
        return (padded.reshape(-1, block_size) * scales[:, None]).reshape(-1)[:count]

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        count, block_size, payload = self._check(serialized_tensor)
        blocks = math.ceil(count / block_size)
        scales = torch.from_numpy(np.frombuffer(payload, dtype="<f4", count=blocks).copy())
        # a crafted code reaches -(qmax + 1) (int8 -128, nibble 0 -> -8): a larger scale would decode to infinity
        largest = torch.finfo(torch.float32).max / (self.qmax + 1)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()) or bool((scales > largest).any()):
            raise ValueError("a quantized part has a non-finite, negative or overflowing block scale")
        packed = np.frombuffer(payload, dtype=np.uint8 if self.bits == 4 else np.int8, offset=4 * blocks)
        codes = unpack_nibbles(packed, count) if self.bits == 4 else torch.from_numpy(packed.copy())
        values = self._dequantize(codes, scales, block_size)
        return values.reshape(tuple(serialized_tensor.size)).requires_grad_(serialized_tensor.requires_grad)

    def _check(self, serialized: runtime_pb2.Tensor) -> tuple[int, int, bytes | memoryview]:
        """(value count, block size, scales and codes) of a serialized part, after checking that every declared size
        agrees."""
        buffer = serialized.buffer
        if len(buffer) < HEADER.size:
            raise ValueError(f"a quantized part of {len(buffer)} bytes is shorter than its {HEADER.size}-byte header")
        magic, bits, flags, block_size, count = HEADER.unpack_from(buffer)
        if magic != MAGIC or bits != self.bits:
            raise ValueError(f"a part is not {self.bits}-bit blockwise (magic {magic!r}, {bits} bits)")
        if flags & ~DEFLATED:
            raise ValueError(f"a quantized part has unknown flags {flags:#04x}")
        if not 0 < block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"a quantized part declares blocks of {block_size} values (1..{MAX_BLOCK_SIZE})")
        if serialized.dtype != "float32":
            raise ValueError(f"a quantized part declares dtype {serialized.dtype!r}, not float32")
        if math.prod(serialized.size) != count:  # size is uint32 in the protobuf: no negative dimension
            raise ValueError(f"a quantized part's shape {list(serialized.size)[:8]} does not hold its {count} values")
        expected = 4 * -(-count // block_size) + (count * self.bits + 7) // 8
        if flags & DEFLATED and count > self.most_deflated_values:
            raise ValueError(
                f"a deflated quantized part declares {count} values, over a part's {self.most_deflated_values}"
            )
        body = memoryview(buffer)[HEADER.size :]  # not a copy of every received part
        payload = inflate(body, expected) if flags & DEFLATED else body
        if len(payload) != expected:
            raise ValueError(f"a quantized part of {count} values has {len(payload)} bytes, not {expected}")
        return count, block_size, payload

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return self.bits / 32  # scales left out on purpose: parts then start on block boundaries (module docstring)

    def __repr__(self):
        return f"{type(self).__name__}(bits={self.bits}, block_size={self.block_size})"


def inflate(deflated: bytes | memoryview, expected: int) -> bytes:
    """The payload of a deflated part; ValueError unless it is one whole zlib stream of exactly ``expected`` bytes.

    Inflates at most ``expected + 1`` bytes, so a crafted stream (a "zip bomb" of a few bytes that inflates to
    gigabytes) costs no more memory than an honest part of the size the header declares."""
    inflater = zlib.decompressobj()
    try:
        payload = inflater.decompress(deflated, expected + 1)
    except zlib.error as error:
        raise ValueError(f"a deflated quantized part does not inflate: {error}") from None
    if len(payload) != expected or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        raise ValueError(f"a deflated quantized part does not inflate to exactly its {expected} bytes")
    return payload


def pack_nibbles(codes: torch.Tensor) -> bytes:
    """Two 4-bit codes in [-7, 7] per byte (offset by 8), the first in the low nibble; an odd count pads with 0."""
    shifted = (codes.to(torch.int16) + 8).to(torch.uint8)
    if shifted.numel() % 2:
        shifted = torch.cat([shifted, torch.full((1,), 8, dtype=torch.uint8)])
    pairs = shifted.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).numpy().tobytes()


def unpack_nibbles(packed: np.ndarray, count: int) -> torch.Tensor:
    """The ``count`` signed codes of ``pack_nibbles``' bytes (int16: a crafted nibble 0 decodes to -8, harmless)."""
    raw = torch.from_numpy(packed.copy())
    codes = torch.stack([raw & 15, raw >> 4], dim=1).reshape(-1)[:count]
    return codes.to(torch.int16) - 8


class Int8BlockCompression(BlockwiseQuantization):
    """8-bit blockwise codec; sent under hivemind's BLOCKWISE_8BIT type (peer/hivemind_gaps/codec_registry.py)."""

    compression_type = runtime_pb2.CompressionType.BLOCKWISE_8BIT

    def __init__(self, block_size: int = 256):
        super().__init__(8, block_size)


class Int4BlockCompression(BlockwiseQuantization):
    """4-bit blockwise codec; sent under hivemind's QUANTILE_8BIT type (peer/hivemind_gaps/codec_registry.py)."""

    compression_type = runtime_pb2.CompressionType.QUANTILE_8BIT

    def __init__(self, block_size: int = 128):
        super().__init__(4, block_size)


class TopKInt4Compression(Int4BlockCompression):
    """``topk-int4``: a peer sends only the ``keep`` largest of every block of its pseudo-gradient (plus residual), in
    4 bits, deflated; the rest waits in its error feedback (SparseLoCo, arXiv 2508.15706, reports chunk-wise top-k at
    1-3% density with 2-bit values and error feedback training as well as full-precision DiLoCo; this is 1/32 in 4).

    Only ``round_trip`` differs from ``int4-block``: it zeroes all but each block's ``keep`` largest magnitudes before
    quantizing, so the values the peer hands hivemind are sparse and its parts are deflated. The wire format is
    int4-block's (the same decoder, the same slot in hivemind's table), so a reducer's deltas, non-zero wherever any
    member's part was, are int4-block parts too, deflated when at least half zeros. The top-k blocks are the
    quantization blocks: each block's scale is then its kept values' absmax, and a kept value is never rounded to 0
    by a larger one dropped.

    Args:
        keep: values kept per block (4 of 128, 1/32 of the values: measured 0.84 bits per value sent and, with 4
            peers' supports, 1.64 per value received back, against int4-block's 4.25 each way; docs/operating.md).
    """

    def __init__(self, keep: int = 4, block_size: int = 128):
        super().__init__(block_size)
        if not 0 < keep <= block_size:
            raise ValueError(f"keep must be in 1..{block_size}, got {keep}")
        self.keep = keep

    def round_trip(self, tensor: torch.Tensor) -> torch.Tensor:
        """Each block's ``keep`` largest magnitudes of ``tensor``, quantized; zero elsewhere (idempotent: a sparse
        tensor on the grid keeps its non-zeros, which quantize to themselves)."""
        flat = tensor.detach().float().cpu().reshape(-1)
        blocks = self._blocks(flat)
        kept = blocks.abs().topk(self.keep, dim=1).indices
        sparse = torch.zeros_like(blocks).scatter_(1, kept, blocks.gather(1, kept))
        return super().round_trip(sparse.reshape(-1)[: flat.numel()]).reshape(tensor.shape)

    def __repr__(self):
        return f"{type(self).__name__}(keep={self.keep}, block_size={self.block_size})"


class Float16RoundTrip(Float16Compression):
    """hivemind's fp16 codec (same wire format) with ``round_trip``, so that fp16 pseudo-gradients get error feedback
    (casting to fp16 is idempotent, as the module docstring asks)."""

    def round_trip(self, tensor: torch.Tensor) -> torch.Tensor:
        clamped = tensor.detach().float().cpu().clamp(self.FP16_MIN, self.FP16_MAX)
        return clamped.to(torch.float16).float()
