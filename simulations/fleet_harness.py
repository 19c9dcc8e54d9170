"""A server and devices driven through the commands a person types (`fedhydra server ...`, `fedhydra node ...`),
each in its own network namespace (simulations/netns.py) or, without namespaces, all on this machine's
loopback. The multi-host test and benchmark use it; it runs nothing a user could not run by hand.

Files live as they would on separate machines: ROOT/server (the server's home, CA key included) and
ROOT/device-<i> (a device's key pair, data, state and logs). The only files that cross are the ones the
README lists: the server's ca.crt goes to each device, each device's KEY.pub goes to the server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .netns import Hosts
from .processes import FLWR_ENV, Proc

FEDHYDRA = str(Path(sys.executable).parent / "fedhydra")


def wait_for(path: Path, pattern: str, timeout: float, proc: Proc | None = None) -> re.Match:
    """The first match of `pattern` in the file at `path`, waiting up to `timeout` s (and failing early when `proc`
    exits)."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
        m = re.search(pattern, text)
        if m:
            return m
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}) before {pattern!r}:\n{text[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{pattern!r} not in {path} within {timeout:.0f} s:\n{text[-3000:]}")
        time.sleep(0.3)


class Fleet:
    """A server and `devices` devices under ROOT; on `hosts` namespaces when given, else on loopback."""

    def __init__(self, root: Path, devices: int, hosts: Hosts | None = None, public_port: int = 9092):
        self.root, self.hosts, self.n = Path(root), hosts, devices
        self.server_home = self.root / "server"
        self.public_host = hosts.server_ip if hosts else "127.0.0.1"
        self.public_port = public_port
        self.procs: list[Proc] = []
        self.node_ids: dict[int, str] = {}

    # ------------------------------------------------------------ running commands
    def ns(self, who: str | int) -> str | None:
        if self.hosts is None:
            return None
        return self.hosts.server if who == "server" else self.hosts.devices[int(who)]

    def argv(self, who: str | int, args: list[str]) -> list[str]:
        ns = self.ns(who)
        return self.hosts.cmd(ns, args) if ns else args

    def env(self) -> dict:
        env = dict(os.environ) | FLWR_ENV
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def call(self, who: str | int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`fedhydra ARGS` on host `who` ("server" or a device index); its output, checked."""
        res = subprocess.run(self.argv(who, [FEDHYDRA, *args]), capture_output=True, text=True, timeout=timeout,
                             env=self.env(), stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise RuntimeError(f"fedhydra {' '.join(args)} on {who} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def start(self, who: str | int, name: str, *args: str, program: list[str] | None = None) -> Proc:
        """A long-running `fedhydra ARGS` (or `program`) on host `who`, its output in ROOT/logs/NAME.log."""
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            popen = subprocess.Popen(self.argv(who, program or [FEDHYDRA, *args]), stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env(),
                                     start_new_session=True)
        proc = Proc(name, popen, log, {popen.pid})
        self.procs.append(proc)
        return proc

    # ------------------------------------------------------------ the server
    def start_server(self) -> Proc:
        proc = self.start("server", "server", "server", "start", "--home", str(self.server_home), "--public-host",
                          self.public_host, "--public-port", str(self.public_port), "--poll", "2")
        wait_for(proc.log, r"server ready", 90, proc)
        return proc

    def server_info(self) -> dict:
        return json.loads((self.server_home / "server.json").read_text(encoding="utf-8"))

    # ------------------------------------------------------------ devices
    def device_dir(self, i: int) -> Path:
        return self.root / f"device-{i}"

    def prepare_device(self, i: int, users: list, task_lamp_name: str, enroll: bool = True) -> str | None:
        """Device i's own LaMP files, its key pair (made on the device), the server's ca.crt copied over, and its
        public key enrolled on the server; returns its node id (None when not enrolled)."""
        d = self.device_dir(i)
        write_lamp(d / "data", users, task_lamp_name)
        shutil.copyfile(self.server_home / "certs" / "ca.crt", d / "ca.crt")  # the one file a device gets
        self.call(i, "node", "keygen", str(d / "key"))
        if not enroll:
            return None
        out = self.call("server", "server", "enroll", "--home", str(self.server_home), str(d / "key.pub"),
                        "--name", f"device-{i}").stdout
        self.node_ids[i] = re.search(r"node (\d+)", out).group(1)
        return self.node_ids[i]

    def start_device(self, i: int, name: str | None = None, extra: tuple = ()) -> Proc:
        d = self.device_dir(i)
        first = not (d / "state" / "client.json").is_file()
        return self.start(i, name or f"device-{i}", "node", "start", "--superlink",
                          f"{self.public_host}:{self.public_port}", "--ca", str(d / "ca.crt"), "--key",
                          str(d / "key"), "--state", str(d / "state"), "--workdir", str(d / "work"),
                          "--name", f"device-{i}", "--threads", "1", *(["--data", str(d / "data")] if first else []),
                          *extra)

    def wait_connected(self, proc: Proc, timeout: float = 120) -> str:
        """The node id a started device reports once its SuperNode is in and its executor warm."""
        return wait_for(proc.log, r"connected as node (\d+)", timeout, proc).group(1)

    def clientapp_launches(self, i: int) -> int:
        log = self.device_dir(i) / "work" / "logs" / f"device-{i}-executor.log"
        return log.read_text(encoding="utf-8", errors="replace").count("Forked ClientApp process") if log.is_file() else 0

    # ------------------------------------------------------------ teardown
    def stop(self) -> None:
        """Every process started here (devices first, the server last), then whatever is left in the namespaces."""
        for proc in sorted(self.procs, key=lambda p: p.name == "server"):
            if proc.alive():
                proc.stop(sig=signal.SIGTERM, grace=15)
        self.procs = []


def write_lamp(folder: Path, users: list, lamp_name: str) -> None:
    """`users` as LaMP's dev_questions.json + dev_outputs.json (a device's own files)."""
    folder.mkdir(parents=True, exist_ok=True)
    questions = [{"id": u.id, "input": u.input, "profile": u.profile} for u in users]
    outputs = {"task": lamp_name, "golds": [{"id": u.id, "output": u.gold} for u in users]}
    (folder / "dev_questions.json").write_text(json.dumps(questions, indent=1) + "\n", encoding="utf-8")
    (folder / "dev_outputs.json").write_text(json.dumps(outputs, indent=1) + "\n", encoding="utf-8")
