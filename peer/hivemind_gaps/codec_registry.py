"""Our pseudo-gradient codecs in hivemind's decoder table, so that its all-reduce sends and receives them unchanged.

hivemind 1.1.12 decodes every received tensor part with ``deserialize_torch_tensor``, which looks the codec up in a
fixed table (``hivemind.compression.serialization._BASE_COMPRESSION_TYPES``) keyed by the protobuf enum
``CompressionType``; a reducer also re-encodes its deltas with the table's codec of the part's type. A codec of one's
own therefore cannot be received unless it takes one of the enum's slots. Ours take the two 8-bit slots whose
hivemind decoders fail with numpy >= 2.4 anyway: BLOCKWISE_8BIT carries ``int8-block``, QUANTILE_8BIT ``int4-block``
and ``topk-int4`` (the same wire format; UNIFORM_8BIT stays hivemind's). A part of hivemind's own format under those
types is refused by our decoders' magic check (a ValueError: hivemind bans that sender for the round), so a
plain-hivemind peer cannot be misread.

Installed when peer.swarm.optimizer is imported (every process that builds an averager imports it before it forks
the averager, which inherits the table).
"""

from __future__ import annotations

from hivemind.compression import serialization
from hivemind.proto import runtime_pb2

from peer.swarm.codecs import Int4BlockCompression, Int8BlockCompression

OUR_CODECS = (Int8BlockCompression, Int4BlockCompression)


def install_codecs() -> None:
    """Put our codecs in hivemind's decoder table (idempotent)."""
    for codec in OUR_CODECS:
        serialization._BASE_COMPRESSION_TYPES[runtime_pb2.CompressionType.Name(codec.compression_type)] = codec()
