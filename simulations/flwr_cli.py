"""The `flwr` CLI on the server machine, pointed at the SuperLink's Control API on 127.0.0.1 (its connection in
CLI_HOME/config.toml, verified against the deployment's CA): enrolment, node status, run submission.
Devices never use it: the public front refuses every Control API path."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

from fedhydra.common.settings import toml_value

from .processes import DeployError, Launcher, Proc, _bin, flwr_env

CONNECTION = "deploy"


class ServerCLI:
    """`flwr` with FLWR_HOME=`cli_home`, run in `workdir`; long-running `flwr run`s are started by `launcher`."""

    def __init__(self, cli_home: Path, workdir: Path, launcher: Launcher | None = None):
        self.cli_home, self.workdir = cli_home, workdir
        self.launcher = launcher or Launcher(workdir, workdir / "logs")

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=flwr_env(self.cli_home), cwd=str(self.workdir), timeout=timeout)

    def enroll(self, public_key: str | os.PathLike, name: str) -> str:
        """Register a device's public key (OpenSSH) under `name`; returns its node id."""
        res = self.flwr("supernode", "register", str(public_key), CONNECTION, "--name", name, "--format", "json")
        try:
            return str(json.loads(res.stdout[res.stdout.index("{"):])["node-id"])
        except (ValueError, KeyError) as exc:
            raise DeployError(f"enrolling {name} ({public_key}) failed: {res.stdout.strip()} "
                              f"{res.stderr.strip()}") from exc

    def node_list(self) -> list[dict]:
        """`flwr supernode ls`: every enrolled node (node-id, owner name, status, ...); [] when it fails."""
        res = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            return list(json.loads(res.stdout[res.stdout.index("{"):])["nodes"])
        except (ValueError, KeyError, TypeError):
            return []

    def online_nodes(self) -> set[str]:
        return {str(n["node-id"]) for n in self.node_list() if n.get("status") == "online"}

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
        log_path = self.launcher.logs / "flwr-run.log"
        t0 = time.monotonic()
        run_id = None
        with open(log_path, "a", encoding="utf-8") as log:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=flwr_env(self.cli_home), cwd=str(self.workdir),
                                     start_new_session=True)
            proc = self.launcher.adopt(Proc("flwr-run", popen, log_path, {popen.pid}))
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
                              f"logs in {self.launcher.logs}")
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

