"""`fedhydra deploy`: a real Flower deployment (SuperLink + N SuperNodes) on 127.0.0.1.

What runs where (all on this machine, each process with its own FLWR_HOME):

    flower-superlink      the server: Fleet, Control and Runtime APIs (HTTPS) on one port; it
                          starts the ServerApp (fedhydra.server.server_app:app) for the run
    flower-supernode x N  one per client, each with its own --port, its own private state folder
                          (node config `state="DIR"`) and its own authentication key; it starts a
                          ClientApp process (fedhydra.client.client_app:app) per message
    flwr run APP deploy   the CLI: packages APP (a minimal folder written here: pyproject.toml with
                          the components and the run config, no code) as a FAB and submits it

Security: TLS with a private CA that this module generates (server/certs.py) unless `--certs DIR`
already holds one; SuperNode authentication is on, so the SuperLink lets in only the SuperNodes
whose public keys were registered (`flwr supernode register`) before they start. `--insecure`
turns both off and is for quick local experiments only.

Every process started here is stopped when the command ends: normally, on an error, on Ctrl-C
or SIGTERM (each child runs in its own session; its whole process tree is terminated, then killed).
Flower never installs dependencies at run time, sends telemetry or checks for updates.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVERAPP = "fedhydra.server.server_app:app"
CLIENTAPP = "fedhydra.client.client_app:app"
CONNECTION = "deploy"
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and where its log is."""


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


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


# ---------------------------------------------------------------- process trees
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


# ---------------------------------------------------------------- the deployment
class Deployment:
    """A SuperLink and SuperNodes on loopback, and the `flwr` CLI pointed at them.

    Use as a context manager: leaving it stops every process it started.
    """

    def __init__(self, workdir: str | os.PathLike, certs: str | os.PathLike | None = None,
                 insecure: bool = False, host: str = "127.0.0.1", port: int | None = None,
                 log=print):
        self.workdir = Path(workdir).expanduser().resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.insecure = insecure
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
        self.node_state: dict[str, tuple[Path, int]] = {}
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
        lines += [f"{k} = {_toml_value(v)}" for k, v in conn.items()]
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
               "--disable-runtime-dependency-installation"]
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
                self.log(f"SuperLink up on {self.address} ({'insecure' if self.insecure else 'TLS, node auth on'})")
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
        self.node_state[name] = (state, port)
        config = {"state": str(state), **(node_config or {})}
        cmd = [_bin("flower-supernode"), "--superlink", self.address, "--port", str(port),
               "--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())]
        if self.insecure:
            cmd.append("--insecure")
        else:
            if register:
                self.register(name)
            cmd += ["--root-certificates", str(self.server_certs.ca_cert)]
            if auth_key:
                cmd += ["--auth-supernode-private-key", str(self.node_key(name).private)]
        proc = self._spawn(name, cmd, self.workdir / "flwr-home" / name)
        self.nodes[name] = proc
        return proc

    def restart_supernode(self, name: str) -> Proc:
        state, port = self.node_state[name]
        return self.start_supernode(name, state, port)

    def online_nodes(self) -> set[str]:
        res = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            nodes = json.loads(res.stdout[res.stdout.index("{"):])["nodes"]
        except (ValueError, KeyError):
            return set()
        return {str(n["node-id"]) for n in nodes if n.get("status") == "online"}

    def wait_online(self, names: list[str], timeout: float = 120) -> None:
        """Wait until every named SuperNode is connected (checked on the SuperLink with node auth,
        from the SuperNodes' logs in --insecure mode, where node ids are not known in advance)."""
        deadline = time.monotonic() + timeout
        while True:
            dead = [n for n in names if not self.nodes[n].alive()]
            if dead:
                p = self.nodes[dead[0]]
                raise DeployError(f"SuperNode {dead[0]} exited ({p.popen.returncode}); log {p.log}:\n{p.tail()}")
            if self.insecure:
                up = {n for n in names if "SuperNode ID:" in self.nodes[n].tail(200)}
            else:
                online = self.online_nodes()
                up = {n for n in names if self.registered.get(n) in online}
            if up >= set(names):
                return
            if time.monotonic() > deadline:
                raise DeployError(f"SuperNodes {sorted(set(names) - up)} did not connect within {timeout:.0f}s")
            time.sleep(2.0)

    # ------------------------------------------------------------ the run
    def run(self, app_dir: str | os.PathLike, run_config: dict | None = None, timeout: float | None = None,
            echo=None) -> dict:
        """`flwr run APP deploy --stream`; returns the run's row from `flwr ls` (status, traffic, times)."""
        cmd = [_bin("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION, "--stream"]
        if run_config:
            path = self.workdir / "run-config.toml"
            path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()), encoding="utf-8")
            cmd += ["--run-config", str(path)]
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
        # Nodes and CLI first (a SuperNode deactivates itself on SIGTERM), the SuperLink last.
        for proc in sorted(procs, key=lambda p: p is self.superlink):
            proc.stop()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def write_app(folder: str | os.PathLike, config: dict, name: str = "fedhydra-deploy") -> Path:
    """A minimal Flower app folder: pyproject.toml only, pointing at the installed FedHydra apps.

    `flwr run` packages it as a FAB (just this file); the SuperLink and SuperNodes import the apps from
    the environment they run in, where FedHydra is installed (runtime installation is disabled).
    Every key of `config` becomes a `[tool.flwr.app.config]` default, so `--run-config` may override it.
    """
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Written by `fedhydra deploy`: the FedHydra Flower app, packaged by `flwr run` as a FAB.",
        "[build-system]", 'requires = ["setuptools>=68"]', 'build-backend = "setuptools.build_meta"', "",
        "[project]", f'name = "{name}"', 'version = "0.1.0"',
        'description = "FedHydra: federated HYDRA personalization of a black-box LLM"',
        "dependencies = []  # installed beforehand; Flower's runtime installation is disabled", "",
        "[tool.flwr.app]", 'publisher = "fedhydra"', "",
        "[tool.flwr.app.components]", f'serverapp = "{SERVERAPP}"', f'clientapp = "{CLIENTAPP}"', "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{k} = {_toml_value(v)}" for k, v in config.items()]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def server_defaults() -> dict:
    """The ServerApp's run-config keys with their defaults (every key must exist in the app's pyproject)."""
    try:
        from .settings import DEFAULTS
    except ImportError:  # pragma: no cover
        DEFAULTS = {}
    return dict(DEFAULTS)


