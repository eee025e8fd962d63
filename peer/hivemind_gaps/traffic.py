"""Bytes an averager's all-reduce sends and receives, counted in its own process and read from the peer's.

hivemind 1.1.12 counts no traffic, and its all-reduce runs in the averager's child process (DecentralizedAverager is
a forked ``mp.Process``), where the peer's Prometheus metrics cannot see it. ``CountedTraffic`` is an averager mixin:
in the child it wraps the averager's codec (the parts it sends to other reducers) and, in hivemind's decoder table of
that child only, the codec of the same wire type (the parts it receives as a reducer, the deltas it sends back and
the deltas it receives: hivemind looks those up in the table, peer/hivemind_gaps/codec_registry.py). Each wrapper adds
the payload bytes of the tensor parts it encodes or decodes (``runtime_pb2.Tensor.buffer``: not protobuf fields, libp2p
framing, matchmaking or DHT traffic) to counters in shared memory that the peer's process reads.

Every gradient averager peer/swarm/optimizer.py builds and the local-steps OuterAverager count (averagers.py).

Caveat: a state download received in the same wire type as the all-reduce (``--state-compression`` equal to
``--grad-compression``, e.g. both none) is counted as received; with the quantized codecs it never is.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp

from hivemind.compression import CompressionBase, serialization
from hivemind.proto import runtime_pb2


class CountingCodec(CompressionBase):
    """A codec that adds the bytes of every buffer it encodes to ``sent`` and decodes to ``received``.

    Args:
        codec: the codec doing the work.
        sent, received: shared counters (``mp.Value`` of int64).
    """

    def __init__(self, codec: CompressionBase, sent, received):
        self.codec, self.sent, self.received = codec, sent, received
        self.compression_type = codec.compression_type

    def compress(self, tensor, info, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        serialized = self.codec.compress(tensor, info, allow_inplace)
        with self.sent.get_lock():
            self.sent.value += len(serialized.buffer)
        return serialized

    def extract(self, serialized_tensor: runtime_pb2.Tensor):
        with self.received.get_lock():  # counted before decoding: a refused part was still received
            self.received.value += len(serialized_tensor.buffer)
        return self.codec.extract(serialized_tensor)

    def estimate_compression_ratio(self, info) -> float:
        return self.codec.estimate_compression_ratio(info)


class CountedTraffic:
    """Averager mixin: ``bytes_sent`` / ``bytes_received`` of its all-reduce rounds since it started (module doc)."""

    def __init__(self, *args, **kwargs):
        # created before hivemind's __init__ forks the averager's process, which then shares them
        self._bytes_sent, self._bytes_received = mp.Value(ctypes.c_int64, 0), mp.Value(ctypes.c_int64, 0)
        super().__init__(*args, **kwargs)

    def run(self):
        """The averager's process: count through this averager's codec and its wire type's decoder."""
        codec = CountingCodec(self.allreduce_kwargs["compression"], self._bytes_sent, self._bytes_received)
        self.allreduce_kwargs["compression"] = codec  # hivemind hands it to every AllReduceRunner it builds
        name = runtime_pb2.CompressionType.Name(codec.compression_type)
        table = serialization._BASE_COMPRESSION_TYPES  # this process's copy: other averagers do not count here
        table[name] = CountingCodec(table[name], self._bytes_sent, self._bytes_received)
        super().run()

    @property
    def bytes_sent(self) -> int:
        return self._bytes_sent.value

    @property
    def bytes_received(self) -> int:
        return self._bytes_received.value


def uncounted(codec: CompressionBase) -> CompressionBase:
    """The codec a CountingCodec wraps (``codec`` itself if it counts nothing): for work that sends nothing."""
    return codec.codec if isinstance(codec, CountingCodec) else codec
