"""Tiny deployment rounds: Flower's subprocess isolation against FedHydra's warm executor.

Run: .venv/bin/python benchmarks/bench_deploy.py [--pairs 1] [--workdir DIR]

What runs: `fedhydra deploy` with the TINY settings of tests/test_deploy.py (2 train SuperNodes with
1 synthetic LaMP_2M user each; 1 pseudo-query, M=2, k=1, B=2, 1 trainable layer; rounds=1 per
module, so 2 FedAvg rounds: the reranker's, then the adapter's), always with TLS and SuperNode
authentication (never --insecure), once per mode and pair:
- subprocess: Flower's default; each message starts a fresh `flwr-clientapp` interpreter;
- process:    `flower-supernode --isolation process` plus one warm FedHydra executor per SuperNode
              (client/executor.py) that forks an already-imported process per message.

What is compared: the same work in every measured run. A warm-up run first fills the client state
folders (labels, LLM answers, saved models); they are copied aside, and every measured run starts
from a fresh copy of that snapshot, so both modes load the same models, train on the same cached
labels and make the same LLM calls (printed per round: LLM calls and cache hits must match).
The runs go in ABBA order (subprocess, process, process, subprocess per pair), so a drift in the
machine's load falls on both modes alike. A round's seconds are OUT/federated.json
rounds[i].seconds: the ServerApp's time from sending the round's messages to holding every reply,
which includes message delivery, the ClientApps' start-up and their work. The load average is
printed first: on the shared 2-core machine, figures taken under other load are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# tests/test_deploy.py's TINY setting.
TINY = ["--clients", "2", "--test-clients", "0", "--rounds", "1", "--pseudo-queries", "1", "--retrieve", "2",
        "--k", "1", "--candidates", "2", "--train-layers", "1"]
MODES = ("subprocess", "process")


def deploy(root: Path, name: str, mode: str, states: Path, certs: Path, timeout: float) -> dict:
    """One `fedhydra deploy` run; returns its rounds and wall times."""
    out, work = root / name / "out", root / name / "work"
    cmd = [sys.executable, "-m", "fedhydra.cli.main", "deploy", *TINY, "--isolation", mode, "--out", str(out),
           "--workdir", str(work), "--certs", str(certs), "--state-root", str(states), "--timeout", str(timeout),
           "--quiet"]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout + 120)
    if res.returncode != 0:
        raise SystemExit(f"{name} ({mode}) failed (exit {res.returncode}); logs in {work / 'logs'}\n"
                         f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    assert "TLS, node auth on" in res.stdout, res.stdout  # the measurement is of the secured deployment
    rounds = json.loads((out / "federated.json").read_text(encoding="utf-8"))["rounds"]
    summary = json.loads((work / "deploy.json").read_text(encoding="utf-8"))
    return {"name": name, "mode": mode, "wall-s": round(time.monotonic() - t0, 1), "run-wall-s": summary["run-wall-s"],
            "rounds": [{k: r[k] for k in ("round", "module", "clients", "seconds", "llm_calls", "cache_hits")}
                       for r in rounds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1, help="ABBA pairs: each adds 2 runs per mode (default 1)")
    parser.add_argument("--workdir", default=None, help="keep everything here (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take")
    args = parser.parse_args()

    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores", flush=True)
    root = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    root.mkdir(parents=True, exist_ok=True)
    certs, snapshot = root / "certs", root / "states-after-warm-up"
    warm = deploy(root, "warm-up", "process", root / "warm-up" / "clients", certs, args.timeout)
    print(f"warm-up (not measured): rounds {[r['seconds'] for r in warm['rounds']]} s", flush=True)
    shutil.copytree(root / "warm-up" / "clients", snapshot)

    order = [m for _ in range(args.pairs) for m in (MODES[0], MODES[1], MODES[1], MODES[0])]
    runs = []
    for i, mode in enumerate(order, 1):
        name = f"run-{i}-{mode}"
        states = root / name / "clients"
        shutil.copytree(snapshot, states)  # every measured run starts from the same state
        run = deploy(root, name, mode, states, certs, args.timeout)
        runs.append(run)
        print(f"{name:>20}: rounds {[r['seconds'] for r in run['rounds']]} s "
              f"(LLM calls {[r['llm_calls'] for r in run['rounds']]}, cache hits "
              f"{[r['cache_hits'] for r in run['rounds']]}), flwr run {run['run-wall-s']} s, "
              f"command {run['wall-s']} s", flush=True)

    rounds = len(runs[0]["rounds"])
    mean = {m: [statistics.mean(r["rounds"][i]["seconds"] for r in runs if r["mode"] == m) for i in range(rounds)]
            for m in MODES}
    print(f"\nmean seconds per round over {2 * args.pairs} runs per mode (TLS + node auth, 2 SuperNodes):")
    for i in range(rounds):
        module = runs[0]["rounds"][i]["module"]
        print(f"  round {i + 1} ({module:>8}): subprocess {mean['subprocess'][i]:6.1f}  process "
              f"{mean['process'][i]:6.1f}  ratio {mean['process'][i] / mean['subprocess'][i]:.2f}")
    ratio = sum(mean["process"]) / sum(mean["subprocess"])
    print(f"  both rounds        : subprocess {sum(mean['subprocess']):6.1f}  process {sum(mean['process']):6.1f}  "
          f"ratio {ratio:.2f}  (goal: at most 0.50, {'met' if ratio <= 0.5 else 'NOT met'})")
    result = {"load-average": {"start": load, "end": os.getloadavg()}, "warm-up": warm, "runs": runs, "mean-seconds": mean,
              "ratio": round(ratio, 3)}
    (root / "bench-deploy.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"details in {root / 'bench-deploy.json'}; logs under {root}/run-*/work/logs")


if __name__ == "__main__":
    main()
