"""What every node of a run must agree on: how to join the swarm and how the swarm optimizes.

Both the trainer peers and the monitor read these (the monitor builds its copy of the training state from
``OptimConfig``). Each field is described once, in its class docstring's ``Args:`` section: that is its ``--help``
(peer/swarm/field_docs.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peer.swarm.field_docs import help_from_docstring
from peer.swarm.flags import require_non_negative, require_positive, scoped
from peer.swarm.run_key import normalize_fingerprint

COMPRESSIONS = ("none", "fp16", "scaled-fp16", "int8-block", "int4-block", "topk-int4")
# blockwise 8/4-bit (peer/swarm/codecs.py): pseudo-gradients of --local-steps only, which carry an error feedback
QUANTIZED_COMPRESSIONS = ("int8-block", "int4-block", "topk-int4")
AGGREGATIONS = ("mean", "centered-clip")


def is_run_id(text: str) -> bool:
    """Whether ``text`` can name a run: non-empty, without '.', '/' or spaces (every DHT key of the run starts with
    it; hivemind's averagers add '.'-separated parts, e.g. ``{run_id}_state_averager.all_averagers``)."""
    return bool(text) and not any(char in text for char in ". /")


# with --join, the run id and run key come from the join string; --initial-peers adds to its peers
@scoped("per-peer", run_id="run-wide", run_key="run-wide")
@help_from_docstring
@dataclass
class SwarmConfig:
    """How to join the swarm's DHT; shared by trainer peers and the monitor.

    Args:
        run_id: Name of the training run; every DHT key of the run starts with it.
        initial_peers: Multiaddrs of peers already in the swarm (e.g. the monitor's) to bootstrap from; empty starts a
            new swarm.
        host_maddrs: Multiaddrs to listen on; the default accepts connections from other machines.
        announce_maddrs: Multiaddrs other peers should dial (your public address if behind NAT).
        identity_path: Private key file (created if missing) that keeps this peer's id stable across restarts.
        client_mode: Outgoing connections only, for peers behind NAT or a firewall (they cannot serve state).
        use_relay: Allow libp2p circuit relays, so that peers behind NAT can be reached.
        use_auto_relay: Find relays automatically when this peer is not reachable from outside.
        run_key: Fingerprint of the run key the organiser hands out (the monitor prints it); the run is then trusted
            only if its monitor signs with that key (its run record, its checkpoints).
    """

    run_id: str = "albert-swarm"
    initial_peers: list[str] = field(default_factory=list)
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] = field(default_factory=list)
    identity_path: str | None = None
    client_mode: bool = False
    use_relay: bool = True
    use_auto_relay: bool = False
    run_key: str | None = None

    def __post_init__(self):
        if self.run_key:
            self.run_key = normalize_fingerprint(self.run_key)
        if not is_run_id(self.run_id):
            raise ValueError(f"run_id must be a non-empty name without '.', '/' or spaces, got {self.run_id!r}")
        for maddr in (*self.initial_peers, *self.host_maddrs, *self.announce_maddrs):
            if not maddr.startswith("/"):
                raise ValueError(f"{maddr!r} is not a multiaddr (expected e.g. /ip4/1.2.3.4/tcp/31337/p2p/Qm...)")


