"""Linux network namespaces as separate hosts, for the multi-host test and benchmark (needs root and `ip`).

    SERVER namespace   br0 (the LAN) with 10.A.B.1/24, its own loopback (where the SuperLink listens)
    DEVICE namespace i eth0 with 10.A.B.(i+2)/24, its own loopback; a veth pair joins it to br0

Default routes point into the LAN and end there: the server namespace has no way out.

Each namespace has only its own loopback and this LAN: nothing in it can reach the machine's other
addresses, and the machine's processes cannot reach it except through `ip netns exec`. The namespaces,
the bridge and the veth pairs are made here and removed by `destroy()` (also on errors: use it as a
context manager), after every process still running in them is killed. The subnet is a random /24 of the
private 10/8 block, among those the machine does not route already, so it never shadows a real network.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import subprocess
import time


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.name != "posix" or not os.path.isdir("/proc"):
        return "not Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "the `ip` command (iproute2) is missing"
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if res.returncode != 0:
        return f"`ip netns` does not work here: {res.stderr.strip()}"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def _routed_networks() -> list:
    out = _ip("-4", "route", "show", "table", "all", check=False).stdout.split()
    nets = []
    for word in out:
        try:
            nets.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            pass
    return nets


class Hosts:
    """A server namespace and `devices` device namespaces on one private /24 (see the module docstring)."""

    def __init__(self, devices: int = 2, tag: str | None = None):
        self.tag = tag or f"fh{os.getpid() % 10000}{random.randrange(100):02d}"
        self.server = f"{self.tag}-srv"
        self.devices = [f"{self.tag}-d{i}" for i in range(devices)]
        taken = _routed_networks()
        for _ in range(200):
            net = ipaddress.ip_network(f"10.{random.randrange(64, 250)}.{random.randrange(256)}.0/24")
            if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
                break
        else:
            raise RuntimeError("no free 10.x.y.0/24 subnet found")
        self.network = net
        hosts = list(net.hosts())
        self.server_ip = str(hosts[0])
        self.device_ips = [str(hosts[i + 1]) for i in range(devices)]
        self.created: list[str] = []

    @property
    def namespaces(self) -> list[str]:
        return [self.server, *self.devices]

    def create(self) -> "Hosts":
        try:
            for ns in self.namespaces:
                _ip("netns", "add", ns)
                self.created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", self.server, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.server, "addr", "add", f"{self.server_ip}/24", "dev", "br0")
            _ip("-n", self.server, "link", "set", "br0", "up")
            for i, (ns, addr) in enumerate(zip(self.devices, self.device_ips)):
                # Both ends are born inside the namespaces: the machine's own interfaces are never touched.
                _ip("-n", self.server, "link", "add", f"lan{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.server, "link", "set", f"lan{i}", "master", "br0")
                _ip("-n", self.server, "link", "set", f"lan{i}", "up")
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "route", "add", "default", "via", self.server_ip)
            # Default routes that end in the server namespace (it has no way out): programs that find their own
            # address by "connecting" a UDP socket to a public address (Ray does) get their LAN address.
            _ip("-n", self.server, "route", "add", "default", "dev", "br0")
        except BaseException:
            self.destroy()
            raise
        return self

    def cmd(self, ns: str, argv: list[str]) -> list[str]:
        """`argv` run inside namespace `ns`."""
        return ["ip", "netns", "exec", ns, *argv]

    def pids(self, ns: str) -> list[int]:
        res = _ip("netns", "pids", ns, check=False)
        return [int(p) for p in res.stdout.split() if p.isdigit()]

    def destroy(self) -> None:
        """Kill every process left in the namespaces (TERM, then KILL), then delete them (veths and bridge go too)."""
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            left = [p for ns in self.created for p in self.pids(ns)]
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while left and time.monotonic() < deadline:
                time.sleep(0.2)
                left = [p for ns in self.created for p in self.pids(ns)]
        for ns in reversed(self.created):
            _ip("netns", "del", ns, check=False)
        self.created = []

    def __enter__(self) -> "Hosts":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.destroy()
