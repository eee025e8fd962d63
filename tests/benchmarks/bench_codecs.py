"""Block size of the blockwise pseudo-gradient codecs: relative error against bits per value (run by hand).

    python -m tests.benchmarks.bench_codecs

For 8 and 4 bits and blocks of 64..1024 values, encodes and decodes 2**20 values of two kinds and prints the bits
per value on the wire (codes, float32 scales, header) and ||decoded - x|| / ||x||: Gaussian values, and
heavy-tailed ones (Student-t, 3 degrees of freedom, each run of 1024 values scaled by exp(N(0, 1))) like
pseudo-gradients whose tensors and rows differ in scale. The figures chose the defaults of peer/swarm/codecs.py
and are in docs/operating.md.
"""

from __future__ import annotations

import torch
from hivemind.compression import CompressionInfo

from peer.swarm.codecs import Int4BlockCompression, Int8BlockCompression

COUNT = 1 << 20


def samples() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(COUNT, generator=generator)
    normal, chi2 = torch.randn(COUNT, generator=generator), torch.randn(3, COUNT, generator=generator).pow(2).sum(0)
    rows = torch.exp(torch.randn(COUNT // 1024, generator=generator)).repeat_interleave(1024)
    return {"gaussian": gaussian, "t3, row-scaled": normal / (chi2 / 3).sqrt() * rows}


def main() -> None:
    for kind, values in samples().items():
        for codec_class in (Int8BlockCompression, Int4BlockCompression):
            for block in (64, 128, 256, 512, 1024):
                codec = codec_class(block)
                serialized = codec.compress(values, CompressionInfo.from_tensor(values))
                error = ((codec.extract(serialized) - values).norm() / values.norm()).item()
                bits = 8 * len(serialized.buffer) / COUNT
                print(f"{kind:15s} {codec.bits} bits, block {block:5d}: {bits:.3f} bits/value, error {error:.4f}")


if __name__ == "__main__":
    main()
