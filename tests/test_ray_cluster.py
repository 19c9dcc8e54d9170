"""`fedhydra simulate --ray-address` on an existing two-node Ray cluster, started with Ray's own CLI in two
network namespaces this test makes (a head on 10.A.B.1, a worker on 10.A.B.2): the virtual clients run on
both nodes, and the run finishes.

It takes 1.5 to 2.5 minutes on 2 shared cores (96 s at a load average of about 4; Ray's two nodes ~25 s, the
tiny simulation the rest), which the suite's 15-minute budget does not have room for beside the multi-host
test, so it runs only when asked: FEDHYDRA_TEST_RAY_CLUSTER=1 (and it needs root and `ip netns`).
The Ray processes are ended with the namespaces (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import LLM_UNAVAILABLE
from fedhydra.simulations import netns

WHY_NOT = (netns.unavailable()
           or (None if os.environ.get("FEDHYDRA_TEST_RAY_CLUSTER") == "1" else
               "1.5-2.5 min: run with FEDHYDRA_TEST_RAY_CLUSTER=1"))
pytestmark = [
    pytest.mark.deploy,
    pytest.mark.llm,
    pytest.mark.skipif(bool(LLM_UNAVAILABLE), reason=f"embedded LLM unavailable: {LLM_UNAVAILABLE}"),
    pytest.mark.skipif(bool(WHY_NOT), reason=f"Ray cluster test: {WHY_NOT}"),
]
BIN = Path(sys.executable).parent


@contextlib.contextmanager
def _removed(folder: str):
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_simulate_on_an_existing_two_node_ray_cluster(tmp_path):
    env = dict(os.environ, RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    ray_tmp = tempfile.mkdtemp(prefix="fhray", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    with netns.Hosts(devices=1) as hosts, _removed(ray_tmp):  # every Ray process is killed with the namespaces
        head = f"{hosts.server_ip}:6390"
        ray = lambda ns, *args: subprocess.run(hosts.cmd(ns, [str(BIN / "ray"), *args]), capture_output=True,  # noqa: E731
                                               text=True, env=env, timeout=120)
        started = ray(hosts.server, "start", "--head", "--node-ip-address", hosts.server_ip, "--port", "6390",
                      "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats",
                      "--temp-dir", ray_tmp)
        assert started.returncode == 0, started.stderr
        joined = ray(hosts.devices[0], "start", "--address", head, "--node-ip-address", hosts.device_ips[0],
                     "--num-cpus", "1", "--disable-usage-stats")
        assert joined.returncode == 0, joined.stderr
        for _ in range(30):  # the worker shows up in the cluster's status within seconds
            status = ray(hosts.server, "status", "--address", head).stdout
            if "0.0/2.0 CPU" in status:  # two nodes of one CPU each
                break
            time.sleep(1.0)
        assert "0.0/2.0 CPU" in status, status

        out = tmp_path / "out"
        res = subprocess.run(hosts.cmd(hosts.server, [str(BIN / "fedhydra"), "simulate", "--out", str(out),
                                                      "--clients", "2", "--test-clients", "1", "--rounds", "1",
                                                      "--pseudo-queries", "1", "--retrieve", "2", "--k", "1",
                                                      "--candidates", "2", "--train-layers", "1", "--methods",
                                                      "hydra-fed", "--ray-address", head]),
                             capture_output=True, text=True, env=env, timeout=420)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        log = res.stdout + res.stderr
        # Ray tags what an actor on another node prints with that node's address: clients ran on the worker.
        assert f"ip={hosts.device_ips[0]}" in log, log[-3000:]
        doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
        assert "hydra-fed" in json.dumps(doc)
