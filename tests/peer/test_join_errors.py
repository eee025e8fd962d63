"""A p2p daemon that cannot start and initial peers that do not answer each end in one line naming cause and fix.

Every failure is provoked for real: a port another socket holds, an address of no interface here, a missing or
non-executable p2pd (a copy of hivemind with its binary removed, first on PYTHONPATH), initial peers where nobody
listens, where another node listens (a wrong or mistyped peer id), a host name that does not resolve, and a port
whose packets are dropped (iptables in a network namespace of the test's own).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import hivemind
import pytest

from peer.swarm.config import SwarmConfig
from peer.swarm.dht import SwarmJoinError, build_dht
from tests.harness import REPO, child_env, free_port, run_cli

LOOPBACK_ANY = ["/ip4/127.0.0.1/tcp/0"]
OTHER_ID = "QmXVt4KDoc5X5W4wqLYK7gRFv1gYVLzNd1fj1Yf7PB9oJ2"  # a well-formed peer id no node here has


def join_error(**swarm_settings) -> str:
    """The SwarmJoinError line of a DHT started with these SwarmConfig settings (fails the test if it starts)."""
    swarm = SwarmConfig(**{"host_maddrs": LOOPBACK_ANY, **swarm_settings})
    with pytest.raises(SwarmJoinError) as failure:
        build_dht(swarm).shutdown()
    line = str(failure.value)
    assert "\n" not in line and "; fix: " in line, line
    return line


@pytest.fixture(scope="module")
def listening_node():
    """A real DHT node on loopback: its address with a wrong peer id is what a mistyped --initial-peers gives."""
    dht = hivemind.DHT(host_maddrs=LOOPBACK_ANY, start=True)
    yield str(dht.get_visible_maddrs()[0])
    dht.shutdown()


def test_a_port_in_use_is_named_with_the_fix():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        line = join_error(host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"])
    assert line.startswith("could not start the p2p daemon: ") and f"port {port} of --host-maddrs is in use" in line
    assert "choose another port in --host-maddrs" in line


def test_an_address_of_no_interface_here():
    line = join_error(host_maddrs=["/ip4/192.0.2.7/tcp/0"])  # TEST-NET-1: bound locally, never routed
    assert "192.0.2.7 in --host-maddrs is not an address of this machine" in line and "--announce-maddrs" in line


@pytest.mark.parametrize(
    "settings, cause",
    [
        ({"host_maddrs": ["/ip4/127.0.0.1/tpc/0"]}, "--host-maddrs '/ip4/127.0.0.1/tpc/0' is not a valid multiaddr"),
        ({"announce_maddrs": ["/ip4/1.2.3.4/tcp/x"]}, "--announce-maddrs '/ip4/1.2.3.4/tcp/x' is not a valid"),
        ({"announce_maddrs": ["/ip4/1.2.3.4/tcp/0"]}, "has port 0"),
        ({"initial_peers": [f"/ip4/127.0.0.300/tcp/1/p2p/{OTHER_ID}"]}, "--initial-peers '/ip4/127.0.0.300"),
        ({"initial_peers": [f"/ip4/127.0.0.1/tcp/1/p2p/{OTHER_ID[:-1]}0"]}, "Invalid character '0'"),
        ({"initial_peers": ["/ip4/127.0.0.1/tcp/1"]}, "lacks the peer id (/p2p/...)"),
    ],
)
def test_a_bad_multiaddr_is_refused_before_hivemind_hangs_on_it(settings, cause):
    # an unparsable --announce-maddrs made hivemind's DHT() wait forever (its parse error does not unpickle)
    assert cause in join_error(**settings)


def test_nobody_listening_at_the_initial_peer():
    port = free_port()
    line = join_error(initial_peers=[f"/ip4/127.0.0.1/tcp/{port}/p2p/{OTHER_ID}"])
    assert line.startswith("could not join the swarm: no initial peer answered")
    assert f"nobody listens on 127.0.0.1 port {port} (connection refused)" in line
    assert "copy the --initial-peers line the monitor prints" in line


@pytest.mark.parametrize("mistake", ["another node's id", "a typo in the id"])
def test_a_wrong_peer_id_at_a_live_address(listening_node, mistake):
    address, peer_id = listening_node.rsplit("/p2p/", 1)
    wrong = OTHER_ID if mistake == "another node's id" else peer_id[:-3] + ("xyz" if peer_id[-3:] != "xyz" else "abc")
    line = join_error(initial_peers=[f"{address}/p2p/{wrong}"])
    assert f"a program listens on 127.0.0.1 port {address.rsplit('/', 1)[1]} but it is not the peer {wrong}" in line


def test_a_host_name_that_does_not_resolve():
    line = join_error(initial_peers=[f"/dns4/albert-monitor.invalid/tcp/31337/p2p/{OTHER_ID}"])
    assert "the host name 'albert-monitor.invalid' does not resolve" in line and "a typo?" in line


def attempt(*flags: str, env: dict | None = None, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [*(prefix or []), sys.executable, "-m", "tests.peer.join_attempt", *flags]
    return run_cli(command, timeout=120, env=env)


def root_with_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("iptables") is not None


@pytest.mark.skipif(not root_with_netns(), reason="needs root, ip and iptables for a network namespace")
def test_a_dropped_initial_peer_is_told_from_a_closed_one():
    namespace = f"h4join{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        inside = ["ip", "netns", "exec", namespace]
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run([*inside, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "4444", "-j", "DROP"], check=True)
        result = attempt("--host_maddrs", *LOOPBACK_ANY, "--initial_peers", f"/ip4/127.0.0.1/tcp/4444/p2p/{OTHER_ID}",
                         prefix=inside)  # fmt: skip
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "no answer from 127.0.0.1 port 4444 in 3 s: a firewall drops it" in result.stdout


def broken_hivemind(root: Path, p2pd: str) -> Path:
    """A copy of the installed hivemind (symlinks) whose p2pd is missing or not executable; returns its parent."""
    installed = Path(hivemind.__file__).parent
    copy = root / "site" / "hivemind"
    copy.mkdir(parents=True)
    for entry in installed.iterdir():
        if entry.name not in ("hivemind_cli", "__pycache__"):
            (copy / entry.name).symlink_to(entry)
    (copy / "hivemind_cli").mkdir()
    for entry in (installed / "hivemind_cli").iterdir():
        if entry.name != "p2pd":
            (copy / "hivemind_cli" / entry.name).symlink_to(entry)
    if p2pd == "not executable":
        shutil.copyfile(installed / "hivemind_cli" / "p2pd", copy / "hivemind_cli" / "p2pd")  # mode 0644
    return copy.parent


@pytest.mark.parametrize("p2pd, cause", [("missing", "p2pd daemon is missing"), ("not executable", "not executable")])
def test_a_broken_p2pd_is_named_with_the_fix(tmp_path, p2pd, cause):
    site = broken_hivemind(tmp_path, p2pd)
    result = attempt("--host_maddrs", *LOOPBACK_ANY, env=child_env({"PYTHONPATH": f"{site}:{REPO}"}))
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.startswith("could not start the p2p daemon: hivemind's p2pd daemon")
    assert cause in result.stdout and str(site) in result.stdout and "reinstall hivemind" in result.stdout


def one_error_line(output: str, marker: str) -> str:
    """The one line of the run's output that carries ``marker``; no traceback anywhere."""
    lines = [line for line in output.splitlines() if marker in line]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    return lines[0]


