"""Round time across hosts (network namespaces) beside the same round on loopback, in one run.

Run (as root, with `ip netns`): .venv/bin/python benchmarks/bench_hosts.py [--pairs 1] [--workdir DIR]

What runs, both ways through the commands a person types (simulations/fleet_harness.py): `fedhydra server
start` (SuperLink on 127.0.0.1 + the Fleet API front, TLS, SuperNode authentication), 2 devices with
`fedhydra node keygen/start` (one synthetic LaMP_2M user each, fresh state folders), and `fedhydra server run`
with tests/test_hosts.py's TINY settings (2 FedAvg rounds: the reranker's, then the adapter's).
- hosts:    server and devices each in a network namespace of their own, joined by a bridge (10.x.y.0/24);
            devices dial the server's LAN address;
- loopback: the same processes all on this machine, devices dial the front on 127.0.0.1.
Every run starts from fresh state folders, so both do the same work (label generation included). A round's
seconds are OUT/federated.json rounds[i].seconds (the ServerApp's time from sending the round's messages to
holding every reply). The load average is printed first: on the shared 2-core machine the figures are upper
bounds, and the difference between the two ways is within the noise of a single pair.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


TINY = ["--rounds", "1", "--pseudo-queries", "1", "--retrieve", "2", "--k", "1", "--candidates", "2",
        "--train-layers", "1"]


def one_run(root: Path, hosts) -> dict:
    from fedhydra.common.synthetic import _LAMP_NAME, make_synthetic
    from fedhydra.simulations.fleet_harness import Fleet
    from fedhydra.simulations.processes import free_port

    users = make_synthetic("LaMP_2M", n_users=2, seed=0).users
    fleet = Fleet(root, devices=2, hosts=hosts, public_port=9092 if hosts else free_port())
    try:
        fleet.start_server()
        for i in range(2):
            fleet.prepare_device(i, [users[i]], _LAMP_NAME["LaMP_2M"])
        devices = [fleet.start_device(i) for i in range(2)]
        for d in devices:
            fleet.wait_connected(d)
        t0 = time.monotonic()
        fleet.call("server", "server", "run", "--home", str(fleet.server_home), "--out", str(root / "out"),
                   "--clients", "2", "--test-clients", "0", "--min-nodes", "2", "--quiet", *TINY, timeout=900)
        wall = time.monotonic() - t0
    finally:
        fleet.stop()
    doc = json.loads((root / "out" / "federated.json").read_text(encoding="utf-8"))
    return {"rounds": [r["seconds"] for r in doc["rounds"]], "wall": wall}


def main() -> None:
    from fedhydra.simulations import netns

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=1, help="hosts+loopback pairs (default 1)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    why = netns.unavailable()
    if why:
        sys.exit(f"bench_hosts: {why}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-hosts-"))
    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}; "
          f"{os.cpu_count()} cores; workdir {work}", flush=True)
    results: dict[str, list[dict]] = {"hosts": [], "loopback": []}
    for pair in range(args.pairs):
        order = ("hosts", "loopback") if pair % 2 == 0 else ("loopback", "hosts")
        for way in order:
            if way == "hosts":
                with netns.Hosts(devices=2) as hosts:
                    r = one_run(work / f"{pair}-hosts", hosts)
            else:
                r = one_run(work / f"{pair}-loopback", None)
            results[way].append(r)
            print(f"pair {pair} {way:<8}: rounds {r['rounds']} s, `server run` wall {r['wall']:.1f} s", flush=True)
    print("\n| way | round 1 (reranker) | round 2 (adapter) | `fedhydra server run` wall |\n|---|---|---|---|")
    for way, rows in results.items():
        mean = lambda xs: statistics.mean(xs)  # noqa: E731
        print(f"| {way} | {mean([r['rounds'][0] for r in rows]):.1f} s | {mean([r['rounds'][1] for r in rows]):.1f} s "
              f"| {mean([r['wall'] for r in rows]):.1f} s |")


if __name__ == "__main__":
    main()
