"""The deterministic optimizer and scheduler factories behind ``hivemind.Optimizer``, and the optimizer itself.

The monitor builds its ``TrainingStateAverager`` from the same factories, so the training state has the same layout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import hivemind
import torch
import torch_optimizer
from hivemind.compression import CompressionBase, NoCompression, ScaledFloat16Compression
from transformers import get_linear_schedule_with_warmup

from peer.hivemind_gaps.averager_guard import MembershipCheck
from peer.hivemind_gaps.averagers import (
    CountedGradientAverager,
    GuardedRobustGradientAverager,
    RobustGradientAverager,
)
from peer.hivemind_gaps.bounded_download import StateDownloadFailed
from peer.hivemind_gaps.codec_registry import install_codecs
from peer.hivemind_gaps.optimizer import GuardedOptimizer, SwarmOptimizer
from peer.hivemind_gaps.state_rounds import STATE_ROUND_CLIP
from peer.hivemind_gaps.update_guard import UpdateGuard
from peer.swarm.codecs import Float16RoundTrip, Int4BlockCompression, Int8BlockCompression, TopKInt4Compression
from peer.swarm.config import OptimConfig, SwarmConfig

logger = logging.getLogger(__name__)

# hivemind's 8-bit quantizations are left out on purpose: with numpy >= 2, hivemind 1.1.12 cannot decode them; ours
# take their slots in hivemind's decoder table (peer/hivemind_gaps/codec_registry.py)
COMPRESSION_FACTORIES: dict[str, Callable[[], CompressionBase]] = {
    "none": NoCompression,
    "fp16": Float16RoundTrip,
    "scaled-fp16": ScaledFloat16Compression,
    "int8-block": Int8BlockCompression,
    "int4-block": Int4BlockCompression,
    "topk-int4": TopKInt4Compression,
}
install_codecs()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight decay on matrices and embeddings (rank >= 2); none on biases and LayerNorm gains."""
    parameters = [param for param in model.parameters() if param.requires_grad]
    return [
        {"params": [param for param in parameters if param.dim() >= 2], "weight_decay": weight_decay},
        {"params": [param for param in parameters if param.dim() < 2], "weight_decay": 0.0},
    ]


def guarded_step(optimizer: torch.optim.Optimizer, guard: UpdateGuard, max_grad_norm: float, step, closure):
    """The step of a swarm optimizer: skipped if ``guard`` refuses the averaged gradient, else clipped and taken."""
    grads_of = [param for group in optimizer.param_groups for param in group["params"] if param.grad is not None]
    if not guard.admit(param.grad for param in grads_of):
        return None  # nothing touched: parameters and moments stay as they were
    if max_grad_norm > 0:  # with the norm the guard just took: computing it twice cost a pass over every gradient
        torch.nn.utils.clip_grads_with_norm_(grads_of, max_grad_norm, torch.tensor(guard.last_norm))
    return step(closure)


