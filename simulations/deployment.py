"""Flower's runtimes driven by its own CLI: the server piece of a deployment (a SuperLink on 127.0.0.1 and,
for devices on other machines, a public front that forwards only the Fleet API), optionally with devices
on this machine (`fedhydra deploy`), or a SuperLink in simulation mode (`fedhydra simulate`); then `flwr run`.

What runs where (each process with its own FLWR_HOME):

    flower-superlink      the server: Fleet, Control and Runtime APIs (HTTPS) on one port on 127.0.0.1;
                          it starts the ServerApp (fedhydra.server.server_app:app) for the run
    fleet front           `public=[HOST, ...]`: simulations/fleet_front.py on HOST:PUBLIC_PORT, forwarding
                          only `/v1/fleet/<route>` to the SuperLink (TLS on both legs); `fedhydra deploy`
                          runs it on 127.0.0.1, `fedhydra server start` on the server's public address
    devices               simulations/device.py: per client a SuperNode (its own --port, private state
                          folder, authentication key) and the warm ClientApp executor beside it
    flwr run APP deploy   the CLI, on the server only: packages APP (a minimal folder written here:
                          pyproject.toml with the components and the run config, no code) as a FAB

In simulation mode (`simulation=True`) there are no SuperNodes: the SuperLink runs the ClientApps
itself on Flower's simulation runtime (Ray), and `flwr run` gives it the number of virtual nodes.

Security: TLS with a private CA that simulations/certs.py generates unless `certs` already holds one
(the server certificate's SAN holds 127.0.0.1, localhost and every public host); SuperNode
authentication is on, so the SuperLink lets in only the SuperNodes whose public keys were enrolled
(`flwr supernode register`, through the Control API on loopback) before they start. `insecure` turns
both off and is for quick local experiments only (no front then: nothing leaves loopback).

Every process started here is stopped when the deployment ends: normally, on an error, on Ctrl-C
or SIGTERM (each child runs in its own session; its whole process tree is terminated, then killed).
Flower never installs dependencies at run time, sends telemetry or checks for updates.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedhydra.common.settings import toml_value

from .device import ISOLATIONS, Device
from .flwr_cli import CONNECTION, ServerCLI
from .processes import FLWR_ENV, DeployError, Launcher, Proc, _bin, free_port  # noqa: F401  (FLWR_ENV: the CLI's)

LOOPBACK = "127.0.0.1"


def is_wildcard(host: str) -> bool:
    """Whether a bind address means every interface (IPv4's or IPv6's unspecified address), so no peer dials it."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host name
        return False


