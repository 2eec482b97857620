"""Emulated nodes on one machine: one Linux network namespace per node, joined through a bridge.

    node namespace c2r-<pid>-n<i>          switch namespace c2r-<pid>-sw
      eth0 10.77.<i>... ── veth pair ──  n<i> ── bridge br0 (all nodes)
      lo (ranks of this node talk here)

Ranks of one node share their namespace: they reach each other through its loopback (the address
of eth0 is local, so the kernel routes it over `lo`), while every byte to another node crosses the
node's veth pair and the bridge. `tc tbf` on both ends of a node's veth shapes its link to R
Gbit/s in each direction (a full-duplex NIC per node); optional shaping of `lo` emulates a slower
intra-node link. Everything lives inside namespaces created here: the host's own network is never
touched, and `teardown()` deletes all of it (deleting the namespaces removes their interfaces).

A namespace name carries the creating process id; `remove_stale()` deletes those of processes
that no longer exist (a SIGKILLed run cannot clean up after itself).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional, Sequence

PREFIX = "c2r-"
SUBNET = "10.77"  # node i gets 10.77.0.(i+1)/16 on its eth0
NODE_IFNAME = "eth0"
MAX_NODES = 250


class EmulationUnavailable(RuntimeError):
    """This machine cannot create network namespaces (no root, no iproute2, no netns support)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _run(cmd: Sequence[str]) -> None:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"emulation set-up failed: `{' '.join(cmd)}` exited {done.returncode}: "
                           f"{done.stderr.strip()}")


def check_available() -> None:
    """Raise EmulationUnavailable with the reason when namespaces cannot be made here."""
    if os.geteuid() != 0:
        raise EmulationUnavailable("creating network namespaces needs root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise EmulationUnavailable(f"`{tool}` not found: install iproute2 (apt-get install -y iproute2)")
    probe = f"{PREFIX}{os.getpid()}-probe"
    done = _ip("netns", "add", probe, check=False)
    if done.returncode:
        raise EmulationUnavailable(f"`ip netns add` failed: {done.stderr.strip()}")
    _ip("netns", "del", probe, check=False)


def tbf_args(rate_gbit: float) -> list[str]:
    """tc tbf parameters for rate_gbit: a bucket of 1 ms of traffic (at least 128 KiB, so
    segmentation-offloaded packets pass whole) and at most 20 ms of queue (a NIC's, not a router's)."""
    if not rate_gbit > 0:
        raise ValueError(f"link rate must be > 0 Gbit/s, got {rate_gbit}")
    rate_bps = rate_gbit * 1e9
    burst = max(131072, int(rate_bps / 8 / 1000))
    return ["tbf", "rate", f"{rate_bps / 1e6:.3f}mbit", "burst", str(burst), "latency", "20ms"]


@dataclass(frozen=True)
class LinkCounters:
    """Bytes a node's link carried, as the switch side of its veth counts them."""

    node: int
    bytes_from_node: int  # the node sent (switch port received)
    bytes_to_node: int  # the node received (switch port sent)

    def __sub__(self, other: "LinkCounters") -> "LinkCounters":
        return LinkCounters(self.node, self.bytes_from_node - other.bytes_from_node,
                            self.bytes_to_node - other.bytes_to_node)


@dataclass(frozen=True)
class EmulatedNodes:
    """Namespaces this process created; `teardown()` removes them all."""

    owner_pid: int
    nodes: int
    inter_node_gbit: Optional[float]  # None: unshaped
    intra_node_gbit: Optional[float]

    @property
    def switch(self) -> str:
        return f"{PREFIX}{self.owner_pid}-sw"

    def namespace(self, node: int) -> str:
        return f"{PREFIX}{self.owner_pid}-n{node}"

    def address(self, node: int) -> str:
        return f"{SUBNET}.{node // 250}.{node % 250 + 1}"

    @property
    def namespaces(self) -> list[str]:
        return [self.switch] + [self.namespace(i) for i in range(self.nodes)]

    @property
    def ifname(self) -> str:
        return NODE_IFNAME

    def counters(self) -> list[LinkCounters]:
        """Per node, bytes through its link so far (includes TCP/IP headers and set-up traffic)."""
        done = _ip("-n", self.switch, "-s", "-j", "link", "show")
        by_name = {link["ifname"]: link["stats64"] for link in json.loads(done.stdout)}
        return [LinkCounters(i, by_name[f"n{i}"]["rx"]["bytes"], by_name[f"n{i}"]["tx"]["bytes"])
                for i in range(self.nodes)]

    def exec_prefix(self, node: int) -> list[str]:
        """Command prefix that runs a program inside node's namespace."""
        return ["ip", "netns", "exec", self.namespace(node)]

    def teardown(self) -> None:
        """Delete every namespace of this set (idempotent; interfaces go with their namespace)."""
        for ns in self.namespaces:
            _ip("netns", "del", ns, check=False)

    def existing(self) -> list[str]:
        return [ns for ns in list_namespaces() if ns in self.namespaces]


def list_namespaces() -> list[str]:
    done = _ip("netns", "list", check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete c2r-<pid>-* namespaces whose creating process is gone; return their names."""
    removed = []
    for ns in list_namespaces():
        if not ns.startswith(PREFIX):
            continue
        pid = ns[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    return removed


def create_nodes(nodes: int, inter_node_gbit: Optional[float] = None,
                 intra_node_gbit: Optional[float] = None) -> EmulatedNodes:
    """Create the namespaces, bridge, veth pairs and shaping; on any failure remove what was made."""
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"--nodes = {nodes}: allowed 1..{MAX_NODES}")
    shaping = [tbf_args(r) if r is not None else None for r in (inter_node_gbit, intra_node_gbit)]
    em = EmulatedNodes(os.getpid(), nodes, inter_node_gbit, intra_node_gbit)
    em.teardown()  # namespaces of a killed earlier process with this same (reused) pid
    try:
        sw = em.switch
        _run(["ip", "netns", "add", sw])
        _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", sw, "link", "set", "br0", "up"])
        for i in range(nodes):
            ns = em.namespace(i)
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", sw, "link", "add", f"n{i}", "type", "veth", "peer", "name", NODE_IFNAME, "netns", ns])
            _run(["ip", "-n", sw, "link", "set", f"n{i}", "master", "br0"])
            _run(["ip", "-n", sw, "link", "set", f"n{i}", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{em.address(i)}/16", "dev", NODE_IFNAME])
            _run(["ip", "-n", ns, "link", "set", NODE_IFNAME, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # A collective's messages come in bursts with idle gaps between them; TCP's default
            # restart from slow start after each gap halves the throughput of a shaped link.
            _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0"])
            if shaping[0] is not None:  # both directions of the node's link
                _run(["tc", "-n", ns, "qdisc", "add", "dev", NODE_IFNAME, "root", *shaping[0]])
                _run(["tc", "-n", sw, "qdisc", "add", "dev", f"n{i}", "root", *shaping[0]])
            if shaping[1] is not None:
                _run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", *shaping[1]])
    except BaseException:
        em.teardown()
        raise
    return em
