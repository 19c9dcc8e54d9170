"""Deployment end to end on loopback: real `flower-superlink` / `flower-supernode` processes with TLS
and SuperNode authentication, running the real FedHydra ServerApp and ClientApp on tiny synthetic data.

1. `fedhydra deploy` (the command): SuperLink + 2 SuperNodes with TLS complete 2 rounds, with the
   default ClientApp isolation ("process": a warm FedHydra executor per SuperNode).
2. A SuperNode whose key was not registered (or that has no key) is refused by the SuperLink.
3. A SuperNode killed mid-round does not stop the run: that round completes with the other node,
   its executor (and the ClientApp it was running) follows it down, the killed node is restarted
   with a new executor (same key, same state folder) and is back for the next round, as in
   Flower's own e2e test_reconnection.

Select with `pytest -m deploy`; each test is a few minutes of CPU-bound ClientApp work on 2 cores.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import LLM_UNAVAILABLE

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.llm,
    pytest.mark.skipif(bool(LLM_UNAVAILABLE), reason=f"embedded LLM unavailable: {LLM_UNAVAILABLE}"),
]

# The smallest HYDRA that still trains both modules: 1 pseudo-query per user, M=2, k=1, B=2,
# one trainable encoder layer; rounds=1 per module = 2 FedAvg rounds (reranker, then adapter).
TINY = ["--rounds", "1", "--pseudo-queries", "1", "--retrieve", "2", "--k", "1", "--candidates", "2",
        "--train-layers", "1"]
TINY_CONFIG = {"rounds": 1, "pseudo-queries": 1, "retrieve": 2, "k": 1, "candidates": 2, "train-layers": 1}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One CA + node keys and one set of client state folders for the whole module (labels and LLM
    answers cached in the state folders make the later runs cheaper)."""
    root = tmp_path_factory.mktemp("deploy")
    return {"root": root, "certs": root / "certs", "states": root / "clients"}