# ---------------------------------------------------------------- the deployment
class Deployment:
    """A SuperLink on loopback (and its public front), devices on this machine, and the `flwr` CLI pointed at them.

    Use as a context manager: leaving it stops every process it started. `public`: the hosts (IP addresses
    or DNS names) devices use to reach this server; the front listens on `bind_host` (default: the first of
    them) and `public_port`. `front=True` without `public` runs the front on 127.0.0.1 (`fedhydra deploy`).
    """

    def __init__(self, workdir: str | os.PathLike, certs: str | os.PathLike | None = None,
                 insecure: bool = False, host: str = LOOPBACK, port: int | None = None,
                 isolation: str = "process", log=print, simulation: bool = False,
                 public: list[str] | None = None, public_port: int | None = None, bind_host: str | None = None,
                 front: bool | None = None, ray_address: str = ""):
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation {isolation!r}: expected one of {ISOLATIONS}")
        self.isolation = isolation
        # Flower's Ray backend calls ray.init() without an address, and Ray then joins the cluster RAY_ADDRESS names.
        # Without an address, "local": a Ray of its own, even where a `ray start` cluster (or its stale
        # /tmp/ray/ray_current_cluster file) exists, which ray.init() would otherwise try to join.
        self.superlink_env = {"RAY_ADDRESS": ray_address or "local"} if simulation else {}
        self.workdir = Path(workdir).expanduser().resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.simulation = simulation
        self.insecure = insecure or simulation  # the simulation SuperLink only talks to the local CLI
        self.public = list(public or [])
        self.front = bool(self.public) if front is None else front
        if self.front and self.insecure:
            raise ValueError("a public front needs TLS and SuperNode authentication: drop --insecure")
        self.host = host
        self.port = port or free_port(host)
        self.address = f"{host}:{self.port}"  # the SuperLink itself: the CLI's connection
        self.bind_host = bind_host or (self.public[0] if self.public else LOOPBACK)
        self.public_port = (public_port or free_port(self.bind_host)) if self.front else None
        shown = self.public[0] if self.public else self.bind_host
        self.fleet_address = f"{shown}:{self.public_port}" if self.front else self.address  # what devices dial
        self.certs_dir = Path(certs).expanduser().resolve() if certs else self.workdir / "certs"
        self.launcher = Launcher(self.workdir, self.workdir / "logs")
        self.logs = self.launcher.logs
        self.cli_home = self.workdir / "flwr-home" / "cli"
        self.cli = ServerCLI(self.cli_home, self.workdir, self.launcher)
        self.log = log
        self.superlink: Proc | None = None
        self.front_proc: Proc | None = None
        self.devices: dict[str, Device] = {}
        self.registered: dict[str, str] = {}  # node name -> node id
        self.server_certs = None
        if not self.insecure:
            from .certs import ensure_server_certs

            hosts = sorted({host, LOOPBACK, "localhost", *self.public}
                           | ({self.bind_host} if self.front and not is_wildcard(self.bind_host) else set()))
            self.server_certs = ensure_server_certs(self.certs_dir, hosts=hosts)
        self._write_cli_config()

    # ------------------------------------------------------------ plumbing
    @property
    def nodes(self) -> dict[str, Proc]:
        return {n: d.supernode for n, d in self.devices.items() if d.supernode}

    @property
    def executors(self) -> dict[str, Proc]:
        return {n: d.executor for n, d in self.devices.items() if d.executor}

    def env(self, flwr_home: Path, extra: dict | None = None) -> dict:
        return self.launcher.env(flwr_home, extra)

    def _write_cli_config(self) -> None:
        conn = {"address": self.address}
        if self.insecure:
            conn["insecure"] = True
        else:
            conn["root-certificates"] = str(self.server_certs.ca_cert)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in conn.items()]
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the `flwr` CLI against this deployment's connection."""
        return self.cli.flwr(*args, timeout=timeout)

    # ------------------------------------------------------------ SuperLink and front
    def start_superlink(self, timeout: float = 60) -> Proc:
        cmd = [_bin("flower-superlink"), "--host", self.host, "--port", str(self.port),
               "--disable-runtime-dependency-installation"] + (["--simulation"] if self.simulation else [])
        if self.insecure:
            cmd.append("--insecure")
        else:
            c = self.server_certs
            cmd += ["--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile", str(c.server_cert),
                    "--ssl-keyfile", str(c.server_key), "--enable-supernode-auth"]
        self.superlink = self.launcher.spawn("superlink", cmd, self.workdir / "flwr-home" / "superlink",
                                             self.superlink_env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.superlink.alive():
                raise DeployError(f"flower-superlink exited ({self.superlink.popen.returncode}); "
                                  f"log {self.superlink.log}:\n{self.superlink.tail()}")
            try:  # a cheap TCP probe first: each `flwr` call costs about a second of CPU
                socket.create_connection((self.host, self.port), timeout=2).close()
            except OSError:
                time.sleep(0.5)
                continue
            if self.flwr("supernode", "ls", CONNECTION, "--format", "json", timeout=30).returncode == 0:
                mode = "simulation" if self.simulation else "insecure" if self.insecure else "TLS, node auth on"
                self.log(f"SuperLink up on {self.address} ({mode})")
                if self.front:
                    self.start_front(max(5.0, deadline - time.monotonic()))
                return self.superlink
            time.sleep(0.5)
        raise DeployError(f"flower-superlink did not answer on {self.address} within {timeout:.0f}s; "
                          f"log {self.superlink.log}:\n{self.superlink.tail()}")

    def start_front(self, timeout: float = 30) -> Proc:
        """The public front (simulations/fleet_front.py): Fleet API routes only, TLS on both legs."""
        c = self.server_certs
        cmd = [sys.executable, "-m", "fedhydra.simulations.fleet_front", "--listen",
               f"{self.bind_host}:{self.public_port}", "--upstream", self.address, "--ca", str(c.ca_cert),
               "--cert", str(c.server_cert), "--key", str(c.server_key)]
        self.front_proc = self.launcher.spawn("front", cmd, self.workdir / "flwr-home" / "front")
        probe = LOOPBACK if is_wildcard(self.bind_host) else self.bind_host
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.front_proc.alive():
                raise DeployError(f"the Fleet API front exited ({self.front_proc.popen.returncode}); "
                                  f"log {self.front_proc.log}:\n{self.front_proc.tail()}")
            try:
                socket.create_connection((probe, self.public_port), timeout=2).close()
                self.log(f"Fleet API front up on {self.bind_host}:{self.public_port} (devices dial "
                         f"{self.fleet_address}); Control and Runtime APIs stay on {self.address}")
                return self.front_proc
            except OSError:
                time.sleep(0.3)
        raise DeployError(f"the Fleet API front did not listen on {self.bind_host}:{self.public_port} within "
                          f"{timeout:.0f}s; log {self.front_proc.log}")

    # ------------------------------------------------------------ enrolment
    def node_key(self, name: str):
        from .certs import ensure_node_key

        return ensure_node_key(self.certs_dir, name)

    def enroll(self, public_key: str | os.PathLike, name: str) -> str:
        return self.cli.enroll(public_key, name)

    def register(self, name: str) -> str:
        """Register SuperNode `name`'s public key (made under certs/nodes/) on the SuperLink; returns its node id."""
        if name not in self.registered:
            self.registered[name] = self.enroll(self.node_key(name).public, name)
        return self.registered[name]

    # ------------------------------------------------------------ devices on this machine
    def start_supernode(self, name: str, state: str | os.PathLike, port: int | None = None,
                        register: bool = True, node_config: dict | None = None, auth_key: bool = True) -> Proc:
        """Start device `name` (SuperNode + executor) for the client state folder `state`, connected through the
        front when there is one (registered first unless told not to; `auth_key=False` starts it without a key,
        which an authenticating SuperLink refuses)."""
        if not self.insecure and register:
            self.register(name)
        old = self.devices.get(name)
        device = Device(self.launcher, name, self.fleet_address, state,
                        ca_cert=None if self.insecure else self.server_certs.ca_cert,
                        key=self.node_key(name).private if not self.insecure and auth_key else None,
                        node_config=node_config, isolation=self.isolation,
                        port=port or (old.port if old else None))
        if old is not None and old.executor is not None:
            old.executor.stop()
        self.devices[name] = device
        return device.start()

    def restart_supernode(self, name: str) -> Proc:
        """Start device `name` again (same key, state folder and port), with a new executor."""
        return self.devices[name].start()

    def clientapp_launches(self, name: str) -> int:
        """How many ClientApp processes node `name` has started so far (counted in its logs)."""
        return self.devices[name].clientapp_launches()

    def online_nodes(self) -> set[str]:
        return self.cli.online_nodes()

    def node_list(self) -> list[dict]:
        return self.cli.node_list()

    def wait_online(self, names: list[str], timeout: float = 120) -> None:
        """Wait until every named device is connected (checked on the SuperLink with node auth, from the
        SuperNodes' logs in --insecure mode, where node ids are not known in advance) and its executor has
        imported what ClientApps need."""
        deadline = time.monotonic() + timeout
        while True:
            for n in names:
                dead = self.devices[n].dead()
                if dead:
                    what, p = dead
                    raise DeployError(f"{what} {n} exited ({p.popen.returncode}); log {p.log}:\n{p.tail()}")
            if self.insecure:
                up = {n for n in names if self.devices[n].connected_in_log()}
            else:
                online = self.online_nodes()
                up = {n for n in names if self.registered.get(n) in online}
            up = {n for n in up if self.devices[n].executor_ready()}
            if up >= set(names):
                return
            if time.monotonic() > deadline:
                raise DeployError(f"SuperNodes {sorted(set(names) - up)} did not connect within {timeout:.0f}s")
            time.sleep(2.0)

    # ------------------------------------------------------------ the CLI (Control API on loopback)
    def run(self, app_dir: str | os.PathLike, run_config: dict | None = None, timeout: float | None = None,
            echo=None, federation_config: dict | None = None) -> dict:
        return self.cli.run(app_dir, run_config, timeout, echo, federation_config)

    def run_info(self, run_id: str) -> dict:
        return self.cli.run_info(run_id)

    # ------------------------------------------------------------ teardown
    def stop(self) -> None:
        procs = self.launcher.take_all()
        # Executors first (their running ClientApps report to a live SuperNode), then nodes and CLI
        # (a SuperNode deactivates itself on SIGTERM), then the front, the SuperLink last.
        executors = list(self.executors.values())

        def order(p: Proc) -> int:
            return (3 if p is self.superlink else 2 if p is self.front_proc
                    else 0 if any(p is e for e in executors) else 1)

        for proc in sorted(procs, key=order):
            proc.stop()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
