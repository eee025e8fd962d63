"""Who contributed what, in a real swarm: three named peers (two share a name), one killed with SIGKILL and
restarted, a stranger signing hostile names; the monitor's contributors table (API and SQLite) must equal what each
peer logged it contributed, to the sample, through a monitor restart, and the dashboard must show it as text."""

from __future__ import annotations

import re
import sqlite3
import sys
import time

import pytest

from peer.swarm.names import MAX_NAME_CHARS
from tests.harness import run_cli, wait_until
from tests.monitor.conftest import CHROMIUM, MonitorProcess, PeerProcess, chromium
from tests.peer.hostile_peer import HOSTILE_NAMES, LingeringHostilePeer

RUN_ID = "contributors-test"
# no state downloads or checkpoints: this run is about counting, and the machine has two cores
MONITOR_FLAGS = ["--checkpoint_every", "0", "--fetch_state_every", "0", "--stale_after", "20"]
NAMES = {"ada": "Ada", "bob": "Bob", "ada2": "Ada"}  # two peers share a name: only the id tells them apart
CLAIM = re.compile(r"Contributed (\d+) samples in total \(([\d.]+) s of compute\) as (key-[0-9a-f]{12})")
MARKUP_NAME = dict(HOSTILE_NAMES)["markup"]


def claims(peer: PeerProcess) -> list[tuple[str, int]]:
    """(label, samples) of every total the peer logged, oldest first (both lives of a restarted peer: one log)."""
    return [(label, int(samples)) for samples, _, label in CLAIM.findall(peer.log_text())]


def start_peer(workdir, name: str, initial_peers: list[str]) -> PeerProcess:
    identity = workdir / name / "identity.key"
    identity.parent.mkdir(parents=True, exist_ok=True)
    flags = ["--name", NAMES[name], "--identity_path", str(identity)]
    return PeerProcess(workdir, name, RUN_ID, initial_peers, extra_flags=flags)


def contributors_by_id(monitor: MonitorProcess) -> dict[str, dict]:
    return {row["peer_id"]: row for row in monitor.get("/api/contributors") or []}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_contributors_match_the_peers_own_counts_through_kill_restart_and_a_monitor_restart(processes, tmp_path):
    workdir = tmp_path
    monitor = MonitorProcess(workdir / "monitor", RUN_ID, MONITOR_FLAGS)
    processes.append(monitor)
    initial_peers = monitor.wait_ready()
    peers = {name: start_peer(workdir, name, initial_peers) for name in NAMES}
    processes.extend(peers.values())
    hostile = LingeringHostilePeer(
        initial_peers, RUN_ID, monitor.get("/api/status")["model"]["hash"], workdir, mode="--names"
    )
    try:
        stored = hostile.stored()
        assert stored["markup"], "the hostile peer's own node refused a name the schema allows"
        wait_until(lambda: all(len(claims(p)) >= 3 and claims(p)[-1][1] > 0 for p in peers.values()), 420, "training")

        # kill -9: what bob did since its last logged total is lost with it, and was never claimed
        before_kill = claims(peers["bob"])[-1]
        peers["bob"].kill()
        time.sleep(3)
        peers["bob"] = start_peer(workdir, "bob", initial_peers)  # same identity, same log (appended)
        processes.append(peers["bob"])
        wait_until(lambda: claims(peers["bob"])[-1][1] > before_kill[1], 300, "bob to contribute after its restart")
        assert {label for label, _ in claims(peers["bob"])} == {before_kill[0]}, "the restarted peer changed keys"

        for peer in peers.values():  # a clean leave publishes the unfinished epoch's totals
            assert peer.stop(timeout=60) == 143, peer.log_text()[-3000:]  # 128 + SIGTERM: a clean leave
            # the next one leaves once the monitor has read these last words: a leaving peer's last record is stored
            # on another node, and lost if every node holding it leaves too before the monitor reads it (seen in CI,
            # twice in one run, with the three gone within a second)
            label, total = claims(peer)[-1]
            wait_until_or_fail(
                lambda label=label, total=total: contributors_by_id(monitor).get(label, {}).get("samples") == total,
                30,
                lambda label=label, total=total: (label, total, contributors_by_id(monitor), leaves(peers)),
            )
        expected = {claims(peer)[-1][0]: claims(peer)[-1][1] for peer in peers.values()}
        names = {claims(peer)[-1][0]: NAMES[name] for name, peer in peers.items()}
        assert len(expected) == 3, "two peers signed with the same key"

        def counted_exactly():
            rows = contributors_by_id(monitor)
            return all(rows.get(label, {}).get("samples") == samples for label, samples in expected.items()) and rows

        rows = wait_until_or_fail(counted_exactly, 60, lambda: (expected, contributors_by_id(monitor), leaves(peers)))
        for label, name in names.items():
            assert rows[label]["name"] == name and rows[label]["device"] == "cpu"
            assert rows[label]["compute_seconds"] > 0 and rows[label]["uptime_seconds"] > 0
            assert rows[label]["first_seen"] < rows[label]["last_seen"]
        hostile_rows = [row for row in rows.values() if row["peer_id"] not in expected]
        # the markup name is kept as the data it is; the invisible and over-long ones never got in
        assert [row["name"] for row in hostile_rows] == [MARKUP_NAME]
        assert monitor.get("/api/status")["invalid_records_by_reason"].get("schema", 0) >= 2

        with sqlite3.connect(workdir / "monitor" / "history.sqlite") as db:
            saved = dict(db.execute("SELECT peer_id, samples FROM contributors").fetchall())
        assert {label: saved[label] for label in expected} == expected

        # a restarted monitor (its peers all gone) still knows every name and total
        monitor.stop()
        monitor = MonitorProcess(
            workdir / "monitor", RUN_ID, MONITOR_FLAGS, monitor.dht_port, monitor.http_port, name="monitor-2"
        )
        processes.append(monitor)
        monitor.wait_ready()
        after = contributors_by_id(monitor)
        assert {label: after[label]["samples"] for label in expected} == expected
        assert {label: after[label]["name"] for label in expected} == names
        # the peers' last records stay in the DHT: one younger than --stale_after (20 s) shows its peer alive until then
        wait_until(
            lambda: all(row["status"] == "gone" for row in contributors_by_id(monitor).values()),
            60,
            "every contributor row to be 'gone'",
        )
        history = monitor.get(f"/api/contributors/{before_kill[0]}")
        assert len(history["points"]) >= 3 and history["points"][-1]["samples"] == expected[before_kill[0]]

        if CHROMIUM is not None:
            shows_names_as_text(monitor, expected, names, before_kill[0], tmp_path)
    finally:
        hostile.stop()


