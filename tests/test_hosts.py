"""A server and two devices on separate hosts: Linux network namespaces this test makes and removes.

    server namespace    `fedhydra server start`: the SuperLink on its own 127.0.0.1, the Fleet API front on
                        10.A.B.1:9092 (TLS, SuperNode authentication); enrolment and `fedhydra server run` here
    device namespaces   `fedhydra node keygen` + `fedhydra node start`: each device has its own key pair, its own
                        LaMP files (one synthetic user each, different users), its own state folder; it gets only
                        the server's ca.crt

All through the commands a person types (simulations/fleet_harness.py). Asserted:
- from a device's namespace the Fleet API answers through the front; every Control and Runtime API route of
  flwr 1.41's SuperLink (and tricks: dot segments, percent-escapes, a query string, other methods) is
  refused by the front; the server's SuperLink port cannot be reached, on its LAN address or on loopback;
- a device whose key was never enrolled is refused and says so, and so is a removed one (`fedhydra server remove`);
- a tiny federated run (2 rounds: reranker, adapter) finishes; device 1 is stopped inside round 1 (its
  ClientApp training), round 1 completes with device 0, device 1 is restarted with its key and state folder
  only, comes back under its enrolled node id, and takes part in round 2;
- each device's state folder holds its own user's heads (and not the other device's);
- after the run, device 0's on-device gRPC service answers a query from its own state, with the server gone.

Traffic goes only to the addresses of the namespaces made here; they are removed, with every process in them,
even when the test fails. Needs root and `ip netns` (skipped with the reason otherwise).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import LLM_UNAVAILABLE
from fedhydra.simulations import netns

NETNS_UNAVAILABLE = netns.unavailable()
pytestmark = [
    pytest.mark.deploy,
    pytest.mark.llm,
    pytest.mark.skipif(bool(LLM_UNAVAILABLE), reason=f"embedded LLM unavailable: {LLM_UNAVAILABLE}"),
    pytest.mark.skipif(bool(NETNS_UNAVAILABLE), reason=f"no network namespaces: {NETNS_UNAVAILABLE}"),
]

TINY = ["--rounds", "1", "--pseudo-queries", "1", "--retrieve", "2", "--k", "1", "--candidates", "2",
        "--train-layers", "1"]
PROBE = Path(__file__).with_name("fleet_probe.py")


def superlink_routes() -> list[tuple[str, str]]:
    """Every (method, path) flwr 1.41's SuperLink app serves, from its own OpenAPI description."""
    import flwr.superlink.main as superlink

    paths = superlink.create_app().openapi()["paths"]
    return sorted((method.upper(), path) for path, ops in paths.items() for method in ops)