def _processes_naming(*paths: Path, grace: float = 20.0) -> list[str]:
    """Command lines of live processes that name any of `paths`, after up to `grace` s for them to exit (Flower's
    superexec children exit a few seconds after their parent)."""
    needles = [str(p) for p in paths]
    deadline = time.monotonic() + grace
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (proc / "stat").read_text().split(")")[-1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z" and proc.name.isdigit() and int(proc.name) != os.getpid() and any(n in cmd for n in needles):
                found.append(cmd)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _rounds(out: Path) -> list[dict]:
    doc = json.loads((out / "federated.json").read_text(encoding="utf-8"))
    return doc["rounds"]


def test_deploy_command_tls_two_nodes_two_rounds(shared):
    out, work = shared["root"] / "out-cli", shared["root"] / "work-cli"
    cmd = [sys.executable, "-m", "fedhydra.cli.main", "deploy", "--clients", "2", "--test-clients", "0",
           *TINY, "--out", str(out), "--workdir", str(work), "--certs", str(shared["certs"]),
           "--state-root", str(shared["states"]), "--timeout", "420", "--quiet"]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=480, stdin=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert "TLS, node auth on" in res.stdout and "ClientApp isolation: process" in res.stdout
    summary = json.loads((work / "deploy.json").read_text(encoding="utf-8"))
    assert summary["status"] == "finished:completed"
    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [1, 2] and [r["module"] for r in rounds] == ["reranker", "adapter"]
    for r in rounds:
        assert r["clients"] == 2 and len(r["bytes"]) == 2, r
        assert all(b["up"] > 0 and b["down"] > 0 for b in r["bytes"].values())
    # Every process the command started is gone: none names its workdir, certificates or state folders.
    assert _processes_naming(work, shared["certs"], shared["states"]) == []
    logs = work / "logs"
    assert (logs / "superlink.log").is_file() and (logs / "node-0.log").is_file()
    assert "Forked ClientApp process" in (logs / "node-0-executor.log").read_text(encoding="utf-8")
    print(f"\nfedhydra deploy, 2 SuperNodes, 2 rounds: {wall:.0f} s wall, run {summary['run-wall-s']} s, "
          f"round seconds {[r['seconds'] for r in rounds]}")


@pytest.fixture(scope="module")
def link(shared):
    """A TLS SuperLink with SuperNode authentication, shared by the remaining tests."""
    from fedhydra.simulations.deployment import Deployment

    dep = Deployment(shared["root"] / "work-link", certs=shared["certs"], log=lambda *_: None)
    try:
        dep.start_superlink()
        yield dep
    finally:
        dep.stop()


def test_superlink_speaks_only_tls(link):
    ctx = ssl.create_default_context(cafile=str(link.server_certs.ca_cert))
    with socket.create_connection((link.host, link.port), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            assert tls.version().startswith("TLS")
    with socket.create_connection((link.host, link.port), timeout=10) as sock:  # plain HTTP gets no HTTP answer
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.settimeout(10)
        try:
            answer = sock.recv(100)
        except (ConnectionResetError, socket.timeout):
            answer = b""
        assert not answer.startswith(b"HTTP/")


def test_unregistered_supernodes_are_refused(link, shared, tmp_path):
    state = tmp_path / "intruder-state"
    state.mkdir()
    # A key the SuperLink never saw, and no key at all (a SuperNode may not register itself).
    unregistered = link.start_supernode("intruder", state, register=False)
    keyless = link.start_supernode("keyless", state, register=False, auth_key=False)
    for proc in (unregistered, keyless):
        proc.popen.wait(timeout=90)
        assert proc.popen.returncode != 0, proc.tail()
        log = proc.tail(40)  # Flower's exit code 305: SUPERNODE_CONNECTION_ERROR (the process exits with 1)
        assert "Exit Code: 305" in log and "Failed to initialize the connection to the SuperLink" in log, log
    assert "Failed to activate SuperNode" in unregistered.tail(40)
    assert "[code: 2001]" in keyless.tail(40) and "must be registered" in keyless.tail(40)
    # Registered nodes only: the SuperLink lists none of them.
    res = link.flwr("supernode", "ls", "deploy", "--format", "json")
    listed = json.loads(res.stdout[res.stdout.index("{"):])["nodes"]
    assert {str(n["node-id"]) for n in listed} <= set(link.registered.values())


def _alive(pids: dict[int, str]) -> set[int]:
    """The processes of `pids` (pid -> start time) that still run."""
    from fedhydra.simulations.processes import _proc_table

    table = _proc_table()
    return {pid for pid, start in pids.items() if pid in table and table[pid][2] == start}


def test_supernode_killed_mid_round_does_not_stop_the_run(link, shared, tmp_path):
    from fedhydra.common import settings
    from fedhydra.simulations.app_folder import write_app
    from fedhydra.simulations.processes import _tree

    # The partitions `fedhydra deploy --clients 2 --test-clients 0 --seed 0` used above, in fresh state folders
    # (each ClientApp makes its own from its partition): with no cached labels or LLM answers, node-1's round-1
    # ClientApp spends seconds on LLM calls, so the kill below lands inside the round.
    names = []
    for i in range(2):
        name = f"node-{i}"
        link.start_supernode(name, tmp_path / "clients" / f"client-{i}", node_config={"partition-id": i,
                                                                                 "num-partitions": 2})
        names.append(name)
    link.wait_online(names)

    out = tmp_path / "out"
    values = settings.resolve(TINY_CONFIG, {"task": "LaMP_2M", "clients": 2, "test-clients": 0, "min-nodes": 2,
                                            "out": str(out), "round-timeout": 300.0})
    app = write_app(tmp_path / "app", values)
    victim, victim_executor = link.nodes["node-1"], link.executors["node-1"]
    seen = link.clientapp_launches("node-1")

    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(link.run(app, timeout=420)), daemon=True)
    runner.start()
    # The node's first ClientApp of this run is the "which users" query, its second the round-1 training.
    deadline = time.monotonic() + 240
    while link.clientapp_launches("node-1") < seen + 2:
        assert time.monotonic() < deadline, "round 1 never reached node-1"
        assert runner.is_alive(), result
        time.sleep(0.2)
    time.sleep(0.5)  # inside the round: node-1's ClientApp (forked a moment ago) is training
    executor_tree = _tree({victim_executor.popen.pid}, set())
    assert len(executor_tree) >= 2, executor_tree  # the executor and the ClientApp it forked
    victim.stop()  # SIGTERM to the SuperNode and its whole process tree
    assert not victim.alive()
    victim_executor.popen.wait(timeout=30)  # the executor and its ClientApp follow their SuperNode
    assert not _alive(executor_tree), _alive(executor_tree)
    link.restart_supernode("node-1")  # same key, same state folder, same port, a new executor
    runner.join(timeout=480)
    assert not runner.is_alive(), "run did not finish"
    assert result.get("status") == "finished:completed", result
    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["clients"] == 1, rounds[0]  # round 1 completed with the node that stayed
    # Round 2 runs with whoever is online when it is sent: the restarted node-1 when its first heartbeat
    # is in by then, else node-0 alone (the issue asks for either). Under load the heartbeat can be late.
    assert 1 <= rounds[1]["clients"] <= 2, rounds[1]
    deadline = time.monotonic() + 90  # the killed node reconnects under its registered id
    while link.registered["node-1"] not in link.online_nodes():
        assert time.monotonic() < deadline, "node-1 did not reconnect"
        time.sleep(2.0)
    print(f"\nkill mid-round: run {result.get('wall-s')} s, round seconds {[r['seconds'] for r in rounds]}")