def leaves(peers: dict[str, PeerProcess]) -> dict[str, list[str]]:
    """Each peer's log lines about storing its records and leaving: what a failure needs to tell a lost record."""
    wanted = ("progress record", "Contributed", "SIGTERM", "Left the swarm")
    return {
        name: [line for line in peer.log_text().splitlines() if any(w in line for w in wanted)][-4:]
        for name, peer in peers.items()
    }


def wait_until_or_fail(condition, timeout: float, describe):
    """wait_until, with what was expected and found in the failure message."""
    found = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"the contributors table never matched the peers' logs: {describe()}")


def shows_names_as_text(monitor: MonitorProcess, expected: dict, names: dict, bob: str, tmp_path) -> None:
    """The dashboard's table in Chromium: every row, names as text (the markup one escaped, no <img> made of it)."""
    dom = chromium(monitor.url + "/", tmp_path, "--dump-dom")
    table = dom.split('id="contributors-table"')[1].split("</table>")[0]
    shown = re.findall(r'data-peer-id="(key-[0-9a-f]{12})"', table)
    assert set(expected) <= set(shown) and len(shown) == 4
    order = [label for label in shown if label in expected]
    assert order == sorted(expected, key=lambda label: (-expected[label], label)), "not sorted by samples"
    assert table.count(">Ada</a>") == 2 and table.count(">Bob</a>") == 1
    assert "&lt;img src=x onerror=alert(1)&gt;" in table and "<img" not in table
    for label, samples in expected.items():  # each total in its own peer's row
        assert re.search(rf'data-peer-id="{label}">.*?<td class="num samples">{samples}</td>', table), label
    page = chromium(f"{monitor.url}/contributor?id={bob}", tmp_path, "--dump-dom")
    assert '<span id="contributor-name">Bob</span>' in page
    drawn = re.search(r'id="chart-samples"><svg[^>]*data-points="(\d+)"', page)
    assert drawn and int(drawn.group(1)) >= 3


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "name, why",
    [("<b>me</b>", "markup character"), ("Ada\u202egnp.exe", "U+202E"), ("x" * (MAX_NAME_CHARS + 1), "33 characters")],
)
def test_a_peer_refuses_a_name_it_could_not_show_safely_at_start(name, why):
    result = run_cli([sys.executable, "-m", "peer", "--name", name, "--run_id", RUN_ID], timeout=90)
    assert result.returncode == 2
    assert "--name" in result.stderr and why in result.stderr, result.stderr[-2000:]
