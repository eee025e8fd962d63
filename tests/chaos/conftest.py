"""Fixtures of the chaos suite: a private network (skipped where the machine forbids namespaces) and a chaos run.

Everything a run creates is removed at teardown even when a test failed (and again at interpreter exit); teardown
then fails the test module if a process, namespace or link was left behind.
"""

from __future__ import annotations

import pytest

from tests.chaos.netns import Network, NetworkUnavailable, check_support, network_prefix
from tests.chaos.swarm import FIGURES, ChaosRun


@pytest.fixture(scope="session")
def network_supported():
    try:
        check_support(network_prefix())
    except NetworkUnavailable as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def make_run(network_supported, tmp_path_factory):
    """Start chaos runs on demand (each on its own network); stop them all and check for leftovers at teardown."""
    runs: list[ChaosRun] = []

    def factory(**settings) -> ChaosRun:
        network = Network(f"{network_prefix()}{len(runs)}")
        runs.append(ChaosRun(network, tmp_path_factory.mktemp("chaos"), **settings))
        return runs[-1]

    yield factory
    leftovers = [item for run in runs for item in run.close()]
    assert not leftovers, f"left behind after the chaos run: {leftovers}"


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    terminalreporter.section("chaos: optimizer steps per scenario")
    terminalreporter.write_line(f"{'scenario':<48} {'seconds':>7} {'steps':>5} {'ratio':>6} {'max gap':>8}  epochs")
    for f in FIGURES:
        terminalreporter.write_line(
            f"{f.scenario:<48} {f.seconds:>7.0f} {f.steps:>5} {f.ratio:>6.2f} {f.longest_gap:>7.1f}s  {f.epochs}"
        )