class ClippedLamb(torch_optimizer.Lamb):
    """LAMB (as in sahajBERT and RuLeanALBERT) that first clips the gradient it is given to ``max_grad_norm``.

    Inside hivemind.Optimizer this gradient is the swarm's averaged one, so clipping acts on the global batch; before
    that, an UpdateGuard skips the step when that gradient is non-finite or absurdly large (peer/hivemind_gaps/update_guard.py).

    Args:
        params: parameters or parameter groups.
        max_grad_norm: L2 norm to clip to; 0 disables clipping.
        guard: the guard that admits or refuses each step (a fresh one if None).
        kwargs: passed to ``torch_optimizer.Lamb``.
    """

    def __init__(self, params, max_grad_norm: float = 0.0, guard: UpdateGuard | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm, self.guard = max_grad_norm, guard or UpdateGuard()

    @torch.no_grad()
    def step(self, closure=None):
        return guarded_step(self, self.guard, self.max_grad_norm, super().step, closure)


def make_optimizer(params, optim: OptimConfig, guard: UpdateGuard | None = None) -> torch.optim.Optimizer:
    """The optimizer factory given to hivemind: LAMB over ``params`` with the run's hyper-parameters."""
    if optim.optimizer == "lamb-8bit":
        return make_lamb_8bit(params, optim, guard or UpdateGuard())
    return ClippedLamb(
        params,
        max_grad_norm=optim.max_grad_norm,
        guard=guard,
        lr=optim.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=optim.weight_decay,
        clamp_value=10000.0,  # as sahajBERT: effectively no clamp of the weight norm in the trust ratio
        debias=True,
    )


def make_lamb_8bit(params, optim: OptimConfig, guard: UpdateGuard) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit LAMB (CUDA only), guarding and clipping the averaged gradient like ClippedLamb."""
    try:
        import bitsandbytes
    except ImportError as error:
        raise RuntimeError("--optimizer lamb-8bit needs bitsandbytes: pip install 'albert-swarm[gpu]'") from error

    class ClippedLamb8bit(bitsandbytes.optim.LAMB8bit):
        @torch.no_grad()
        def step(self, closure=None):
            return guarded_step(self, guard, optim.max_grad_norm, super().step, closure)

    optimizer = ClippedLamb8bit(
        params, lr=optim.learning_rate, betas=(0.9, 0.999), eps=1e-6, weight_decay=optim.weight_decay
    )
    optimizer.guard = guard
    return optimizer


def make_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then linear decay; hivemind steps it once per swarm epoch, so it follows the global epoch."""
    return get_linear_schedule_with_warmup(optimizer, optim.warmup_epochs, optim.total_epochs)


def averaged_statistics(optim: OptimConfig) -> tuple[str, ...]:
    """Optimizer statistics averaged along with the parameters.

    LAMB's moments must be averaged too: a peer that once stepped with its local gradients (no partner that epoch)
    would otherwise keep different moments, and so make different updates, forever. 8-bit states cannot be averaged.
    """
    return ("exp_avg", "exp_avg_sq") if optim.optimizer == "lamb" else ()


def optimizer_with_averagers(
    optim: OptimConfig, membership: MembershipCheck | None
) -> Callable[..., hivemind.Optimizer]:
    """The optimizer class, its averagers chosen: guarded in a closed run; with centered-clip the gradient all-reduce
    and the state rounds robust."""
    robust = optim.aggregation == "centered-clip"
    if membership is None:
        if robust:
            return partial(
                SwarmOptimizer,
                grad_averager_factory=RobustGradientAverager,
                robust_quorum=optim.robust_quorum,
                state_clip_settings=STATE_ROUND_CLIP,
            )
        return partial(SwarmOptimizer, grad_averager_factory=CountedGradientAverager)
    if robust:
        return partial(
            GuardedOptimizer,
            membership=membership,
            grad_averager_class=GuardedRobustGradientAverager,
            robust_quorum=optim.robust_quorum,
            state_clip_settings=STATE_ROUND_CLIP,
        )
    return partial(GuardedOptimizer, membership=membership)


def build_optimizer(
    dht: hivemind.DHT,
    model: torch.nn.Module,
    swarm: SwarmConfig,
    optim: OptimConfig,
    samples_per_step: int,
    membership: MembershipCheck | None = None,
) -> hivemind.Optimizer:
    """Build the collaborative optimizer (call in the main thread; restore signal handlers afterwards).

    Every option is mapped explicitly. client_mode is read from the DHT because the Optimizer's own flag is ignored
    by hivemind 1.1.12. The state it serves to joiners is always one epoch's (see peer/hivemind_gaps/consistent_state.py); in a
    closed run (``membership`` given) its averagers serve run members only.
    """
    optimizer_class = optimizer_with_averagers(optim, membership)
    guard = UpdateGuard()  # shared by every optimizer hivemind builds from the factory; read by the metrics
    optimizer = optimizer_class(
        dht=dht,
        run_id=swarm.run_id,
        target_batch_size=optim.target_batch_size,
        batch_size_per_step=samples_per_step,
        params=param_groups(model, optim.weight_decay),
        optimizer=partial(make_optimizer, optim=optim, guard=guard),
        scheduler=partial(make_scheduler, optim=optim),
        matchmaking_time=optim.matchmaking_time,
        averaging_timeout=optim.averaging_timeout,
        next_chunk_timeout=optim.chunk_timeout,
        load_state_timeout=optim.load_state_timeout,
        offload_optimizer=optim.offload_optimizer,
        delay_optimizer_step=optim.delay_optimizer_step,
        delay_grad_averaging=optim.delay_grad_averaging,
        average_state_every=optim.average_state_every,
        average_opt_statistics=averaged_statistics(optim),
        client_mode=dht.client_mode,
        grad_compression=COMPRESSION_FACTORIES[optim.grad_compression](),
        state_averaging_compression=COMPRESSION_FACTORIES[optim.state_compression](),
        load_state_compression=COMPRESSION_FACTORIES[optim.state_compression](),
        # hivemind warns (rare matchmaking deadlocks) unless requests time out faster than matchmaking
        averager_opts={"bandwidth": optim.bandwidth, "request_timeout": min(3.0, optim.matchmaking_time / 2)},
        # a dead peer's progress entry keeps the survivors waiting for it until it expires: keep it short
        tracker_opts={"metadata_expiration": optim.presence_expiration},
        verbose=True,
    )
    optimizer.update_guard = guard
    return optimizer


def download_state(optimizer: hivemind.Optimizer) -> int | None:
    """Download parameters, optimizer state and epoch from the swarm; returns the epoch, or None if it failed."""
    try:
        optimizer.load_state_from_peers()
    except StateDownloadFailed as error:
        logger.warning(f"Could not download the swarm's state ({error}); going on with the local state")
        return None
    return optimizer.local_epoch
