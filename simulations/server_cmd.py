"""`fedhydra server ...`: the server machine of a deployment across hosts.

    fedhydra server start  --home H --public-host HOST [--public-port 9092]   (runs until Ctrl-C / SIGTERM)
    fedhydra server enroll --home H DEVICE.pub --name NAME                     (register a device's public key)
    fedhydra server remove --home H NAME|NODE_ID                              (unregister it)
    fedhydra server status --home H                                           (enrolled devices, online or not; runs)
    fedhydra server run    --home H --out OUT [settings]                      (`flwr run` of the FedHydra app)

`start` runs the server piece of simulations/deployment.py: the SuperLink with every API on 127.0.0.1 only
(TLS, SuperNode authentication), and the public front on HOST:PORT that forwards only the Fleet API. The
other commands talk to the SuperLink's Control API on 127.0.0.1, so they work on the server machine only.

H (default ~/.fedhydra/server) holds:
    certs/ca.crt       the CA certificate: the one file every device needs (copy it to each device)
    certs/ca.key       the CA's private key: never leaves this machine
    certs/server.pem   the server certificate (SAN: 127.0.0.1, localhost, every --public-host) and its key
    server.json        where the running server listens (written by `start`, removed when it stops)
    flwr-home/cli/     the `flwr` CLI's connection to the SuperLink (loopback, verified against ca.crt)
    logs/              superlink.log, front.log, flwr-run.log
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from fedhydra.common import settings
from fedhydra.common.files import write_atomic

from .deployment import Deployment
from .flwr_cli import CONNECTION, ServerCLI
from .processes import DeployError, one_line_errors

DEFAULT_HOME = "~/.fedhydra/server"
DEFAULT_PUBLIC_PORT = 9092


def _home(args) -> Path:
    return Path(args.home).expanduser().resolve()


def _running(home: Path) -> dict:
    """server.json of the running server in `home`, or an error saying to start one."""
    path = home / "server.json"
    if not path.is_file():
        raise DeployError(f"no running server in {home} ({path} is missing): start one with "
                          f"`fedhydra server start --home {home} --public-host HOST`")
    return json.loads(path.read_text(encoding="utf-8"))


def _cli(home: Path) -> ServerCLI:
    """The `flwr` CLI of the server running in `home` (its Control API on loopback)."""
    _running(home)
    return ServerCLI(home / "flwr-home" / "cli", home)


def _flwr(home: Path, *args: str, timeout: float = 60):
    return _cli(home).flwr(*args, timeout=timeout)


def device_names(home: Path) -> dict[str, str]:
    """node id -> the name given at enrolment (devices.json: flwr 1.41's `supernode ls` does not show names)."""
    path = home / "devices.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _nodes(home: Path) -> list[dict]:
    """Enrolled nodes as `flwr supernode ls` gives them, each with its enrolment "name"."""
    names = device_names(home)
    return [n | {"name": names.get(str(n.get("node-id")), "?")} for n in _cli(home).node_list()]


def describe_nodes(nodes: list[dict]) -> str:
    rows = [f"  {n.get('name', '?'):<16} node {n.get('node-id')}  {n.get('status', '?')}" for n in nodes]
    return "\n".join(rows) if rows else "  (no device enrolled)"


# ---------------------------------------------------------------- start
def start_command(args) -> None:
    home = _home(args)
    dep = Deployment(home, certs=home / "certs", public=args.public_host, public_port=args.public_port,
                     bind_host=args.bind_host, port=args.port, log=lambda text: print(text, flush=True))
    stop = {"now": False}

    def _on_term(signum, frame):
        stop["now"] = True

    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        with dep:
            dep.start_superlink()
            info = {"superlink": dep.address, "fleet": dep.fleet_address, "bind": f"{dep.bind_host}:{dep.public_port}",
                    "ca": str(dep.server_certs.ca_cert), "public-hosts": dep.public}
            write_atomic(home / "server.json", json.dumps(info, indent=1) + "\n")
            print(f"server ready. Devices dial {dep.fleet_address} and need only {dep.server_certs.ca_cert}.\n"
                  f"Enroll a device: fedhydra server enroll --home {home} DEVICE.pub --name NAME\n"
                  f"Start a run:     fedhydra server run --home {home} --out OUT ...", flush=True)
            seen: dict[str, str] = {}
            while not stop["now"]:
                for proc in (dep.superlink, dep.front_proc):
                    if not proc.alive():
                        raise DeployError(f"{proc.name} exited ({proc.popen.returncode}); log {proc.log}:\n"
                                          f"{proc.tail()}")
                names = device_names(home)
                now = {str(n["node-id"]): str(n.get("status")) for n in dep.node_list()}
                for node_id, status in now.items():
                    if seen.get(node_id) != status:
                        print(f"device {names.get(node_id, '?')} (node {node_id}): {status}", flush=True)
                seen = now
                for _ in range(int(args.poll * 5)):
                    if stop["now"]:
                        break
                    time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        (home / "server.json").unlink(missing_ok=True)
    print("server stopped", flush=True)


# ---------------------------------------------------------------- enrolment
def enroll_command(args) -> None:
    home = _home(args)
    key = Path(args.public_key).expanduser().resolve()
    if not key.is_file():
        raise FileNotFoundError(f"{key}: no such public key file (the device's KEY.pub from `fedhydra node keygen`)")
    if b"PRIVATE KEY" in key.read_bytes():
        raise ValueError(f"{key} is a private key: enroll the device's .pub file; the private key never leaves it")
    node_id = _cli(home).enroll(key, args.name)
    write_atomic(home / "devices.json", json.dumps(device_names(home) | {node_id: args.name}, indent=1) + "\n")
    print(f"enrolled {args.name}: node {node_id}", flush=True)


def remove_command(args) -> None:
    home = _home(args)
    nodes = _nodes(home)
    match = [n for n in nodes if args.device in (str(n.get("node-id")), n.get("name")) and n.get("status") != "unregistered"]
    if not match:
        raise ValueError(f"no enrolled device named or numbered {args.device!r}; enrolled:\n{describe_nodes(nodes)}")
    for n in match:
        res = _flwr(home, "supernode", "unregister", str(n["node-id"]), CONNECTION)
        if res.returncode != 0:
            raise DeployError(f"removing node {n['node-id']} failed: {res.stdout.strip()} {res.stderr.strip()}")
        print(f"removed {n.get('name')} (node {n['node-id']})", flush=True)


def status_command(args) -> None:
    home = _home(args)
    info = _running(home)
    print(f"SuperLink {info['superlink']} (loopback); Fleet API front {info['bind']}, devices dial {info['fleet']}")
    print("devices:\n" + describe_nodes(_nodes(home)))
    res = _flwr(home, "ls", CONNECTION)
    print(res.stdout.strip())


# ---------------------------------------------------------------- a run
def wait_for_devices(home: Path, min_nodes: int, timeout: float, poll: float = 5.0, say=print) -> list[dict]:
    """Wait until `min_nodes` enrolled devices are online, saying which enrolled ones are not (by name)."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        nodes = _nodes(home)
        online = [n for n in nodes if n.get("status") == "online"]
        if len(online) >= min_nodes:
            return online
        waiting = sorted(f"{n['name']} (node {n['node-id']}, {n.get('status')})"
                         for n in nodes if n.get("status") != "online")
        text = (f"waiting for devices: {len(online)} of min-nodes={min_nodes} online; not connected: "
                f"{', '.join(waiting) or 'none enrolled beyond those online'}")
        if text != last:
            say(text)
            last = text
        if time.monotonic() > deadline:
            raise DeployError(f"only {len(online)} of min-nodes={min_nodes} devices came online within {timeout:.0f} s")
        time.sleep(poll)


def run_plan(args, values: dict) -> dict:
    """What `fedhydra server run` will submit, decided before anything starts. Every flag lands here."""
    out = Path(args.out).expanduser().resolve()
    return {"home": _home(args), "out": out, "values": values | {"out": str(out)}, "timeout": args.timeout,
            "quiet": args.quiet}


def run_command(args, values: dict) -> dict:
    from .app_folder import write_app

    plan = run_plan(args, values)
    home, out, values = plan["home"], plan["out"], plan["values"]
    wait_for_devices(home, int(values["min-nodes"]), float(values["node-wait"]),
                     say=lambda text: print(text, flush=True))
    app = write_app(home / "app", values, name="fedhydra-server-run")
    cli = _cli(home)
    echo = (lambda line: print(line, flush=True)) if not args.quiet else None
    try:
        info = cli.run(app, timeout=args.timeout, echo=echo)
    finally:
        for proc in cli.launcher.take_all():  # `flwr run` itself, on an error or Ctrl-C
            proc.stop()
    print(f"run {info.get('run-id')}: {info.get('status')} in {info.get('wall-s')} s; results in {out}", flush=True)
    if info.get("status") != "finished:completed":
        raise DeployError(f"run {info.get('run-id')} ended with status {info.get('status')}; see "
                          f"{home / 'logs' / 'flwr-run.log'} and {home / 'logs' / 'superlink.log'}")
    return info


# ---------------------------------------------------------------- the parser
def add_server_commands(sub, skip: tuple = ()) -> None:
    """`fedhydra server start|enroll|remove|status|run`."""
    server = sub.add_parser("server", help="the server machine of a deployment across hosts (SuperLink + Fleet "
                                           "API front, enrolment, runs)").add_subparsers(
        dest="server_command", required=True, metavar="ACTION")

    def home(p):
        p.add_argument("--home", default=DEFAULT_HOME, help=f"the server's folder (default {DEFAULT_HOME})")

    s = server.add_parser("start", help="run the SuperLink on 127.0.0.1 and the public Fleet API front (until Ctrl-C)")
    home(s)
    s.add_argument("--public-host", action="append", required=True,
                   help="address or DNS name devices use to reach this server (repeat for several; all go into "
                        "the certificate's SAN)")
    s.add_argument("--public-port", type=int, default=DEFAULT_PUBLIC_PORT,
                   help=f"port of the Fleet API front (default {DEFAULT_PUBLIC_PORT})")
    s.add_argument("--bind-host", default=None, help="address the front listens on (default: the first --public-host)")
    s.add_argument("--port", type=int, default=None, help="the SuperLink's port on 127.0.0.1 (default: a free one)")
    s.add_argument("--poll", type=float, default=5.0, help="seconds between checks of the devices' status")
    s.set_defaults(func=one_line_errors(start_command))

    e = server.add_parser("enroll", help="register a device's public key (its KEY.pub) under a name")
    home(e)
    e.add_argument("public_key", help="the device's public key file (OpenSSH, from `fedhydra node keygen`)")
    e.add_argument("--name", required=True, help="a name for the device, shown in status and waiting messages")
    e.set_defaults(func=one_line_errors(enroll_command))

    r = server.add_parser("remove", help="unregister a device: its key is refused from then on")
    home(r)
    r.add_argument("device", help="the device's name or node id")
    r.set_defaults(func=one_line_errors(remove_command))

    st = server.add_parser("status", help="enrolled devices (online or not) and runs")
    home(st)
    st.set_defaults(func=one_line_errors(status_command))

    run = server.add_parser("run", help="run the FedHydra app on the enrolled devices (`flwr run`)",
                            description="Waits for min-nodes enrolled devices (naming those not connected), "
                                        "then submits the FedHydra Flower app to the running server and streams "
                                        "its log. Each device trains on its own data and state.")
    home(run)
    run.add_argument("--out", required=True, help="results folder on this machine")
    run.add_argument("--timeout", type=float, default=None, help="give up (and stop the run) after this many seconds")
    run.add_argument("--quiet", action="store_true", help="do not stream the run's log")
    settings.add_arguments(run, settings.GROUPS, skip=("out", "state-root") + skip)
    run.set_defaults(func=one_line_errors(
        lambda a: run_command(a, settings.absolute_paths(settings.resolve(settings.from_args(a))))))
