"""Configuration of a trainer peer: one dataclass per concern, read from CLI flags and ALBERT_* environment variables.

A flag wins over its environment variable (``--run-id`` over ``ALBERT_RUN_ID``), which wins over the default.
Each field is described once, in its class docstring's ``Args:`` section: that is its ``--help`` (peer/field_docs.py).
"""

from __future__ import annotations

import copy
import os
import shlex
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

from transformers import HfArgumentParser

from peer.field_docs import help_from_docstring
from peer.run_key import normalize_fingerprint

ENV_PREFIX = "ALBERT_"
COMPRESSIONS = ("none", "fp16", "scaled-fp16")


def env_var(field_name: str) -> str:
    """The environment variable that sets a config field, e.g. run_id -> ALBERT_RUN_ID."""
    return ENV_PREFIX + field_name.upper()


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
        if not self.run_id or any(char in self.run_id for char in ". /"):
            raise ValueError(f"run_id must be a non-empty name without '.', '/' or spaces, got {self.run_id!r}")
        for maddr in (*self.initial_peers, *self.host_maddrs, *self.announce_maddrs):
            if not maddr.startswith("/"):
                raise ValueError(f"{maddr!r} is not a multiaddr (expected e.g. /ip4/1.2.3.4/tcp/31337/p2p/Qm...)")


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
        load_state_timeout: Seconds one attempt to download the swarm's training state may take.
        average_state_every: Average parameters and optimizer state with peers every this many epochs (a joiner
            downloads the state whenever it joins; out-of-sync peers reload it at once).
        progress_expiration: Seconds a peer's hivemind progress entry lives unrefreshed: how soon survivors forget a
            dead peer.
        grad_compression: Wire format of gradients in all-reduce.
        state_compression: Wire format of parameters and optimizer state in state averaging and downloads (fp16
            zeroes LAMB's second moments).
        delay_optimizer_step: Apply optimizer steps in the background, one epoch stale (delayed parameter updates).
        delay_grad_averaging: Average gradients in the background too, for the most overlap (needs
            --delay-optimizer-step).
        offload_optimizer: Keep optimizer state in host memory (saves GPU memory).
        bandwidth: This peer's network bandwidth in Mbit/s; balances the all-reduce load.
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
    load_state_timeout: float = 120.0
    # not hivemind's 1: a state round runs in the background and overlaps the next epoch's gradient matchmaking, so
    # peers still averaging parameters miss the gradient round and the swarm splits into noisier sub-groups. Measured
    # with 4 peers (README "Does it learn?"): every epoch +4.3% held-out loss against one process, every 10 -0.54%
    average_state_every: int = 10
    progress_expiration: float = 10.0
    grad_compression: Literal["none", "fp16", "scaled-fp16"] = "scaled-fp16"
    # "none" by default: LAMB's second moments (~1e-10) fall below fp16's smallest value, so fp16 state transfers
    # zero them (measured: 96% zeros in a newcomer's downloaded state) and newcomers then take oversized steps
    state_compression: Literal["none", "fp16", "scaled-fp16"] = "none"
    delay_optimizer_step: bool = False
    delay_grad_averaging: bool = False
    offload_optimizer: bool = True
    bandwidth: float = 100.0

    def __post_init__(self):
        _require_positive(self, "target_batch_size", "learning_rate", "total_epochs", "matchmaking_time")
        _require_positive(self, "averaging_timeout", "load_state_timeout", "average_state_every", "bandwidth")
        _require_positive(self, "progress_expiration")
        _require_non_negative(self, "warmup_epochs", "weight_decay", "max_grad_norm")
        if self.warmup_epochs > self.total_epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds total_epochs ({self.total_epochs})")
        for name in ("grad_compression", "state_compression"):
            if getattr(self, name) not in COMPRESSIONS:
                raise ValueError(f"{name} must be one of {COMPRESSIONS}, got {getattr(self, name)!r}")
        if self.delay_grad_averaging and not self.delay_optimizer_step:
            raise ValueError("--delay-grad-averaging needs --delay-optimizer-step")
        if self.optimizer not in ("lamb", "lamb-8bit"):
            raise ValueError(f"optimizer must be lamb or lamb-8bit, got {self.optimizer!r}")
        if self.optimizer == "lamb-8bit" and self.offload_optimizer:
            raise ValueError("--optimizer lamb-8bit keeps its state on the GPU: add --no-offload-optimizer")
        if self.delay_optimizer_step and not self.offload_optimizer:
            raise ValueError("--delay-optimizer-step needs --offload-optimizer")


@help_from_docstring
@dataclass
class PeerConfig:
    """What this trainer peer trains on and how it behaves locally.

    Args:
        model: Model preset (tiny, base, ...) or path to a config.json.
        tokenizer: Tokenizer directory (default: the bundled tokenizer).
        corpus: Text corpus, a file or a directory (default: the bundled corpus).
        batch_size: Samples per forward/backward pass on this device.
        grad_accumulation: Passes accumulated locally before they are counted towards the swarm batch.
        max_length: Tokens per training sample.
        gradient_checkpointing: Recompute activations during backward to save memory.
        device: auto, cpu, cuda, cuda:N or mps.
        precision: auto (bf16 on capable CUDA, else fp16 on CUDA, fp32 elsewhere), fp32, bf16 or fp16.
        backup_dir: Directory of local backups (model and optimizer state).
        backup_every: Write a backup every this many epochs (0: only on exit).
        keep_backups: Number of most recent backups to keep.
        metrics_port: Port of this peer's Prometheus /metrics (0: off).
        metrics_expiration: Seconds this peer's signed progress record stays in the DHT unrefreshed.
        seed: Seed of model initialisation and data order (the data order also mixes in the peer id).
        torch_threads: CPU threads used by torch (0: torch's default).
        max_epochs: Stop once the swarm reaches this epoch (0: train until stopped).
        load_state_attempts: Attempts to download the swarm's state before going on without it.
        join_url: Closed runs: the monitor's http://host:port that issues access tokens.
        run_secret_file: Closed runs: file holding the run's shared secret, on its first line (re-read at each
            renewal; needs --join-url).
        join_key_file: Closed runs: join key (`python -m peer.access new-join-key PATH`) whose public key the monitor
            allowlists (needs --join-url).
    """

    model: str = "tiny"
    tokenizer: str | None = None
    corpus: str | None = None
    batch_size: int = 8
    grad_accumulation: int = 1
    max_length: int = 128
    gradient_checkpointing: bool = False
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    backup_dir: str = "albert-swarm-run/backups"
    backup_every: int = 10
    keep_backups: int = 2
    metrics_port: int = 0
    metrics_expiration: float = 30.0
    seed: int = 0
    torch_threads: int = 0
    max_epochs: int = 0
    load_state_attempts: int = 3
    join_url: str | None = None
    run_secret_file: str | None = None
    join_key_file: str | None = None

    def __post_init__(self):
        _require_positive(self, "batch_size", "grad_accumulation", "max_length", "keep_backups", "metrics_expiration")
        _require_positive(self, "load_state_attempts")
        _require_non_negative(self, "backup_every", "torch_threads", "max_epochs", "metrics_port")
        if self.metrics_port > 65535:
            raise ValueError(f"metrics_port must be below 65536, got {self.metrics_port}")
        if not (self.device in ("auto", "cpu", "mps") or self.device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        self._check_access()

    def _check_access(self) -> None:
        credentials = [name for name in ("run_secret_file", "join_key_file") if getattr(self, name)]
        flags = [f"--{name.replace('_', '-')}" for name in credentials]
        if credentials and not self.join_url:
            raise ValueError(f"{flags[0]} needs --join-url (the monitor's http://host:port that admits peers)")
        if self.join_url and not credentials:
            raise ValueError("--join-url needs a credential: --run-secret-file or --join-key-file")
        if len(credentials) > 1:
            raise ValueError("give one credential: --run-secret-file or --join-key-file, not both")
        if self.join_url and not self.join_url.startswith(("http://", "https://")):
            raise ValueError(f"--join-url must be the monitor's http://host:port, got {self.join_url!r}")
        for name, flag in zip(credentials, flags):
            if not os.path.isfile(getattr(self, name)):
                raise ValueError(f"{flag} {getattr(self, name)!r} is not a file")

    @property
    def closed_run(self) -> bool:
        """True if this peer joins a closed run (it asks the monitor for an access token first)."""
        return bool(self.join_url)

    @property
    def samples_per_step(self) -> int:
        """Samples this peer reports to the swarm per optimizer.step call."""
        return self.batch_size * self.grad_accumulation


def _require_positive(config, *names: str) -> None:
    for name in names:
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)!r}")


