"""Peer configuration: flags win over ALBERT_* variables, which win over defaults; bad values exit with a message."""

from __future__ import annotations

import dataclasses

import pytest

from peer.config import PeerConfig
from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.flags import env_var, parse_configs

ALL = (SwarmConfig, OptimConfig, PeerConfig)


def test_defaults_listen_on_all_interfaces():
    swarm, optim, peer = parse_configs(*ALL, args=[], environ={})
    assert swarm.host_maddrs == ["/ip4/0.0.0.0/tcp/0"] and swarm.initial_peers == []
    assert optim.grad_compression == "scaled-fp16" and peer.model == "tiny"


def test_flag_beats_environment_beats_default():
    environ = {
        "ALBERT_RUN_ID": "from-env",
        "ALBERT_TARGET_BATCH_SIZE": "64",
        "ALBERT_CLIENT_MODE": "true",
        "ALBERT_INITIAL_PEERS": "/ip4/10.0.0.1/tcp/1/p2p/A, /ip4/10.0.0.2/tcp/2/p2p/B",
    }
    swarm, optim, _ = parse_configs(*ALL, args=["--run-id", "from-flag"], environ=environ)
    assert swarm.run_id == "from-flag"
    assert optim.target_batch_size == 64 and swarm.client_mode is True
    assert swarm.initial_peers == ["/ip4/10.0.0.1/tcp/1/p2p/A", "/ip4/10.0.0.2/tcp/2/p2p/B"]


def test_every_field_is_documented():
    for config_type in ALL:
        for field in dataclasses.fields(config_type):
            assert field.metadata.get("help"), f"{config_type.__name__}.{field.name} has no help"
            assert "[env" not in field.metadata["help"]  # the env hint is added to --help, not to the class


@pytest.mark.parametrize(
    "args, environ, problem",
    [
        (["--target_batch_size", "0"], {}, "target_batch_size must be positive"),
        ([], {"ALBERT_LEARNING_RATE": "fast"}, "ALBERT_LEARNING_RATE"),
        (["--grad_compression", "8bit"], {}, "invalid choice"),
        (["--delay_grad_averaging"], {}, "needs --delay-optimizer-step"),
        (["--initial_peers", "localhost:1234"], {}, "is not a multiaddr"),
        (["--run_id", "a.b"], {}, "run_id must be"),
    ],
)
def test_bad_values_exit_with_a_clear_message(args, environ, problem, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_configs(*ALL, args=args, environ=environ)
    assert exit_info.value.code == 2
    assert problem in capsys.readouterr().err


def test_help_names_the_environment_variables(capsys):
    with pytest.raises(SystemExit):
        parse_configs(*ALL, args=["--help"], environ={})
    assert env_var("initial_peers") in capsys.readouterr().out


def test_the_next_chunk_timeout_is_the_matchmaking_time_unless_set():
    """hivemind's rule by default; over slow links a part takes longer than matchmaking (docs/configuration.md)."""
    _, optim, _ = parse_configs(*ALL, args=["--matchmaking-time", "4"], environ={})
    assert optim.chunk_timeout == 4
    _, optim, _ = parse_configs(*ALL, args=["--matchmaking-time", "4", "--next-chunk-timeout", "20"], environ={})
    assert optim.chunk_timeout == 20
    with pytest.raises(ValueError, match="next_chunk_timeout"):
        OptimConfig(next_chunk_timeout=-1)