def probe(fleet, device: int, routes, closed) -> dict:
    spec = {"front": f"{fleet.public_host}:{fleet.public_port}", "ca": str(fleet.device_dir(device) / "ca.crt"),
            "routes": [list(r) for r in routes], "closed": [list(c) for c in closed]}
    res = subprocess.run(fleet.argv(device, [sys.executable, str(PROBE), json.dumps(spec)]), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def head_keys(state: Path) -> dict[str, set[str]]:
    """module -> the heads saved in a state folder (user heads are "u_<id>", the shared default "__default__")."""
    from safetensors import safe_open

    heads = {}
    for module in ("reranker", "adapter"):
        with safe_open(str(state / "models" / f"{module}.safetensors"), "pt") as f:
            heads[module] = {k.split("/")[1] for k in f.keys() if k.startswith("head/")}
    return heads


def test_server_and_two_devices_on_separate_hosts(tmp_path):
    from fedhydra.common.synthetic import _LAMP_NAME, make_synthetic
    from fedhydra.simulations.fleet_front import REFUSED
    from fedhydra.simulations.fleet_harness import Fleet, wait_for

    t0 = time.monotonic()
    routes = superlink_routes()
    fleet_routes = [r for r in routes if r[1].startswith("/v1/fleet/")]
    other_routes = [r for r in routes if not r[1].startswith("/v1/fleet/")]
    assert len(fleet_routes) >= 10 and sum(p.startswith("/v1/control/") for _, p in other_routes) >= 30
    users = make_synthetic("LaMP_2M", n_users=2, seed=0).users  # one user per device, never the same one

    with netns.Hosts(devices=2) as hosts:
        fleet = Fleet(tmp_path, devices=2, hosts=hosts)
        try:
            fleet.start_server()
            superlink = fleet.server_info()["superlink"]
            port = int(superlink.rsplit(":", 1)[1])
            assert superlink.startswith("127.0.0.1:")
            ids = [fleet.prepare_device(i, [users[i]], _LAMP_NAME["LaMP_2M"]) for i in range(2)]
            devices = [fleet.start_device(i) for i in range(2)]

            # What a device can reach on the server (while the devices connect).
            tricks = [("POST", "/v1/fleet/../control/list-runs"), ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
                      ("POST", "/v1/fleet//../control/list-runs"), ("POST", "/v1/fleet/get-run?x=/v1/control"),
                      ("POST", "/v1/fleet%2fget-run"), ("GET", "/v1/fleet/get-run"), ("POST", "/docs"),
                      ("POST", "/V1/control/list-runs"), ("POST", "//v1/control/list-runs")]
            seen = probe(fleet, 0, [("POST", "/v1/fleet/get-run"), *other_routes, *tricks],
                         [(hosts.server_ip, port), ("127.0.0.1", port)])
            fleet_answer = seen["routes"].pop("POST /v1/fleet/get-run")
            assert REFUSED not in fleet_answer[1] and fleet_answer[0] != 403, fleet_answer  # the SuperLink's answer
            let_through = {r: a for r, a in seen["routes"].items()
                           if a[0] != 403 or (REFUSED not in a[1] and not r.startswith("HEAD "))}  # HEAD: no body
            assert not let_through, f"the front let these through: {let_through}"
            assert all(v.startswith("refused") for v in seen["closed"].values()), seen["closed"]

            # A key the server never enrolled is refused.
            fleet.call(1, "node", "keygen", str(tmp_path / "intruder-key"))
            intruder = fleet.start(1, "intruder", "node", "start", "--superlink",
                                   f"{fleet.public_host}:{fleet.public_port}", "--ca",
                                   str(fleet.device_dir(1) / "ca.crt"), "--key", str(tmp_path / "intruder-key"),
                                   "--data", str(fleet.device_dir(1) / "data"), "--state", str(tmp_path / "i-state"),
                                   "--workdir", str(tmp_path / "i-work"), "--name", "intruder")
            assert intruder.popen.wait(timeout=120) != 0
            assert "refused this device" in intruder.log.read_text(encoding="utf-8"), intruder.tail(30)

            assert [fleet.wait_connected(d) for d in devices] == ids
            out = tmp_path / "out"
            run = fleet.start("server", "run", "server", "run", "--home", str(fleet.server_home), "--out", str(out),
                              "--clients", "2", "--test-clients", "0", "--min-nodes", "2", "--round-timeout", "300",
                              "--node-wait", "120", "--timeout", "420", *TINY)
            # Device 1's first ClientApp answers "describe", its second trains round 1: stop it in there.
            deadline = time.monotonic() + 240
            while fleet.clientapp_launches(1) < 2:
                assert time.monotonic() < deadline and run.alive(), run.tail(30)
                time.sleep(0.2)
            time.sleep(0.5)
            devices[1].stop()
            restarted = fleet.start_device(1, name="device-1-restarted")  # key + state folder only: no --data
            # The same node id as enrolled. (If a heartbeat of the stopped session reached the SuperLink after its
            # deactivation, flwr 1.41 counts it online until 2 heartbeats (60 s) are missed; the device retries.)
            assert fleet.wait_connected(restarted, timeout=240) == ids[1]

            assert run.popen.wait(timeout=480) == 0, run.tail(40)
            doc = json.loads((out / "federated.json").read_text(encoding="utf-8"))
            rounds = doc["rounds"]
            assert [r["round"] for r in rounds] == [1, 2] and doc["status"] == "done"
            assert set(rounds[0]["bytes"]) == {ids[0]}, rounds[0]  # round 1 finished without device 1
            assert set(rounds[1]["bytes"]) == set(ids), rounds[1]  # device 1 is back for round 2

            from fedhydra.common.heads import head_key

            heads = [head_keys(fleet.device_dir(i) / "state") for i in range(2)]
            for i in range(2):  # each device's state holds its own user's heads, never the other's
                own = {head_key(users[i].id), "__default__"}
                assert heads[i]["adapter"] == own and heads[i]["reranker"] <= own, heads[i]
            # Device 0 trained both modules; device 1 missed the only reranker round (stopped inside it).
            assert heads[0]["reranker"] == {head_key(users[0].id), "__default__"}, heads[0]

            # Removing a device: its key is refused from then on.
            restarted.stop()
            removed = fleet.call("server", "server", "remove", "--home", str(fleet.server_home), "device-1").stdout
            assert f"removed device-1 (node {ids[1]})" in removed
            again = fleet.start_device(1, name="device-1-removed", extra=("--rejoin-wait", "0"))
            assert again.popen.wait(timeout=120) != 0
            assert "refused this device" in again.log.read_text(encoding="utf-8"), again.tail(30)

            # The server goes away; device 0 answers from its own state.
            fleet.stop()
            service = fleet.start(0, "service", "client", "serve", "--state", str(fleet.device_dir(0) / "state"),
                                  "--port", "50551")
            wait_for(service.log, r"serving fedhydra\.v1\.Personalizer", 120, service)
            answer = None
            for _ in range(60):  # it binds a moment after it says so
                res = subprocess.run(fleet.argv(0, [sys.executable, "-m", "fedhydra.cli.main", "client", "ask",
                                                    "--address", "127.0.0.1:50551", "--user", users[0].id, "--json",
                                                    users[0].input]), capture_output=True, text=True, timeout=120)
                if res.returncode == 0:
                    answer = json.loads(res.stdout)
                    break
                time.sleep(1.0)
            assert answer is not None, res.stderr
            assert answer["answer"].strip() and answer["reranker_head"] == answer["adapter_head"] == "user", answer
            print(f"\nseparate hosts: rounds {[r['seconds'] for r in rounds]} s, whole test "
                  f"{time.monotonic() - t0:.0f} s")
        finally:
            fleet.stop()
    assert not set(hosts.namespaces) & set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                          text=True).stdout.split())