@pytest.mark.slow
def test_albert_peer_exits_3_with_one_line_for_an_unreachable_initial_peer(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "peer", "--host_maddrs", *LOOPBACK_ANY, "--torch_threads", "1",
               "--initial_peers", f"/ip4/127.0.0.1/tcp/{port}/p2p/{OTHER_ID}", "--backup_dir", str(tmp_path)]  # fmt: skip
    result = run_cli(command, timeout=300)
    assert result.returncode == 3
    line = one_error_line(result.stdout + result.stderr, "could not join the swarm")
    assert "CRITICAL" in line and f"nobody listens on 127.0.0.1 port {port}" in line and "; fix: " in line


@pytest.mark.slow
def test_albert_monitor_exits_3_with_one_line_when_its_port_is_taken(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        command = [sys.executable, "-m", "monitor", "--run_dir", str(tmp_path), "--http_host", "127.0.0.1",
                   "--http_port", str(free_port()), "--host_maddrs", f"/ip4/127.0.0.1/tcp/{port}"]  # fmt: skip
        result = run_cli(command, timeout=300)
    assert result.returncode == 3
    line = one_error_line(result.stdout + result.stderr, "albert-monitor cannot run")
    assert f"could not start the p2p daemon: port {port} of --host-maddrs is in use" in line and "; fix: " in line
