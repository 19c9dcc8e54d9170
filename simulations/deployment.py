"""Flower's runtimes on 127.0.0.1, driven by its own CLI: a real deployment (SuperLink + N SuperNodes,
`fedhydra deploy`) or a SuperLink in simulation mode (`fedhydra simulate`), then `flwr run`.

What runs where (all on this machine, each process with its own FLWR_HOME):

    flower-superlink      the server: Fleet, Control and Runtime APIs (HTTPS) on one port; it
                          starts the ServerApp (fedhydra.server.server_app:app) for the run
    flower-supernode x N  one per client, each with its own --port, its own private state folder
                          (node config `state="DIR"`) and its own authentication key
    ClientApps            isolation "process" (default): beside each SuperNode, a long-lived FedHydra
                          executor (client/executor.py) that imported torch, transformers and the
                          ClientApp once and forks a ClientApp process per message; isolation
                          "subprocess": the SuperNode starts a fresh `flwr-clientapp` per message
    flwr run APP deploy   the CLI: packages APP (a minimal folder written here: pyproject.toml with
                          the components and the run config, no code) as a FAB and submits it

In simulation mode (`simulation=True`) there are no SuperNodes: the SuperLink runs the ClientApps
itself on Flower's simulation runtime (Ray), and `flwr run` gives it the number of virtual nodes.

Security: TLS with a private CA that this module generates (server/certs.py) unless `--certs DIR`
already holds one; SuperNode authentication is on, so the SuperLink lets in only the SuperNodes
whose public keys were registered (`flwr supernode register`) before they start. `--insecure`
turns both off and is for quick local experiments only.

The executor talks to its SuperNode's Runtime API on 127.0.0.1 only, and acquires tasks with
Flower's SuperExec HMAC authentication: each SuperNode and its executor share a random secret
(WORKDIR/secrets/NAME, mode 0600), so no other local process can take the node's tasks.

Every process started here is stopped when the command ends: normally, on an error, on Ctrl-C
or SIGTERM (each child runs in its own session; its whole process tree is terminated, then killed).
Flower never installs dependencies at run time, sends telemetry or checks for updates.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedhydra.common.settings import toml_value

from .processes import DeployError, Proc, _bin, free_port

CONNECTION = "deploy"
ISOLATIONS = ("process", "subprocess")
RUNTIME_HOST = "127.0.0.1"  # every SuperNode's Runtime API (where its ClientApps connect) stays on loopback
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_DEDUP_LOGS": "0",  # every client's progress line, not "repeated 3x across cluster"
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


# ---------------------------------------------------------------- the deployment
class Deployment:
    """A SuperLink and SuperNodes on loopback, and the `flwr` CLI pointed at them.

    Use as a context manager: leaving it stops every process it started.
    """

    def __init__(self, workdir: str | os.PathLike, certs: str | os.PathLike | None = None,
                 insecure: bool = False, host: str = "127.0.0.1", port: int | None = None,
                 isolation: str = "process", log=print, simulation: bool = False):
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation {isolation!r}: expected one of {ISOLATIONS}")
        self.isolation = isolation
        self.workdir = Path(workdir).expanduser().resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.simulation = simulation
        self.insecure = insecure or simulation  # the simulation SuperLink only talks to the local CLI
        self.host = host
        self.port = port or free_port(host)
        self.address = f"{host}:{self.port}"
        self.certs_dir = Path(certs).expanduser().resolve() if certs else self.workdir / "certs"
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.cli_home = self.workdir / "flwr-home" / "cli"
        self.log = log
        self.superlink: Proc | None = None
        self.nodes: dict[str, Proc] = {}
        self.executors: dict[str, Proc] = {}  # isolation "process": node name -> its ClientApp executor
        self._ready_lines: dict[str, int] = {}
        self.node_state: dict[str, tuple[Path, int, dict]] = {}
        self.registered: dict[str, str] = {}  # node name -> node id
        self._procs: list[Proc] = []
        self._lock = threading.Lock()
        self.server_certs = None
        if not insecure:
            from .certs import ensure_server_certs

            self.server_certs = ensure_server_certs(self.certs_dir, hosts=sorted({host, "127.0.0.1", "localhost"}))
        self._write_cli_config()

    # ------------------------------------------------------------ plumbing
    def env(self, flwr_home: Path, extra: dict | None = None) -> dict:
        flwr_home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(FLWR_ENV)
        env["FLWR_HOME"] = str(flwr_home)
        # Flower starts flower-superexec / flwr-serverapp / flwr-clientapp by name: the venv goes first.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(extra or {})
        return env

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

    def _spawn(self, name: str, cmd: list[str], flwr_home: Path, extra_env: dict | None = None) -> Proc:
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     env=self.env(flwr_home, extra_env), cwd=str(self.workdir),
                                     start_new_session=True)
        proc = Proc(name, popen, log_path, {popen.pid})
        with self._lock:
            self._procs.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the `flwr` CLI against this deployment's connection."""
        return subprocess.run([_bin("flwr"), *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=self.env(self.cli_home), cwd=str(self.workdir), timeout=timeout)

    # ------------------------------------------------------------ SuperLink
    def start_superlink(self, timeout: float = 60) -> Proc:
        cmd = [_bin("flower-superlink"), "--host", self.host, "--port", str(self.port),
               "--disable-runtime-dependency-installation"] + (["--simulation"] if self.simulation else [])
        if self.insecure:
            cmd.append("--insecure")
        else:
            c = self.server_certs
            cmd += ["--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile", str(c.server_cert),
                    "--ssl-keyfile", str(c.server_key), "--enable-supernode-auth"]
        self.superlink = self._spawn("superlink", cmd, self.workdir / "flwr-home" / "superlink")
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
                return self.superlink
            time.sleep(0.5)
        raise DeployError(f"flower-superlink did not answer on {self.address} within {timeout:.0f}s; "
                          f"log {self.superlink.log}:\n{self.superlink.tail()}")

    # ------------------------------------------------------------ SuperNodes
    def node_key(self, name: str):
        from .certs import ensure_node_key

        return ensure_node_key(self.certs_dir, name)

    def register(self, name: str) -> str:
        """Register SuperNode `name`'s public key on the SuperLink; returns its node id."""
        if name in self.registered:
            return self.registered[name]
        key = self.node_key(name)
        res = self.flwr("supernode", "register", str(key.public), CONNECTION, "--name", name, "--format", "json")
        try:
            node_id = str(json.loads(res.stdout[res.stdout.index("{"):])["node-id"])
        except (ValueError, KeyError) as exc:
            raise DeployError(f"registering {name} failed: {res.stdout.strip()} {res.stderr.strip()}") from exc
        self.registered[name] = node_id
        return node_id

    def start_supernode(self, name: str, state: str | os.PathLike, port: int | None = None,
                        register: bool = True, node_config: dict | None = None, auth_key: bool = True) -> Proc:
        """Start SuperNode `name` for the client state folder `state` (registered first unless told not to;
        `auth_key=False` starts it without a key, which an authenticating SuperLink refuses)."""
        state = Path(state).expanduser().resolve()
        if port is None:
            port = self.node_state[name][1] if name in self.node_state else free_port(self.host)
        self.node_state[name] = (state, port, dict(node_config or {}))
        config = {"state": str(state), **(node_config or {})}
        cmd = [_bin("flower-supernode"), "--superlink", self.address, "--host", RUNTIME_HOST, "--port", str(port),
               "--node-config", " ".join(f"{k}={toml_value(v)}" for k, v in config.items())]
        if self.isolation == "process":
            secret = self._executor_secret(name)
            cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
        if self.insecure:
            cmd.append("--insecure")
        else:
            if register:
                self.register(name)
            cmd += ["--root-certificates", str(self.server_certs.ca_cert)]
            if auth_key:
                cmd += ["--auth-supernode-private-key", str(self.node_key(name).private)]
        old = self.executors.pop(name, None)
        if old is not None:  # it follows its dead SuperNode within a second; never two on one port
            old.stop()
        proc = self._spawn(name, cmd, self.workdir / "flwr-home" / name)
        self.nodes[name] = proc
        if self.isolation == "process":
            from fedhydra.client.executor import READY

            # Logs are appended to: this executor is ready when its log holds one more READY line.
            self._ready_lines[name] = _count(self.logs / f"{name}-executor.log", READY)
            self.executors[name] = self._spawn(
                f"{name}-executor",
                [sys.executable, "-m", "fedhydra.client.executor", "--runtime-api-address", f"{RUNTIME_HOST}:{port}",
                 "--superexec-auth-secret-file", str(secret), "--parent-pid", str(proc.popen.pid)],
                self.workdir / "flwr-home" / name)  # the SuperNode's home: ClientApps install the FAB there
        return proc

    def _executor_secret(self, name: str) -> Path:
        """A fresh random secret shared by SuperNode `name` and its executor only."""
        path = self.workdir / "secrets" / name
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        return path

    def restart_supernode(self, name: str) -> Proc:
        """Start SuperNode `name` again (same key, state folder and port), with a new executor."""
        state, port, node_config = self.node_state[name]
        return self.start_supernode(name, state, port, node_config=node_config)

    def clientapp_launches(self, name: str) -> int:
        """How many ClientApp processes node `name` has started so far (counted in its logs)."""
        from fedhydra.client.executor import LAUNCHED

        if self.isolation == "process":
            return _count(self.logs / f"{name}-executor.log", LAUNCHED)
        return _count(self.logs / f"{name}.log", "Start `flwr-clientapp` process")

    def online_nodes(self) -> set[str]:
        res = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            nodes = json.loads(res.stdout[res.stdout.index("{"):])["nodes"]
        except (ValueError, KeyError):
            return set()
        return {str(n["node-id"]) for n in nodes if n.get("status") == "online"}

    def wait_online(self, names: list[str], timeout: float = 120) -> None:
        """Wait until every named SuperNode is connected (checked on the SuperLink with node auth,
        from the SuperNodes' logs in --insecure mode, where node ids are not known in advance)
        and, with isolation "process", its executor has imported what ClientApps need."""
        deadline = time.monotonic() + timeout
        while True:
            procs = [(n, self.nodes[n], "SuperNode") for n in names]
            procs += [(n, self.executors[n], "executor of SuperNode") for n in names if n in self.executors]
            dead = [(n, p, what) for n, p, what in procs if not p.alive()]
            if dead:
                n, p, what = dead[0]
                raise DeployError(f"{what} {n} exited ({p.popen.returncode}); log {p.log}:\n{p.tail()}")
            if self.insecure:
                up = {n for n in names if "SuperNode ID:" in self.nodes[n].tail(200)}
            else:
                online = self.online_nodes()
                up = {n for n in names if self.registered.get(n) in online}
            up = {n for n in up if n not in self.executors or self._executor_ready(n)}
            if up >= set(names):
                return
            if time.monotonic() > deadline:
                raise DeployError(f"SuperNodes {sorted(set(names) - up)} did not connect within {timeout:.0f}s")
            time.sleep(2.0)

    def _executor_ready(self, name: str) -> bool:
        from fedhydra.client.executor import READY

        return _count(self.executors[name].log, READY) > self._ready_lines[name]

    # ------------------------------------------------------------ the run
    def run(self, app_dir: str | os.PathLike, run_config: dict | None = None, timeout: float | None = None,
            echo=None, federation_config: dict | None = None) -> dict:
        """`flwr run APP deploy --stream`; returns the run's row from `flwr ls` (status, traffic, times).
        `federation_config`: the simulation's options (num-supernodes, client-resources-num-cpus, ...)."""
        cmd = [_bin("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION, "--stream"]
        if run_config:
            path = self.workdir / "run-config.toml"
            path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()), encoding="utf-8")
            cmd += ["--run-config", str(path)]
        if federation_config:
            cmd += ["--federation-config", " ".join(f"{k}={toml_value(v)}" for k, v in federation_config.items())]
        log_path = self.logs / "flwr-run.log"
        t0 = time.monotonic()
        run_id = None
        with open(log_path, "a", encoding="utf-8") as log:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=self.env(self.cli_home), cwd=str(self.workdir),
                                     start_new_session=True)
            proc = Proc("flwr-run", popen, log_path, {popen.pid})
            with self._lock:
                self._procs.append(proc)
            timer = None
            if timeout:
                timer = threading.Timer(timeout, lambda: proc.stop(grace=3))
                timer.start()
            try:
                for line in popen.stdout:
                    log.write(line)
                    log.flush()
                    m = re.search(r"Successfully started run (\d+)", line)
                    if m:
                        run_id = m.group(1)
                    if echo:
                        echo(line.rstrip("\n"))
                popen.wait()
            finally:
                if timer:
                    timer.cancel()
        wall = time.monotonic() - t0
        if run_id is None:
            raise DeployError(f"flwr run did not start a run (exit {popen.returncode}); log {log_path}")
        info = self.run_info(run_id)
        info["wall-s"] = round(wall, 1)
        status = info.get("status", "")
        if timeout and wall >= timeout and not status.startswith("finished"):
            self.flwr("stop", run_id, CONNECTION)
            raise DeployError(f"run {run_id} did not finish within {timeout:.0f}s (status {status}); "
                              f"logs in {self.logs}")
        return info

    def run_info(self, run_id: str) -> dict:
        for _ in range(20):
            res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
            try:
                runs = json.loads(res.stdout[res.stdout.index("{"):])["runs"]
                row = next(r for r in runs if str(r["run-id"]) == str(run_id))
            except (ValueError, KeyError, StopIteration):
                time.sleep(0.5)
                continue
            if str(row.get("status", "")).startswith("finished"):
                return row
            time.sleep(0.5)
        return {"run-id": str(run_id), "status": "unknown"}

    # ------------------------------------------------------------ teardown
    def stop(self) -> None:
        with self._lock:
            procs, self._procs = list(self._procs), []
        # Executors first (their running ClientApps report to a live SuperNode), then nodes and CLI
        # (a SuperNode deactivates itself on SIGTERM), the SuperLink last.
        def order(p: Proc) -> int:
            return 2 if p is self.superlink else 0 if any(p is e for e in self.executors.values()) else 1

        for proc in sorted(procs, key=order):
            proc.stop()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _count(path: Path, text: str) -> int:
    """Occurrences of `text` in the file at `path` (0 when it does not exist yet)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").count(text)
    except OSError:
        return 0
