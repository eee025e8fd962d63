"""Configuration of the monitor node, read like the peer's: flags, then ALBERT_* environment variables, then defaults.

The network settings (`SwarmConfig`) and the optimizer settings (`OptimConfig`, needed to hold a training state of
the same layout as the peers') are the peer's own dataclasses; `MonitorConfig` holds the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.field_docs import help_from_docstring
from peer.swarm.flags import parse_configs


@help_from_docstring
@dataclass
class MonitorConfig:
    """What the monitor serves and keeps.

    Args:
        model: The run's model preset (tiny, base, ...) or config.json path; peers with another model are refused.
        tokenizer: The run's tokenizer directory (default: the bundled tokenizer); peers joining with --join fetch
            its files from the monitor.
        corpus: The corpus peers joining with --join train on unless they name their own copy (a hub dataset name,
            or a path that exists on the peers' machines; default: the bundled corpus).
        run_dir: Directory of the monitor's files (identity, run key, history, checkpoints, peers file) unless set
            one by one.
        http_host: Address of the dashboard, API and metrics server.
        http_port: Port of the dashboard, API and metrics server (0: any free port).
        refresh_period: Seconds between two reads of the peers' progress records.
        stale_after: A peer whose newest record is older than this many seconds is not counted as alive.
        db: SQLite file of the history (default: RUN_DIR/history.sqlite).
        checkpoint_dir: Where checkpoints are written (default: RUN_DIR/checkpoints).
        checkpoint_every: Write a checkpoint every this many global epochs (0: only on request).
        keep: Number of newest checkpoints to keep.
        keep_every: Also keep every checkpoint whose epoch is a multiple of this (0: none).
        fetch_state_every: Download the swarm's averaged state every this many epochs, so that the monitor can share
            a fresh one.
        admin_token: Enables POST /api/checkpoints for requests carrying 'Authorization: Bearer TOKEN'.
        resume_from: Checkpoint directory to start a fresh swarm from (peers then join at its epoch).
        peers_file: File to write this monitor's multiaddrs to (default: RUN_DIR/initial_peers.txt).
        run_secret_file: Closes the run: peers proving one of this file's secrets (one a line) get access tokens.
        allowlist_file: Closes the run: peers signing with a join key listed here (one public key a line) get tokens.
        token_ttl: Closed runs: seconds an access token is valid (peers renew it when half is left).
        revoke_above: Closed runs: revoke a member whose suspicion (the median of the robust reducers' scores,
            honest about 1) stays above this for --revoke-after refreshes: it gets no new token (0: never revoke).
        revoke_after: Refreshes in a row a member's suspicion must stay above --revoke-above to be revoked.
        revoke_quorum: Members (distinct join credentials, the accused's own left out) that must have scored a
            member before it can be revoked; more than half of them must score it above --revoke-above.
    """

    model: str = "tiny"
    tokenizer: str | None = None
    corpus: str | None = None
    run_dir: str = "albert-swarm-run/monitor"
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    refresh_period: float = 5.0
    stale_after: float = 30.0
    db: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    keep: int = 3
    keep_every: int = 0
    fetch_state_every: int = 10
    admin_token: str | None = None
    resume_from: str | None = None
    peers_file: str | None = None
    run_secret_file: str | None = None
    allowlist_file: str | None = None
    token_ttl: float = 1800.0
    revoke_above: float = 0.0
    revoke_after: int = 3
    revoke_quorum: int = 3

    def __post_init__(self):
        for name in ("refresh_period", "stale_after"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("checkpoint_every", "keep_every", "fetch_state_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be zero or positive, got {getattr(self, name)!r}")
        if self.keep < 1:
            raise ValueError(f"keep must be at least 1, got {self.keep}")
        if not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in 0..65535, got {self.http_port}")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError("admin_token must be at least 16 characters long (it guards checkpoint creation)")
        if not self.token_ttl >= 10:
            raise ValueError(f"token_ttl must be at least 10 seconds, got {self.token_ttl!r}")
        if not self.revoke_above >= 0 or self.revoke_after < 1:
            raise ValueError(
                f"revoke_above must be >= 0 and revoke_after >= 1, got {self.revoke_above!r} and {self.revoke_after!r}"
            )
        if self.revoke_quorum < 2:
            raise ValueError(
                f"revoke_quorum must be at least 2 (one member's word revokes nobody), got {self.revoke_quorum!r}"
            )
        if self.revoke_above and not self.closed_run:
            raise ValueError(
                "--revoke-above needs a closed run (--run-secret-file or --allowlist-file): tokens revoke"
            )
        for name in ("run_secret_file", "allowlist_file"):
            if getattr(self, name) is not None and not Path(getattr(self, name)).is_file():
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is not a file")
        if self.resume_from is not None and not (Path(self.resume_from) / "config.json").is_file():
            raise ValueError(f"--resume-from {self.resume_from!r} is not a checkpoint directory (no config.json)")

    @property
    def closed_run(self) -> bool:
        """True if only peers with an access token may take part (a secret or an allowlist is given)."""
        return bool(self.run_secret_file or self.allowlist_file)

    def authority_key_path(self) -> Path:
        """The run authority's private key: kept in the run dir so tokens stay valid across monitor restarts."""
        return Path(self.run_dir) / "authority.key"

    def run_key_path(self) -> Path:
        """The run key that signs the run record and every checkpoint manifest (peer/swarm/run_key.py): keep it safe."""
        return Path(self.run_dir) / "run_key.pem"

    def db_path(self) -> Path:
        return Path(self.db) if self.db else Path(self.run_dir) / "history.sqlite"

    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.run_dir) / "checkpoints"

    def peers_file_path(self) -> Path:
        return Path(self.peers_file) if self.peers_file else Path(self.run_dir) / "initial_peers.txt"

    def join_file_path(self) -> Path:
        """Holds the join string (the one token a volunteer needs), rewritten at every start."""
        return Path(self.run_dir) / "join.txt"

    def url_file_path(self) -> Path:
        """Holds the dashboard's URL once the HTTP server listens (the port may have been chosen by the OS)."""
        return Path(self.run_dir) / "dashboard_url.txt"

    def identity_path(self, swarm: SwarmConfig) -> Path:
        """The monitor always has a stable identity: its multiaddr is what every peer is told to dial."""
        return Path(swarm.identity_path) if swarm.identity_path else Path(self.run_dir) / "identity.key"


def parse_monitor_args(
    args: Sequence[str] | None = None, environ: dict | None = None
) -> tuple[SwarmConfig, OptimConfig, MonitorConfig]:
    """Parse the monitor's three config groups from flags and ALBERT_* variables (exit 2 with a message if bad)."""
    return tuple(parse_configs(SwarmConfig, OptimConfig, MonitorConfig, args=args, environ=environ))
