"""`fedhydra deploy`: the command. What runs where, and how it is secured: server/deployment.py."""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path

from .deployment import CONNECTION, ISOLATIONS, Deployment, write_app
from .processes import DeployError

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
    deployment = Deployment(workdir, certs=args.certs, insecure=args.insecure, port=args.port,
                            isolation=args.isolation)
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
    g.add_argument("--isolation", choices=ISOLATIONS, default="process",
                   help="how ClientApps run: 'process' (default): a long-lived executor per SuperNode that has "
                        "imported torch, transformers and the ClientApp once forks one per message; 'subprocess': "
                        "Flower's default, a fresh flwr-clientapp interpreter per message")
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
