"""Hooks for the whole suite: one rerun for the tests that start real swarms, and their first failures printed.

Tests marked ``slow`` start real hivemind swarms (separate processes, real p2pd daemons) on a shared machine of 2
cores: whether a round finds its group, a download's next part comes within its timeout or a peer trails the others by
an epoch depends on how loaded the machine happens to be. Such a test gets one rerun (pytest-rerunfailures); quick
tests never rerun. A rerun does not hide: the summary names it and prints why its first attempt failed, so a test that
starts failing for a real reason (it then fails twice) or more often shows there.
"""

from __future__ import annotations

import pytest

SWARM_TEST_RERUNS = 1
RERUN_DELAY = 5  # seconds: the failed attempt's processes and ports are released first
SHOWN_CHARACTERS = 3000  # of each first failure's report


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("flaky"):
            item.add_marker(pytest.mark.flaky(reruns=SWARM_TEST_RERUNS, reruns_delay=RERUN_DELAY))


def pytest_terminal_summary(terminalreporter):
    reruns = terminalreporter.stats.get("rerun", [])
    if not reruns:
        return
    terminalreporter.section("first attempts that failed, then were rerun")
    for report in reruns:
        terminalreporter.write_line(f"{report.nodeid} ({report.when}):")
        terminalreporter.write_line(report.longreprtext[-SHOWN_CHARACTERS:])
