"""Network namespaces for the chaos suite: one bridge, one namespace per node, and the faults a link can carry.

Each node gets a veth pair into a private bridge on a 10.x.y.0/24 subnet chosen by the test (the host side holds
.1, so the test process reaches every node). Faults: rate limits (tc tbf), random loss and partitions (iptables in
the node's namespace only), and latency through the delaying relay of ``tests.chaos.relay`` (this kernel has no netem).
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

RELAY_MARK = "0x5a"  # the relay marks its own outgoing connections so the redirect rules let them through
PARTITION_RULES = (["INPUT", "-i", "eth0"], ["OUTPUT", "-o", "eth0"])


class NetworkUnavailable(RuntimeError):
    """This machine does not let the test create namespaces, veth pairs or traffic rules (says which and why)."""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, check=False, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def network_prefix() -> str:
    return f"as{os.getpid() % 10_000_000}"  # unique per test process; short, as link names have 15 characters


def check_support(prefix: str) -> None:
    """Raise NetworkUnavailable unless root can add a namespace, a veth pair, a tbf qdisc and iptables rules here."""
    if os.geteuid() != 0:
        raise NetworkUnavailable("the chaos suite needs root (network namespaces, tc, iptables)")
    for tool in ("ip", "tc", "iptables"):
        if shutil.which(tool) is None:
            raise NetworkUnavailable(f"'{tool}' is not installed (Debian: iproute2, iptables)")
    probe = f"{prefix}p"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
        sh("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "probe0", "root", "tbf", "rate", "1mbit",
           "burst", "32kbit", "latency", "400ms")  # fmt: skip
        sh("ip", "netns", "exec", probe, "iptables", "-A", "INPUT", "-m", "statistic", "--mode", "random",
           "--probability", "0.5", "-j", "DROP")  # fmt: skip
        sh("ip", "netns", "exec", probe, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "REDIRECT",
           "--to-ports", "1")  # fmt: skip
    except RuntimeError as error:
        raise NetworkUnavailable(f"this machine does not allow the chaos network: {error}") from error
    finally:
        sh("ip", "netns", "del", probe, check=False)


def free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 derived from our pid that no route on this machine overlaps."""
    routes = sh("ip", "-4", "route", "show", "table", "all").stdout
    taken = []
    for line in routes.splitlines():
        word = line.split()[0] if line.split() else ""
        try:
            taken.append(ipaddress.ip_network(word if "/" in word else f"{word}/32", strict=False))
        except ValueError:
            continue
    for offset in range(200):
        index = os.getpid() + offset
        subnet = ipaddress.ip_network(f"10.{200 + index % 50}.{(index // 50) % 256}.0/24")
        if not any(subnet.overlaps(net) for net in taken):
            return subnet
    raise NetworkUnavailable("no free 10.x.y.0/24 subnet on this machine")


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Node:
    """One namespace holding one process of the swarm, with an address on the bridge and its own firewall.

    Args:
        network: the bridge this node hangs on.
        name: short name (unique in the network).
        address: the node's address on the bridge.
    """

    def __init__(self, network: Network, name: str, address: str):
        self.network, self.name, self.address = network, name, address
        index = len(network.nodes)
        self.namespace = f"{network.prefix}-{name}"
        self.host_link = f"{network.prefix}h{index}"  # veth end on the bridge (15 characters at most)
        self.partitioned = False
        sh("ip", "netns", "add", self.namespace)
        sh("ip", "link", "add", self.host_link, "type", "veth", "peer", "name", f"{network.prefix}n{index}")
        sh("ip", "link", "set", f"{network.prefix}n{index}", "netns", self.namespace)
        self.ns("ip", "link", "set", f"{network.prefix}n{index}", "name", "eth0")
        self.ns("ip", "addr", "add", f"{address}/{network.subnet.prefixlen}", "dev", "eth0")
        self.ns("ip", "link", "set", "eth0", "up")
        self.ns("ip", "link", "set", "lo", "up")
        sh("ip", "link", "set", self.host_link, "master", network.bridge)
        sh("ip", "link", "set", self.host_link, "up")

    def exec_prefix(self) -> list[str]:
        """Prefix of a command that runs inside this node's namespace (``ip netns exec`` keeps the pid)."""
        return ["ip", "netns", "exec", self.namespace]

    def ns(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh(*self.exec_prefix(), *args, check=check)

    def pids(self) -> list[int]:
        """Processes still running in this namespace (zombies, already dead but not yet reaped, left out)."""
        listed = [int(pid) for pid in sh("ip", "netns", "pids", self.namespace, check=False).stdout.split()]
        return [pid for pid in listed if _running(pid)]

    def limit_rate(self, mbit: float | None, download_only: bool = False) -> None:
        """A tbf rate limit on this node's upload (its eth0) and download (the bridge port); None removes it."""
        links = [(self.network.host_ns, self.host_link)] + ([] if download_only else [(self.exec_prefix(), "eth0")])
        for prefix, link in links:
            sh(*prefix, "tc", "qdisc", "del", "dev", link, "root", check=False)
            if mbit is not None:
                # burst >= rate/HZ and a queue of 400 ms, as a real access link would buffer
                sh(*prefix, "tc", "qdisc", "add", "dev", link, "root", "tbf", "rate", f"{mbit}mbit", "burst",
                   "32kbit", "latency", "400ms")  # fmt: skip

    def drop_randomly(self, probability: float) -> None:
        """Drop each packet entering and each leaving this node with ``probability`` (leaving: each wire packet;
        entering: as the sender batched them, one segment each where the sender drops too)."""
        # Without this the veth hands iptables GSO batches (a 2 MB upload left in 307 packets of 13.8 kB on average,
        # measured): one "lost packet" was a lost burst, and a 1% rule dropped nothing in ~5% of such uploads.
        # One segment a packet (3003 packets for the same upload) makes the loss per wire packet, as on a real link.
        self.ns("ip", "link", "set", "eth0", "gso_max_segs", "1")
        for chain, direction in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self.ns("iptables", "-A", chain, direction, "eth0", "-m", "statistic", "--mode", "random",
                    "--probability", str(probability), "-j", "DROP")  # fmt: skip

    def partition(self) -> None:
        """Cut this node off the bridge: every packet in or out is dropped (connections hang, as on a dead link)."""
        for rule in PARTITION_RULES:
            self.ns("iptables", "-I", *rule, "-j", "DROP")
        self.partitioned = True

    def heal(self) -> None:
        for rule in PARTITION_RULES:
            self.ns("iptables", "-D", *rule, "-j", "DROP")
        self.partitioned = False

    def redirect_tcp_to(self, port: int) -> None:
        """Send this node's TCP traffic (both directions) through a local transparent relay listening on ``port``."""
        subnet = str(self.network.subnet)
        self.ns("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", subnet, "-m", "mark", "!", "--mark",
                RELAY_MARK, "-j", "REDIRECT", "--to-ports", str(port))  # fmt: skip
        self.ns("iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-i", "eth0", "-j", "REDIRECT",
                "--to-ports", str(port))  # fmt: skip


class Network:
    """A bridge on the host with one namespace per node; ``close`` removes all of it (also run at exit).

    Args:
        prefix: unique prefix of every name this network creates (keep it short: link names have 15 characters).
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.subnet = free_subnet()
        hosts = self.subnet.hosts()
        self.host_address = str(next(hosts))
        self._addresses = hosts
        self.bridge = f"{prefix}br"
        self.host_ns: list[str] = []  # commands on the bridge side run in the test's own namespace
        self.nodes: dict[str, Node] = {}
        atexit.register(self.close)
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.host_address}/{self.subnet.prefixlen}", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    def add_node(self, name: str) -> Node:
        self.nodes[name] = Node(self, name, str(next(self._addresses)))
        return self.nodes[name]

    def leftovers(self) -> list[str]:
        """Namespaces and links of this network that still exist."""
        names = [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.strip()]
        links = sh("ip", "-o", "link", "show").stdout
        found = [name for name in names if name.startswith(f"{self.prefix}-")]
        return found + [word.split("@")[0].rstrip(":") for word in links.split() if word.startswith(self.prefix)]

    def close(self) -> None:
        """Delete every namespace (their veth ends, rules and qdiscs go with them) and the bridge. Idempotent."""
        for node in self.nodes.values():
            sh("ip", "netns", "del", node.namespace, check=False)
            sh("ip", "link", "del", node.host_link, check=False)
        sh("ip", "link", "del", self.bridge, check=False)