def _require_non_negative(config, *names: str) -> None:
    for name in names:
        if not getattr(config, name) >= 0:
            raise ValueError(f"{name} must be zero or positive, got {getattr(config, name)!r}")


class EnvArgumentParser(HfArgumentParser):
    """HfArgumentParser whose defaults come from ALBERT_* environment variables, named in every --help line."""

    def __init__(self, dataclass_types, environ: dict | None = None, **kwargs):
        self.environ = os.environ if environ is None else environ
        super().__init__(dataclass_types, **kwargs)

    def _parse_dataclass_field(self, parser, dataclass_field):
        # a copy, so that the class's own field metadata is not rewritten each time a parser is built
        annotated = copy.copy(dataclass_field)
        help_text = f"{dataclass_field.metadata.get('help', '')} [env {env_var(dataclass_field.name)}]"
        annotated.metadata = types.MappingProxyType({**dataclass_field.metadata, "help": help_text})
        super()._parse_dataclass_field(parser, annotated)

    def env_arguments(self) -> list[str]:
        """Command-line tokens equivalent to the ALBERT_* variables that are set (placed before the real flags)."""
        tokens = []
        for dataclass_type in self.dataclass_types:
            for dataclass_field in fields(dataclass_type):
                value = self.environ.get(env_var(dataclass_field.name))
                if value is None or value.strip() == "":
                    continue
                if getattr(dataclass_field.type, "__origin__", None) is list:
                    # lists come as space- or comma-separated words, e.g. ALBERT_INITIAL_PEERS="/ip4/... /ip4/..."
                    tokens += [f"--{dataclass_field.name}", *shlex.split(value.replace(",", " "))]
                else:
                    tokens.append(f"--{dataclass_field.name}={value}")
        return tokens

    def error(self, message: str):
        in_env = [name for name in self.environ if name.startswith(ENV_PREFIX)]
        if in_env:
            message += f" (values may come from the environment: {', '.join(sorted(in_env))})"
        super().error(message)


def parse_configs(*dataclass_types: type, args: Sequence[str] | None = None, environ: dict | None = None):
    """Parse the given config dataclasses from ALBERT_* variables then flags; exit with a clear message if invalid.

    Returns one instance per type, in order. Validation errors from ``__post_init__`` exit with status 2 like
    argparse's own errors, naming the offending value.
    """
    parser = EnvArgumentParser(dataclass_types, environ=environ)
    argv = list(sys.argv[1:] if args is None else args)
    try:
        return parser.parse_args_into_dataclasses(args=parser.env_arguments() + argv, look_for_args_file=False)
    except ValueError as error:
        parser.error(str(error))
