"""The device piece of a deployment: one SuperNode and, beside it, FedHydra's warm ClientApp executor.

    flower-supernode   connects to the SuperLink (or the server's public front) at `superlink`, verifies
                       it against the CA certificate, signs its requests with the device's own private
                       key (SuperNode authentication), and serves its Runtime API on 127.0.0.1 only;
                       node config `state="DIR"` names the device's private state folder, and any
                       other node config (threads, llm, llm-base-url, ...) overrides the run's settings
    executor           isolation "process": `python -m fedhydra.client.executor` (client/executor.py),
                       which imports torch, transformers and the ClientApp once and forks one ClientApp
                       process per message; it shares a random secret with its SuperNode only (Flower's
                       SuperExec HMAC authentication) and exits when its SuperNode does. Isolation
                       "subprocess": no executor; the SuperNode starts a fresh `flwr-clientapp` per message

`fedhydra node start` runs one Device on a user's machine; `fedhydra deploy` runs N of them on this
machine beside the server piece (simulations/deployment.py).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from fedhydra.common.settings import toml_value

from .processes import Launcher, Proc, _bin, free_port

ISOLATIONS = ("process", "subprocess")
RUNTIME_HOST = "127.0.0.1"  # every SuperNode's Runtime API (where its ClientApps connect) stays on loopback


class Device:
    """A SuperNode for the state folder `state` and its executor, started by `launcher`.

    `ca_cert=None` connects without TLS (an --insecure SuperLink); `key=None` starts without an
    authentication key (which an authenticating SuperLink refuses). `start()` again restarts it
    under the same key, state folder and Runtime API port, with a new executor.
    """

    def __init__(self, launcher: Launcher, name: str, superlink: str, state: str | os.PathLike, *,
                 ca_cert: str | os.PathLike | None = None, key: str | os.PathLike | None = None,
                 node_config: dict | None = None, isolation: str = "process", port: int | None = None,
                 flwr_home: Path | None = None, extra_env: dict | None = None):
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation {isolation!r}: expected one of {ISOLATIONS}")
        self.launcher, self.name, self.superlink = launcher, name, superlink
        self.state = Path(state).expanduser().resolve()
        self.ca_cert, self.key = ca_cert, key
        self.node_config = dict(node_config or {})
        self.isolation = isolation
        self.port = port or free_port(RUNTIME_HOST)
        self.flwr_home = flwr_home or launcher.workdir / "flwr-home" / name
        self.extra_env = dict(extra_env or {})
        self.supernode: Proc | None = None
        self.executor: Proc | None = None
        self._ready_before = 0
        self._log_start = 0

    @property
    def executor_log(self) -> Path:
        return self.launcher.logs / f"{self.name}-executor.log"

    def command(self, secret: Path | None) -> list[str]:
        config = {"state": str(self.state), **self.node_config}
        cmd = [_bin("flower-supernode"), "--superlink", self.superlink, "--host", RUNTIME_HOST, "--port",
               str(self.port), "--node-config", " ".join(f"{k}={toml_value(v)}" for k, v in config.items())]
        if secret is not None:
            cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
        if self.ca_cert is None:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.ca_cert)]
            if self.key is not None:
                cmd += ["--auth-supernode-private-key", str(self.key)]
        return cmd

    def start(self) -> Proc:
        """Start (or restart) the SuperNode, and its executor with isolation "process"."""
        from fedhydra.client.executor import READY

        if self.executor is not None:  # it follows its dead SuperNode within a second; never two on one port
            self.executor.stop()
        secret = self._new_secret() if self.isolation == "process" else None
        log = self.launcher.logs / f"{self.name}.log"
        self._log_start = log.stat().st_size if log.is_file() else 0  # logs are appended to across restarts
        self.supernode = self.launcher.spawn(self.name, self.command(secret), self.flwr_home, self.extra_env)
        if secret is not None:
            # Logs are appended to: this executor is ready when its log holds one more READY line.
            self._ready_before = _count(self.executor_log, READY)
            self.executor = self.launcher.spawn(
                f"{self.name}-executor",
                [sys.executable, "-m", "fedhydra.client.executor", "--runtime-api-address",
                 f"{RUNTIME_HOST}:{self.port}", "--superexec-auth-secret-file", str(secret),
                 "--parent-pid", str(self.supernode.popen.pid)],
                self.flwr_home, self.extra_env)  # the SuperNode's home: ClientApps install the FAB there
        return self.supernode

    def _new_secret(self) -> Path:
        """A fresh random secret shared by this SuperNode and its executor only."""
        path = self.launcher.workdir / "secrets" / self.name
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        return path

    def log_since_start(self) -> str:
        """What the SuperNode logged since its last start."""
        try:
            with open(self.launcher.logs / f"{self.name}.log", "rb") as f:
                f.seek(self._log_start)
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def processes(self) -> list[tuple[str, Proc]]:
        out = [("SuperNode", self.supernode)] if self.supernode else []
        return out + ([("executor of SuperNode", self.executor)] if self.executor else [])

    def dead(self) -> tuple[str, Proc] | None:
        """The first of this device's processes that exited, if any."""
        return next(((what, p) for what, p in self.processes() if not p.alive()), None)

    def executor_ready(self) -> bool:
        from fedhydra.client.executor import READY

        return self.executor is None or _count(self.executor_log, READY) > self._ready_before

    def connected_in_log(self) -> bool:
        """The SuperNode logged its node id (how an --insecure deployment, with no registered ids, sees it)."""
        return self.supernode is not None and "SuperNode ID:" in self.log_since_start()

    def clientapp_launches(self) -> int:
        """How many ClientApp processes this node has started so far (counted in its logs)."""
        from fedhydra.client.executor import LAUNCHED

        if self.isolation == "process":
            return _count(self.executor_log, LAUNCHED)
        return _count(self.launcher.logs / f"{self.name}.log", "Start `flwr-clientapp` process")

    def stop(self) -> None:
        """Executor first (its running ClientApp reports to a live SuperNode), then the SuperNode,
        which deactivates itself on SIGTERM."""
        for _what, proc in reversed(self.processes()):
            proc.stop()


def _count(path: Path, text: str) -> int:
    """Occurrences of `text` in the file at `path` (0 when it does not exist yet)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").count(text)
    except OSError:
        return 0
