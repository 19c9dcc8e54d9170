"""Child processes of a deployment: start them with Flower's environment on free loopback ports, find
their whole process trees (Flower's children start sessions of their own) and stop every one of them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
import threading
from pathlib import Path

FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_DEDUP_LOGS": "0",  # every client's progress line, not "repeated 3x across cluster"
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and where its log is."""


def one_line_errors(func):
    """A command whose failed deployment step the CLI reports as one clear line (it catches ValueError), not as a
    traceback."""
    def command(args):
        try:
            return func(args)
        except DeployError as exc:
            raise ValueError(str(exc)) from exc

    return command


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (the venv), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise DeployError(f"{name} not found next to {sys.executable} or on PATH; install flwr==1.41.0")
    return found


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, session id, start time) from /proc (Linux); {} elsewhere."""
    table = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()  # fields after "(comm)"
        # rest[0]=state, [1]=ppid, [2]=pgrp, [3]=session, ..., [19]=starttime
        if rest[0] == "Z":
            continue
        table[int(entry)] = (int(rest[1]), int(rest[3]), rest[19])
    return table


def _tree(roots: set[int], sessions: set[int]) -> dict[int, str]:
    """Every live process under `roots` or in one of `sessions` (pid -> start time)."""
    table = _proc_table()
    found = {pid: table[pid][2] for pid in roots if pid in table}
    found |= {pid: t[2] for pid, t in table.items() if t[1] in sessions and pid != os.getpid()}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _sid, start) in table.items():
            if ppid in found and pid not in found:
                found[pid] = start
                changed = True
    return found


def _signal_all(pids: dict[int, str], sig: int) -> None:
    table = _proc_table()
    for pid, start in pids.items():
        if pid in table and table[pid][2] == start:  # same process, not a reused pid
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    sessions: set[int] = field(default_factory=set)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 8.0, sig: int = signal.SIGTERM) -> None:
        """Stop this process and everything it started (its session, its descendants, their sessions)."""
        roots = {self.popen.pid}
        tree = _tree(roots, self.sessions | {self.popen.pid})
        # Flower's children (flower-superexec, flwr-serverapp/clientapp) start their own sessions.
        self.sessions |= {sid for pid, (_pp, sid, _st) in _proc_table().items() if pid in tree}
        _signal_all(tree, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            left = _tree(set(tree), self.sessions)
            if not left:
                break
            tree |= left
            time.sleep(0.2)
        left = _tree(set(tree), self.sessions)
        if left:
            _signal_all(left, signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def flwr_env(flwr_home: Path, extra: dict | None = None) -> dict:
    """This process's environment with Flower's switches (FLWR_ENV) and FLWR_HOME=`flwr_home` (created)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(FLWR_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    # Flower starts flower-superexec / flwr-serverapp / flwr-clientapp by name: the venv goes first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


class Launcher:
    """Starts the processes of one deployment role (server, device, or both on one machine): each in a
    session of its own, with Flower's environment and its own FLWR_HOME, its output in LOGS/NAME.log;
    remembers them so that `stop_all` ends every one."""

    def __init__(self, workdir: Path, logs: Path):
        self.workdir, self.logs = workdir, logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self._lock = threading.Lock()

    def env(self, flwr_home: Path, extra: dict | None = None) -> dict:
        return flwr_env(flwr_home, extra)

    def spawn(self, name: str, cmd: list[str], flwr_home: Path, extra_env: dict | None = None) -> Proc:
        """Start `cmd`; its output goes to LOGS/NAME.log (appended)."""
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     env=self.env(flwr_home, extra_env), cwd=str(self.workdir),
                                     start_new_session=True)
        return self.adopt(Proc(name, popen, log_path, {popen.pid}))

    def adopt(self, proc: Proc) -> Proc:
        """Remember a process started elsewhere, so that it is stopped with the others."""
        with self._lock:
            self.procs.append(proc)
        return proc

    def take_all(self) -> list[Proc]:
        with self._lock:
            procs, self.procs = list(self.procs), []
        return procs
