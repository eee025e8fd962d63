"""MonitorConfig: flags over ALBERT_* variables over defaults, shared swarm/optimizer groups, clear refusals."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitor.aggregate import PeerProgress, aggregate
from monitor.config import parse_monitor_args


def test_flags_override_environment_which_overrides_defaults(tmp_path):
    environ = {
        "ALBERT_RUN_ID": "env-run",
        "ALBERT_CHECKPOINT_EVERY": "7",
        "ALBERT_KEEP": "9",
        "ALBERT_TARGET_BATCH_SIZE": "64",
        "ALBERT_INITIAL_PEERS": "/ip4/1.2.3.4/tcp/1/p2p/QmA",
    }
    swarm, optim, config = parse_monitor_args(["--keep", "2", "--run_dir", str(tmp_path)], environ=environ)
    assert swarm.run_id == "env-run" and swarm.initial_peers == ["/ip4/1.2.3.4/tcp/1/p2p/QmA"]
    assert optim.target_batch_size == 64 and config.checkpoint_every == 7 and config.keep == 2
    assert config.db_path() == tmp_path / "history.sqlite" and config.identity_path(swarm) == tmp_path / "identity.key"


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--admin_token", "short"], "admin_token must be at least 16"),
        (["--keep", "0"], "keep must be at least 1"),
        (["--refresh_period", "0"], "refresh_period must be positive"),
        (["--resume_from", "/nonexistent"], "is not a checkpoint directory"),
    ],
)
def test_bad_settings_exit_with_a_message_naming_the_problem(flags, problem, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_monitor_args(flags, environ={})
    assert exited.value.code == 2 and problem in capsys.readouterr().err


reports = st.builds(
    PeerProgress,
    peer_id=st.sampled_from("abc"),
    epoch=st.integers(0, 5),
    samples_per_second=st.floats(0, 100),
    samples_accumulated=st.integers(0, 50),
    loss_sum=st.floats(0, 100),
    mini_steps=st.integers(0, 5),
    time=st.floats(0, 100),
)


@given(st.lists(st.lists(reports, max_size=4), max_size=6))
def test_sample_total_never_decreases_and_equals_the_sum_of_contributions(refreshes):
    snapshot = aggregate([], now=0.0)
    for i, batch in enumerate(refreshes):
        previous = snapshot
        snapshot = aggregate(batch, now=float(i * 10), previous=previous, forget_after=1e9)
        assert snapshot.samples_total >= previous.samples_total
        assert snapshot.samples_total == sum(row.contribution for row in snapshot.peers)