# every field is the run's (the manifest carries it), but for those that only shape this peer's own load
@scoped("run-wide", bandwidth="per-peer", offload_optimizer="per-peer")
@help_from_docstring
@dataclass
class OptimConfig:
    """How the swarm optimizes; must agree between the peers of one run (the monitor reads it too).

    Args:
        target_batch_size: Samples the whole swarm accumulates per optimizer step (one epoch).
        learning_rate: Peak LAMB learning rate, reached after warm-up.
        warmup_epochs: Epochs of linear learning-rate warm-up.
        total_epochs: Epochs after which the learning rate has decayed to zero.
        weight_decay: LAMB weight decay, on tensors of rank >= 2 only.
        optimizer: lamb (torch-optimizer) or lamb-8bit (bitsandbytes, CUDA only, needs --no-offload-optimizer); the
            optimizer state is shared, so every peer of a run must use the same one.
        max_grad_norm: Clip the swarm-averaged gradient to this L2 norm before the step (0: off).
        matchmaking_time: Seconds to gather an averaging group: 3-5 on a LAN, 15-30 over the internet.
        averaging_timeout: Seconds before an averaging round is abandoned (about 2x a normal all-reduce).
        next_chunk_timeout: Seconds a peer waits for a member's next part of an all-reduce before leaving that member
            out of the round (0: --matchmaking-time, hivemind's rule). A member left out makes the round partial:
            every peer keeps its own values where that member's parts were, so peers do not really average (hivemind
            warns "Averaging: received N% results"). Over slow links set it above the time a part takes (hivemind's
            parts are ~0.5 MB on the wire, sent to every member at once: at 5 Mbit/s and 4 peers ~2.5 s each, an
            estimate from the part size, not a measurement).
        load_state_timeout: Seconds one attempt to download the swarm's training state may take.
        average_state_every: Average parameters and optimizer state with peers every this many epochs (a joiner
            downloads the state whenever it joins; out-of-sync peers reload it at once). With --local-steps: check
            this often whether the peers' outer weights and momentum came apart (a round received in part, a peer
            that stepped alone), and re-sync them (in --state-compression's format) only if so.
        presence_expiration: Seconds a silent peer still counts as a member of the swarm (in the peer count and the
            target batch): how soon survivors forget a dead peer (hivemind's progress-tracker entry).
        grad_compression: Wire format of gradients in all-reduce. int8-block and int4-block (blockwise 8- and 4-bit
            with float32 scales per 256 / 128 values, docs/operating.md) and topk-int4 (int4-block sending only the
            4 largest of every 128 values, deflated) only with --local-steps: each peer feeds what its codec dropped
            back into its next pseudo-gradient, which the synchronous mode does not.
        state_compression: Wire format of parameters and optimizer state in state averaging and downloads, and of
            the outer re-sync with --local-steps (fp16 zeroes LAMB's second moments; scaled-fp16 is refused:
            hivemind cannot send 0-d tensors with it).
        delay_optimizer_step: Apply optimizer steps in the background, one epoch stale (delayed parameter updates).
            With --local-steps: the outer all-reduce runs while the next inner steps go on, and its outer step is
            added to them when it lands (the peer never waits for it: the samples trained meanwhile count toward the
            next round).
        delay_grad_averaging: Average gradients in the background too, for the most overlap (needs
            --delay-optimizer-step; not with --local-steps).
        offload_optimizer: Keep optimizer state in host memory (saves GPU memory).
        bandwidth: This peer's network bandwidth in Mbit/s; balances the all-reduce load (not with centered-clip:
            there every peer reduces an equal share, whatever it declares).
        local_steps: Low-communication (DiLoCo) mode when above 0: each peer takes inner LAMB steps on its own
            batches, and the swarm makes one outer step (one epoch) per local_steps x target_batch_size samples it
            accumulates, all-reducing the pseudo-gradients (outer weights minus local weights, in
            --grad-compression) and applying an outer Nesterov SGD. 0: every epoch all-reduces the gradients.
        outer_learning_rate: Learning rate of the outer Nesterov SGD in local-steps mode (DiLoCo's 0.7).
        outer_momentum: Nesterov momentum of the outer SGD in local-steps mode (DiLoCo's 0.9).
        inner_optimizer: Inner optimizer of local-steps mode: lamb (--optimizer's) or adamw (DiLoCo's; its update
            does not scale with the weights' norm, LAMB's does and the outer momentum compounds it); with adamw,
            --learning-rate is AdamW's.
        aggregation: How each peer reducing a part of the gradient all-reduce combines the members' parts: mean
            (hivemind's weighted mean) or centered-clip (robust to a minority of Byzantine members, who are scored;
            docs/robust-aggregation.md). Run-wide: a mean reducer averages attackers in.
        robust_quorum: With centered-clip: the smallest group a gradient round or a state averaging round averages
            in, as a share of the peers training (0: any group of 2, hivemind's rule). CenteredClip outvotes a
            minority of its group only, and small groups form when peers reach a round apart: 1.0 keeps 2 attackers
            of 5 a minority of every round.
            A leader keeps looking until its group is this large, and a peer refuses a smaller group it was put in;
            a round that finds none steps on the peer's own gradients (hivemind's fallback) at --averaging-timeout
            (a state round: the peer keeps its own state, and its next step waits for that round meanwhile).
            Capped at the peers seen in a peer's last 10 groups (the count is from anyone's progress entries).
    """

    target_batch_size: int = 4096
    learning_rate: float = 0.00176
    warmup_epochs: int = 500
    total_epochs: int = 20000
    weight_decay: float = 0.01
    optimizer: Literal["lamb", "lamb-8bit"] = "lamb"
    max_grad_norm: float = 1.0
    matchmaking_time: float = 15.0
    averaging_timeout: float = 120.0
    next_chunk_timeout: float = 0.0
    load_state_timeout: float = 120.0
    # not hivemind's 1: a state round runs in the background and overlaps the next epoch's gradient matchmaking, so
    # peers still averaging parameters miss the gradient round and the swarm splits into noisier sub-groups. Measured
    # with 4 peers (README "Does it learn?"): every epoch +4.3% held-out loss against one process, every 10 -0.54%
    average_state_every: int = 10
    presence_expiration: float = 10.0
    grad_compression: Literal["none", "fp16", "scaled-fp16", "int8-block", "int4-block", "topk-int4"] = "scaled-fp16"
    # "none" by default: LAMB's second moments (~1e-10) fall below fp16's smallest value, so fp16 state transfers
    # zero them (measured: 96% zeros in a newcomer's downloaded state) and newcomers then take oversized steps
    state_compression: Literal["none", "fp16", "scaled-fp16"] = "none"
    delay_optimizer_step: bool = False
    delay_grad_averaging: bool = False
    offload_optimizer: bool = True
    bandwidth: float = 100.0
    local_steps: int = 0
    outer_learning_rate: float = 0.7
    outer_momentum: float = 0.9
    inner_optimizer: Literal["lamb", "adamw"] = "lamb"

    @property
    def chunk_timeout(self) -> float:
        """Seconds to wait for a member's next all-reduce part (--next-chunk-timeout, or --matchmaking-time)."""
        return self.next_chunk_timeout or self.matchmaking_time

    @property
    def training_mode(self) -> str:
        """How the swarm trains: "synchronous" (one all-reduced gradient per epoch) or "local-steps" (DiLoCo)."""
        return "local-steps" if self.local_steps else "synchronous"

    aggregation: Literal["mean", "centered-clip"] = "mean"
    robust_quorum: float = 0.0

    def __post_init__(self):
        require_positive(self, "target_batch_size", "learning_rate", "total_epochs", "matchmaking_time")
        require_positive(self, "averaging_timeout", "load_state_timeout", "average_state_every", "bandwidth")
        require_positive(self, "presence_expiration")
        require_non_negative(self, "warmup_epochs", "weight_decay", "max_grad_norm", "local_steps")
        require_non_negative(self, "next_chunk_timeout")
        require_positive(self, "outer_learning_rate")
        if not 0 <= self.outer_momentum < 1:
            raise ValueError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}")
        if self.inner_optimizer not in ("lamb", "adamw"):
            raise ValueError(f"inner_optimizer must be lamb or adamw, got {self.inner_optimizer!r}")
        if self.state_compression == "scaled-fp16":  # hivemind 1.1.12 takes tensor.shape[-1] of each tensor it sends
            raise ValueError(
                "--state-compression scaled-fp16 cannot send LAMB's 0-d statistics (hivemind's codec raises "
                "IndexError on them, so no peer could serve its state): use none (the default) or fp16"
            )
        if self.state_compression in QUANTIZED_COMPRESSIONS:
            raise ValueError(
                f"--state-compression {self.state_compression} would quantize weights and moments: use none or fp16"
            )
        if self.grad_compression in QUANTIZED_COMPRESSIONS and not self.local_steps:
            raise ValueError(
                f"--grad-compression {self.grad_compression} needs --local-steps: only that mode feeds each peer's "
                "quantization error back into its next round (synchronous gradients would carry it as a bias)"
            )
        if self.local_steps and self.aggregation != "mean":
            raise ValueError(
                "--aggregation centered-clip works in the synchronous mode only: drop it or --local-steps"
            )
        if self.local_steps and self.delay_grad_averaging:
            raise ValueError("--local-steps takes no --delay-grad-averaging: use --delay-optimizer-step to overlap")
        if self.warmup_epochs > self.total_epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds total_epochs ({self.total_epochs})")
        for name in ("grad_compression", "state_compression"):
            if getattr(self, name) not in COMPRESSIONS:
                raise ValueError(f"{name} must be one of {COMPRESSIONS}, got {getattr(self, name)!r}")
        if self.delay_grad_averaging and not self.delay_optimizer_step:
            raise ValueError("--delay-grad-averaging needs --delay-optimizer-step")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not 0 <= self.robust_quorum <= 1:
            raise ValueError(f"robust_quorum is a share of the peers, in [0, 1]: got {self.robust_quorum}")
        if self.robust_quorum and self.aggregation != "centered-clip":
            raise ValueError("--robust-quorum needs --aggregation centered-clip (a mean is moved by any group)")
        if self.optimizer not in ("lamb", "lamb-8bit"):
            raise ValueError(f"optimizer must be lamb or lamb-8bit, got {self.optimizer!r}")
        if self.optimizer == "lamb-8bit" and self.offload_optimizer:
            raise ValueError("--optimizer lamb-8bit keeps its state on the GPU: add --no-offload-optimizer")
        if self.delay_optimizer_step and not self.offload_optimizer and not self.local_steps:
            raise ValueError("--delay-optimizer-step needs --offload-optimizer")
