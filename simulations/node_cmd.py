"""`fedhydra node ...`: a user's device in a deployment across hosts.

    fedhydra node keygen KEY                 a new key pair: KEY (private, mode 0600, never leaves the device)
                                             and KEY.pub (give it to the server's operator to enroll)
    fedhydra node start --superlink HOST:PORT --ca ca.crt --key KEY --data DIR --state DIR
                                             run this device's SuperNode and warm executor until Ctrl-C / SIGTERM

`start` makes the state folder from the device's own LaMP-format files (`--data`: a folder with
`<split>_questions.json` [+ `<split>_outputs.json`], the users this device holds) the first time, and reuses
it afterwards: heads, history, labels, LLM cache and privacy ledger stay in it across rounds, runs and
restarts (client/state.py). A restarted device signs with the same key, so the SuperLink gives it its
enrolled node id again. Threads, the LLM endpoint and every other per-device setting travel as the
SuperNode's node config (they override the run's settings on this device only); `--gpu` picks the CUDA
devices the ClientApps see.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from fedhydra.common import settings
from fedhydra.common.files import write_atomic

from .device import ISOLATIONS, Device
from .processes import DeployError, Launcher, one_line_errors

DEFAULT_WORKDIR = "~/.fedhydra/node"
REFUSED_EXIT = "Exit Code: 305"  # Flower's SUPERNODE_CONNECTION_ERROR: e.g. a key the SuperLink does not know
# Flower's FLEET_NODE_ACTIVATION_FAILED: also what an enrolled node gets while the SuperLink still counts its
# previous session as online (flwr 1.41 activates only a registered or offline node).
STILL_ONLINE = "[code: 2004] Failed to activate SuperNode"


def keygen_command(args) -> None:
    from .certs import write_node_key

    try:
        key = write_node_key(args.key, args.comment or Path(args.key).name)
    except FileExistsError as exc:
        raise ValueError(str(exc)) from exc
    print(f"private key {key.private} (mode 0600: it never leaves this device)\n"
          f"public key  {key.public} (give this file to the server's operator: fedhydra server enroll "
          f"{key.public.name} --name NAME)", flush=True)


def ensure_state(state: Path, data: str | None, task: str | None, role: str):
    """The device's state folder: made from its own LaMP files on first start, reused afterwards."""
    from fedhydra.client.state import ClientState
    from fedhydra.common.data import load_split

    if (state / "client.json").is_file() and not data:
        return ClientState(state)
    if not data:
        raise ValueError(f"{state} holds no FedHydra state yet: give --data DIR, this device's LaMP-format files")
    split = load_split(data, task=task or None, require_golds=role == "test")
    return ClientState.create(state, split.task, split.users, role)  # refuses other users in an existing folder


def node_config(args) -> dict:
    """Per-device settings: the LLM group and threads given as flags, then --node-config KEY=VALUE pairs."""
    values = settings.from_args(args, ("llm",))
    if args.threads is not None:
        values["threads"] = args.threads
    for pair in args.node_config or []:
        key, sep, raw = pair.partition("=")
        if not sep or key not in settings.SETTINGS:
            raise ValueError(f"--node-config {pair!r}: expected KEY=VALUE with a FedHydra setting as KEY")
        if key not in settings.NODE_SETTINGS:
            raise ValueError(f"--node-config {key}: every client of a run shares it, so it comes from the run "
                             f"(the server's `flwr run`); a device may set {', '.join(settings.NODE_SETTINGS)}")
        default = settings.SETTINGS[key].default
        value = (raw.lower() in ("1", "true", "yes", "on")) if isinstance(default, bool) else type(default)(raw)
        values[key] = value
    settings.resolve(values)  # refuses bad values now, not in the first ClientApp
    return values