# ---------------------------------------------------------------- the command
def _parse_kv(items: list[str]) -> dict:
    import tomllib

    out = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--run-config {item!r}: expected KEY=VALUE")
        key, _, raw = item.partition("=")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw  # a bare string
    return out


def prepare_states(args, root: Path):
    """Client state folders from --data (or synthetic data): --clients train + --test-clients test clients."""
    from fedhydra.common.data import load_split, split_users
    from fedhydra.simulations.partition import prepare_clients

    if args.data:
        split = load_split(args.data)
        if args.task and args.task != split.task.name:
            raise ValueError(f"--task {args.task} but {args.data} is {split.task.name}")
    else:
        from fedhydra.common.synthetic import make_synthetic

        n = (args.clients + args.test_clients) * args.users_per_client
        split = make_synthetic(args.task or "LaMP_2M", n_users=n, seed=args.seed)
    k = args.users_per_client
    train, test = split_users(split.users, args.clients * k, args.test_clients * k, args.seed)
    return split.task, prepare_clients(root, split.task, train, test, users_per_client=k, by=args.partition,
                                       seed=args.seed)


def deploy_command(args: argparse.Namespace) -> dict:
    """Everything `fedhydra deploy` does; see its --help."""
    t0 = time.monotonic()
    out = Path(args.out).expanduser().resolve()
    workdir = Path(args.workdir).expanduser().resolve() if args.workdir else out / "deploy"
    if args.clients < 1:
        raise ValueError("--clients must be at least 1")
    task, specs = prepare_states(args, Path(args.state_root).resolve() if args.state_root else workdir / "clients")
    print(f"{len(specs)} clients ({args.clients} train, {args.test_clients} test) for {task.name}; "
          f"state folders under {specs[0].state.parent}", flush=True)

    config = server_defaults()
    chosen = {"task": task.name, "rounds": args.rounds, "min-nodes": len(specs), "out": str(out),
              "seed": args.seed, "preset": args.preset, "llm": args.llm,
              "llm-base-url": args.llm_base_url or "", "llm-model": args.llm_model or "",
              "round-timeout": args.round_timeout, "resume": args.resume}
    for opt in ("pseudo_queries", "retrieve", "k", "candidates", "local_epochs"):
        value = getattr(args, opt, None)
        if value is not None:
            chosen[opt.replace("_", "-")] = value
    config.update({k: v for k, v in chosen.items() if v is not None and (not config or k in config)})
    config.update(_parse_kv(args.run_config))
    app = write_app(workdir / "app", config)

    names = [f"node-{s.index}" for s in specs]
    deployment = Deployment(workdir, certs=args.certs, insecure=args.insecure, port=args.port)
    previous = signal.getsignal(signal.SIGTERM)

    def _on_term(signum, frame):  # make `finally` run on SIGTERM as on Ctrl-C
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _on_term)
    except ValueError:  # not the main thread: the caller handles signals
        previous = None
    try:
        with deployment:
            if args.insecure:
                print("WARNING: --insecure: no TLS and no SuperNode authentication; for local experiments only",
                      flush=True)
            else:
                print(f"certificates and node keys in {deployment.certs_dir}", flush=True)
            deployment.start_superlink()
            threads = {"threads": args.node_threads, "llm-threads": args.node_threads}
            for name, spec in zip(names, specs):
                deployment.start_supernode(name, spec.state, node_config=threads)
                print(f"SuperNode {name} ({spec.role}, users {', '.join(spec.user_ids)}) -> {spec.state}",
                      flush=True)
            deployment.wait_online(names)
            print(f"{len(names)} SuperNodes online; flwr run {app} {CONNECTION} --stream", flush=True)
            echo = (lambda line: print(line, flush=True)) if not args.quiet else None
            info = deployment.run(app, timeout=args.timeout, echo=echo)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    status = info.get("status", "unknown")
    summary = {"run-id": info.get("run-id"), "status": status, "wall-s": round(time.monotonic() - t0, 1),
               "run-wall-s": info.get("wall-s"), "network-traffic": info.get("network-traffic"),
               "out": str(out), "logs": str(deployment.logs)}
    (workdir / "deploy.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"run {summary['run-id']}: {status} in {summary['run-wall-s']} s; results in {out}; "
          f"logs in {deployment.logs}", flush=True)
    if status != "finished:completed":
        raise DeployError(f"run {summary['run-id']} ended with status {status}; "
                          f"see {deployment.logs / 'flwr-run.log'} and {deployment.logs}")
    return summary


