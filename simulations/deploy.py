"""`fedhydra deploy`: the FedHydra app on a real Flower deployment on this machine's loopback, composed of the
same server piece (SuperLink on loopback + the Fleet API front, simulations/deployment.py) and device pieces
(SuperNode + warm executor, simulations/device.py) that `fedhydra server start` and `fedhydra node start` run on
separate machines. What runs where, and how it is secured: simulations/deployment.py.

Each SuperNode gets node config `state=DIR partition-id=i num-partitions=N`: its ClientApp makes its own
private state folder from its partition of the users on the first message (client/client_app.py), as a
real device would hold its own data; neither this command nor the server touches client state.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path

from fedhydra.common import settings

from .app_folder import write_app
from .deployment import CONNECTION, ISOLATIONS, Deployment
from .processes import DeployError


def add_deployment_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("deployment")
    g.add_argument("--workdir", default=None,
                   help="folder for certificates, Flower homes, logs, the app and client states (default OUT/deploy)")
    g.add_argument("--certs", default=None,
                   help="folder with ca.crt, server.pem, server.key and nodes/ keys to reuse (created when missing; "
                        "default WORKDIR/certs)")
    g.add_argument("--port", type=int, default=None, help="SuperLink port (default: a free one)")
    g.add_argument("--timeout", type=float, default=None, help="give up (and stop the run) after this many seconds")
    g.add_argument("--insecure", action="store_true",
                   help="no TLS, no SuperNode authentication: quick local runs only, never for real use")
    g.add_argument("--isolation", choices=ISOLATIONS, default="process",
                   help="how ClientApps run: 'process' (default): a long-lived executor per SuperNode that has "
                        "imported torch, transformers and the ClientApp once forks one per message; 'subprocess': "
                        "Flower's default, a fresh flwr-clientapp interpreter per message")
    g.add_argument("--quiet", action="store_true", help="do not stream the run's logs")


def deploy_plan(args: argparse.Namespace, values: dict) -> dict:
    """What `fedhydra deploy` will start, decided (and checked) before anything starts. Every flag lands here."""
    out = Path(args.out).expanduser().resolve()
    workdir = Path(args.workdir).expanduser().resolve() if args.workdir else out / "deploy"
    if values["clients"] < 1:
        raise ValueError("--clients must be at least 1")
    n = values["clients"] + values["test-clients"]
    given = settings.from_args(args)
    state_root = Path(values["state-root"]).expanduser().resolve() if "state-root" in given else workdir / "clients"
    if "min-nodes" in given and not 1 <= values["min-nodes"] <= n:
        raise ValueError(f"--min-nodes {values['min-nodes']} must be between 1 and the {n} clients started")
    min_nodes = values["min-nodes"] if "min-nodes" in given else n  # by default the run waits for every client
    return {"out": out, "workdir": workdir, "nodes": n, "state_root": state_root,
            "values": values | {"out": str(out), "state-root": str(state_root), "min-nodes": min_nodes},
            "certs": args.certs, "insecure": args.insecure, "port": args.port, "isolation": args.isolation,
            "timeout": args.timeout, "quiet": args.quiet}


def deploy_command(args: argparse.Namespace, values: dict) -> dict:
    """Everything `fedhydra deploy` does; see its --help."""
    t0 = time.monotonic()
    plan = deploy_plan(args, values)
    out, workdir, n, state_root, values = (plan[k] for k in ("out", "workdir", "nodes", "state_root", "values"))
    app = write_app(workdir / "app", values, name="fedhydra-deploy")
    print(f"{n} clients ({values['clients']} train, {values['test-clients']} test); each SuperNode makes its state "
          f"folder under {state_root}", flush=True)

    names = [f"node-{i}" for i in range(n)]
    deployment = Deployment(workdir, certs=args.certs, insecure=args.insecure, port=args.port,
                            isolation=args.isolation, front=not args.insecure)  # devices dial the front, as off-host
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
            for i, name in enumerate(names):
                node = {"partition-id": i, "num-partitions": n}
                deployment.start_supernode(name, state_root / f"client-{i}", node_config=node)
                print(f"SuperNode {name} -> {state_root / f'client-{i}'}", flush=True)
            deployment.wait_online(names)
            print(f"{len(names)} SuperNodes online (ClientApp isolation: {args.isolation}); "
                  f"flwr run {app} {CONNECTION} --stream", flush=True)
            echo = (lambda line: print(line, flush=True)) if not args.quiet else None
            info = deployment.run(app, timeout=args.timeout, echo=echo)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    status = info.get("status", "unknown")
    summary = {"run-id": info.get("run-id"), "status": status, "isolation": args.isolation,
               "wall-s": round(time.monotonic() - t0, 1),
               "run-wall-s": info.get("wall-s"), "network-traffic": info.get("network-traffic"),
               "out": str(out), "logs": str(deployment.logs)}
    (workdir / "deploy.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"run {summary['run-id']}: {status} in {summary['run-wall-s']} s; results in {out}; "
          f"logs in {deployment.logs}", flush=True)
    if status != "finished:completed":
        raise DeployError(f"run {summary['run-id']} ended with status {status}; "
                          f"see {deployment.logs / 'flwr-run.log'} and {deployment.logs}")
    return summary