def start_command(args) -> int:
    state_dir = Path(args.state).expanduser().resolve()
    for path, what in ((args.ca, "--ca (the server's CA certificate)"), (args.key, "--key (this device's private key)")):
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"{what}: {path} does not exist")
    state = ensure_state(state_dir, args.data, args.task, args.role)
    workdir = Path(args.workdir).expanduser().resolve()
    launcher = Launcher(workdir, workdir / "logs")
    env = {"CUDA_VISIBLE_DEVICES": args.gpu} if args.gpu is not None else {}
    device = Device(launcher, args.name, args.superlink, state_dir, ca_cert=Path(args.ca).expanduser().resolve(),
                    key=Path(args.key).expanduser().resolve(), node_config=node_config(args),
                    isolation=args.isolation, port=args.runtime_port, extra_env=env)
    users, roles = state.user_ids(), "/".join(sorted(set(state.roles.values())))
    print(f"device {args.name}: {len(users)} {state.task.name} users ({roles}) in {state_dir}; "
          f"connecting to {args.superlink}; logs in {launcher.logs}", flush=True)
    stop = {"now": False}

    def _on_term(signum, frame):
        stop["now"] = True

    previous = signal.signal(signal.SIGTERM, _on_term)
    connected = False
    try:
        joined_before = workdir / "node-id"  # written on this device's first connection
        device.start()
        rejoin_until = time.monotonic() + args.rejoin_wait
        while not stop["now"]:
            dead = device.dead()
            if dead:
                what, proc = dead
                since = device.log_since_start()
                if STILL_ONLINE in since and joined_before.is_file() and time.monotonic() < rejoin_until:
                    # The server still counts this device's previous session as online (it ended without
                    # deactivating, e.g. killed): it goes offline after a few missed heartbeats. Try again.
                    print(f"device {args.name}: the server still sees this device's previous session online; "
                          f"trying again in 5 s (for up to {args.rejoin_wait:.0f} s)", flush=True)
                    device.stop()
                    time.sleep(5)
                    device.start()
                    continue
                tail = "\n".join(since.splitlines()[-40:])
                hint = (" The SuperLink refused this device: is its public key enrolled on the server "
                        "(fedhydra server enroll), and is --ca the server's CA?") if REFUSED_EXIT in tail else (
                        " The SuperLink ended this device's session (the device was removed on the server?)."
                        if what == "SuperNode" and proc.popen.returncode == 0 else "")
                raise DeployError(f"{what} exited ({proc.popen.returncode}).{hint} Log {proc.log}:\n{tail}")
            if not connected and device.connected_in_log() and device.executor_ready():
                connected = True
                node_id = next((ln.split("SuperNode ID:")[-1].strip() for ln in device.log_since_start().splitlines()
                                if "SuperNode ID:" in ln), "?")
                write_atomic(joined_before, node_id + "\n")
                print(f"device {args.name} connected as node {node_id}; waiting for the server's rounds", flush=True)
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in launcher.take_all():
            proc.stop()
    print(f"device {args.name} stopped", flush=True)
    return 0


def add_node_commands(sub) -> None:
    """`fedhydra node keygen|start`."""
    node = sub.add_parser("node", help="a user's device in a deployment across hosts (key pair, SuperNode)"
                          ).add_subparsers(dest="node_command", required=True, metavar="ACTION")
    k = node.add_parser("keygen", help="make this device's key pair (the private key never leaves the device)")
    k.add_argument("key", help="path of the private key to write; the public key goes to KEY.pub")
    k.add_argument("--comment", default=None, help="comment in the public key (default: the key's file name)")
    k.set_defaults(func=one_line_errors(keygen_command))

    s = node.add_parser("start", help="run this device's SuperNode and warm executor (until Ctrl-C / SIGTERM)",
                        description=__doc__.split("\n\n")[2])
    s.add_argument("--superlink", required=True, help="the server's Fleet API front, HOST:PORT")
    s.add_argument("--ca", required=True, help="the server's CA certificate (ca.crt)")
    s.add_argument("--key", required=True, help="this device's private key (from `fedhydra node keygen`)")
    s.add_argument("--state", required=True, help="this device's private state folder (made on first start)")
    s.add_argument("--data", default=None, help="this device's LaMP-format files (needed on first start)")
    s.add_argument("--task", default=None, help="LaMP task of --data (default: read from its outputs file)")
    s.add_argument("--role", choices=("train", "test"), default="train",
                   help="train: its users train the shared bases; test: unseen users that fit heads after training")
    s.add_argument("--name", default="device", help="name of this device in its logs (default 'device')")
    s.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"logs and Flower's files (default {DEFAULT_WORKDIR})")
    s.add_argument("--isolation", choices=ISOLATIONS, default="process",
                   help="process (default): the warm executor forks each ClientApp; subprocess: a fresh "
                        "interpreter per message")
    s.add_argument("--runtime-port", type=int, default=None,
                   help="port of the SuperNode's Runtime API on 127.0.0.1 (default: a free one)")
    s.add_argument("--threads", type=int, default=None, help="torch threads of each ClientApp on this device")
    s.add_argument("--rejoin-wait", type=float, default=120.0,
                   help="a device that was connected before: seconds to keep retrying while the server still counts "
                        "its previous session as online (after a crash, until a few heartbeats are missed; default 120)")
    s.add_argument("--gpu", default=None, help="CUDA_VISIBLE_DEVICES for the ClientApps ('' = CPU only)")
    s.add_argument("--node-config", action="append", metavar="KEY=VALUE",
                   help="any other FedHydra setting for this device only (repeatable)")
    settings.add_arguments(s, ("llm",))
    s.set_defaults(func=one_line_errors(start_command))