def add_deploy_command(sub) -> None:
    """Register `fedhydra deploy` on the CLI's subparsers."""
    from fedhydra.common.cli import add_llm_options
    from fedhydra.common.tasks import TASKS

    p = sub.add_parser(
        "deploy", help="run FedHydra on a real Flower deployment (SuperLink + SuperNodes) on 127.0.0.1",
        description="Starts a SuperLink and one SuperNode per client on 127.0.0.1 (TLS with a generated CA, "
                    "SuperNode authentication: only registered nodes join), each SuperNode with its own "
                    "private state folder, runs the FedHydra app with `flwr run`, and stops every process "
                    "it started when done, on errors and on Ctrl-C.")
    p.add_argument("--task", choices=sorted(TASKS), default=None,
                   help="task (default: the data's; LaMP_2M for synthetic data)")
    p.add_argument("--data", default=None, help="a LaMP split folder (default: synthetic data)")
    p.add_argument("--clients", type=int, default=2, help="train clients = SuperNodes holding train users (default 2)")
    p.add_argument("--test-clients", type=int, default=1, help="SuperNodes holding unseen test users (default 1)")
    p.add_argument("--users-per-client", type=int, default=1)
    p.add_argument("--partition", default="id", choices=("id", "profile-size"), help="how users are grouped")
    p.add_argument("--rounds", type=int, default=3, help="FedAvg rounds per module (default 3)")
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument("--preset", default="cpu", choices=("paper", "cpu"))
    p.add_argument("--pseudo-queries", type=int, default=None)
    p.add_argument("--retrieve", type=int, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--candidates", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/deploy", help="server-side results folder (default runs/deploy)")
    p.add_argument("--resume", action="store_true", help="resume from the checkpoint in --out")
    p.add_argument("--round-timeout", type=float, default=None,
                   help="seconds a round waits for replies; nodes that miss it are left out of that round")
    p.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE",
                   help="any other run config key of the ServerApp (TOML value), repeatable")
    g = p.add_argument_group("deployment")
    g.add_argument("--workdir", default=None,
                   help="folder for certificates, Flower homes, logs, the app and client states (default OUT/deploy)")
    g.add_argument("--state-root", default=None, help="client state folders (default WORKDIR/clients)")
    g.add_argument("--certs", default=None,
                   help="folder with ca.crt, server.pem, server.key and nodes/ keys to reuse (created when missing; "
                        "default WORKDIR/certs)")
    g.add_argument("--port", type=int, default=None, help="SuperLink port (default: a free one)")
    g.add_argument("--timeout", type=float, default=None, help="give up (and stop the run) after this many seconds")
    g.add_argument("--insecure", action="store_true",
                   help="no TLS, no SuperNode authentication: quick local runs only, never for real use")
    g.add_argument("--node-threads", type=int, default=1,
                   help="torch and LLM threads of each SuperNode's ClientApp (default 1)")
    g.add_argument("--quiet", action="store_true", help="do not stream the run's logs")
    add_llm_options(p)
    p.set_defaults(func=_cmd_deploy)


def _cmd_deploy(args) -> None:
    try:
        deploy_command(args)
    except DeployError as exc:
        raise ValueError(str(exc)) from exc  # the CLI prints it as one error line
