"""The warm ClientApp executor (client/executor.py) without a Flower deployment or the LLM:
it accepts only a loopback Runtime API, forks Flower's ClientApp runtime per ClientApp task and
stops those children, and it exits (with its children) when its SuperNode is gone.
The full path, SuperLink to ClientApp and back, is tests/test_deploy.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from fedhydra.client.executor import READY, ForkExecutor, loopback_address
from fedhydra.simulations.processes import _proc_table, _tree, free_port


def _spec(task_type=TaskType.CLIENT_APP, port: int | None = None) -> ExecutionSpec:
    return ExecutionSpec(task_type=task_type, runtime_api_address=f"127.0.0.1:{port or free_port()}",
                         token="not-a-real-token", insecure=True, root_certificates_path=None,
                         runtime_dependency_install=False, parent_pid=os.getpid(), suppress_output=False, task_id=7)


def test_runtime_api_must_be_on_loopback():
    for ok in ("127.0.0.1:9094", "[::1]:9094", "localhost:9094"):
        assert loopback_address(ok) == ok
    for bad in ("0.0.0.0:9094", "10.1.2.3:9094", "example.org:9094", "127.0.0.1", "127.0.0.1:port"):
        with pytest.raises(ValueError, match="loopback"):
            loopback_address(bad)


def test_fork_executor_runs_client_apps_only_and_stops_them():
    executor = ForkExecutor()
    assert executor.get_eligible_capacity({TaskType.CLIENT_APP, TaskType.SERVER_APP}) == ({TaskType.CLIENT_APP}, set())
    refused = executor.launch(_spec(TaskType.SERVER_APP))
    assert refused.status == LaunchResultStatus.FAILED and not executor.children
    # Nothing listens on the port: the forked child is Flower's run_clientapp retrying to connect.
    assert executor.launch(_spec()).status == LaunchResultStatus.ACCEPTED
    (pid,) = executor.children
    time.sleep(1.0)
    executor.reconcile()
    assert pid in executor.children and pid in _proc_table()  # still running, not reaped
    executor.close(grace=10)
    assert not executor.children and pid not in _proc_table()


def test_executor_exits_with_its_supernode(tmp_path):
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # stands in for it
    log = tmp_path / "executor.log"
    with open(log, "wb") as out:
        executor = subprocess.Popen([sys.executable, "-m", "fedhydra.client.executor", "--runtime-api-address",
                                     f"127.0.0.1:{free_port()}", "--parent-pid", str(supernode.pid)],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0",
                                         "FLWR_DISABLE_UPDATE_CHECK": "1"})
    try:
        deadline = time.monotonic() + 120  # it imports torch and transformers first
        while READY not in log.read_text(errors="replace"):
            assert executor.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "executor never got ready"
            time.sleep(0.2)
        tree = _tree({executor.pid}, set())
        supernode.kill()
        supernode.wait()
        executor.wait(timeout=30)
        assert not set(tree) & set(_proc_table())
    finally:
        for proc in (supernode, executor):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
