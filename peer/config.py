"""Configuration of a trainer peer's own behaviour, read from CLI flags and ALBERT_* environment variables.

What the whole run agrees on (joining the swarm, the optimizer) is in peer/swarm/config.py; this is what each peer
chooses for itself. Each field is described once, in its class docstring's ``Args:`` section: that is its ``--help``
(peer/swarm/field_docs.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from peer.swarm.field_docs import help_from_docstring
from peer.swarm.flags import require_non_negative, require_positive, scoped
from peer.swarm.names import why_refused_as_own_name


@scoped("per-peer", model="run-wide", tokenizer="run-wide", corpus="run-default")
@help_from_docstring
@dataclass
class PeerConfig:
    """What this trainer peer trains on and how it behaves locally.

    Args:
        name: Display name shown on the monitor's contributors table (at most 32 printable characters, no markup;
            names are not unique: the dashboard also shows a short id). Keep --identity-path to keep your history.
        model: Model preset (tiny, base, ...) or path to a config.json.
        tokenizer: Tokenizer directory (default: the bundled tokenizer).
        corpus: Text corpus, a file or a directory (default: the bundled corpus).
        batch_size: Samples per forward/backward pass on this device, or auto: on CUDA the largest that fits (a short
            probe at --max-length; at most 1/16 of the target batch) and --grad-accumulation up to 1/16 of the
            target batch per step; on CPU 8 per pass and torch threads from the cores.
        grad_accumulation: Passes accumulated locally before they are counted towards the swarm batch (set by
            --batch-size auto).
        max_length: Tokens per training sample.
        gradient_checkpointing: Recompute activations during backward to save memory.
        device: auto, cpu, cuda, cuda:N or mps.
        precision: auto (bf16 on capable CUDA, else fp16 on CUDA, fp32 elsewhere), fp32, bf16 or fp16.
        backup_dir: Directory of local backups (model and optimizer state).
        backup_every: Write a backup every this many epochs (0: only on exit).
        keep_backups: Number of most recent backups to keep.
        metrics_port: Port of this peer's Prometheus /metrics (0: off).
        record_expiration: Seconds this peer's signed progress record stays in the DHT unrefreshed (the monitor shows
            the peer until then).
        seed: Seed of model initialisation and data order (the data order also mixes in the peer id).
        torch_threads: CPU threads used by torch (0: torch's default).
        max_epochs: Stop once the swarm reaches this epoch (0: train until stopped).
        load_state_attempts: Attempts to download the swarm's state before going on without it.
        join_url: Closed runs: the monitor's http://host:port that issues access tokens.
        run_secret_file: Closed runs: file holding the run's shared secret, on its first line (re-read at each
            renewal; needs --join-url).
        join_key_file: Closed runs: join key (`python -m peer.swarm.access new-join-key PATH`) whose public key the monitor
            allowlists (needs --join-url).
        join: The join string the run's organiser hands out (albert1....): the peer fetches the run's signed
            manifest from the monitor and adopts every run-wide setting; no other flag is needed.
        cache_dir: Where a peer started with --join keeps what it fetched from the run (tokenizers, model configs).
    """

    name: str = ""
    model: str = "tiny"
    tokenizer: str | None = None
    corpus: str | None = None
    batch_size: int | str = 8  # an int, or "auto" until peer/batch_size.py resolves it
    grad_accumulation: int = 1
    max_length: int = 128
    gradient_checkpointing: bool = False
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    backup_dir: str = "albert-swarm-run/backups"
    backup_every: int = 10
    keep_backups: int = 2
    metrics_port: int = 0
    record_expiration: float = 30.0
    seed: int = 0
    torch_threads: int = 0
    max_epochs: int = 0
    load_state_attempts: int = 3
    join_url: str | None = None
    run_secret_file: str | None = None
    join_key_file: str | None = None
    join: str | None = None
    cache_dir: str = "~/.cache/albert-swarm"

    def __post_init__(self):
        self._check_batch_size()
        require_positive(self, "grad_accumulation", "max_length", "keep_backups", "record_expiration")
        require_positive(self, "load_state_attempts")
        require_non_negative(self, "backup_every", "torch_threads", "max_epochs", "metrics_port")
        if self.metrics_port > 65535:
            raise ValueError(f"metrics_port must be below 65536, got {self.metrics_port}")
        if not (self.device in ("auto", "cpu", "mps") or self.device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        self._check_access()
        reason = why_refused_as_own_name(self.name) if self.name else None
        if reason is not None:
            raise ValueError(f"--name {self.name!r} {reason}: a display name is short plain text, shown to everyone")

    def _check_batch_size(self) -> None:
        if self.batch_size == "auto":
            return
        try:
            self.batch_size = int(self.batch_size)
        except ValueError:
            raise ValueError(f"batch_size must be a positive integer or auto, got {self.batch_size!r}") from None
        require_positive(self, "batch_size")

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
        """Samples this peer reports to the swarm per optimizer.step call (once --batch-size auto is resolved)."""
        if self.batch_size == "auto":
            raise ValueError("--batch-size auto is resolved when the model is built (peer/batch_size.py)")
        return self.batch_size * self.grad_accumulation
