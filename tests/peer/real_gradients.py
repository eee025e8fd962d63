"""Real gradients of the tiny preset, one per peer, for tests and benchmarks of the aggregation."""

from __future__ import annotations

import torch

from peer.config import PeerConfig
from peer.runtime import build_batches, build_model


def honest_gradients(count: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """One gradient per peer, each from its own data shard (peer id): one 8-sample batch of 64 tokens, as a tiny
    test peer computes one step."""
    torch.manual_seed(seed)
    config = PeerConfig(model="tiny", batch_size=8, max_length=64)
    tokenizer, model = build_model(config, torch.device("cpu"))
    gradients = []
    for peer in range(count):
        batch = next(build_batches(config, tokenizer, f"peer-{peer}"))
        model.zero_grad()
        model(**batch).loss.backward()
        gradients.append([param.grad.detach().clone() for param in model.parameters()])
    return gradients
