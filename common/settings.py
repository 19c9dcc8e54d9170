"""Every FedHydra setting, declared once: its key, default and one-line meaning.

The same key is the CLI flag (`--key`), the Flower run-config key (pyproject
`[tool.flwr.app.config]`, `flwr run --run-config`) and the key recorded in results. Commands
pick the groups they use; the Flower app reads all of them from `context.run_config`.
Values are TOML-typed (str, int, float, bool) because Flower's run config is TOML.

Precedence, first wins: a SuperNode's node config (per-client values such as its state folder),
then the run config / CLI flags, then the defaults here. For the HYDRA sizes a 0 means "the
preset's value" (common/config.py PRESETS), so one table serves the paper and the cpu sizes.
`python -m fedhydra.common.settings` prints the `[tool.flwr.app.config]` section pyproject.toml
must hold (tests/test_settings.py checks they agree).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .protocol import ADAPTER, RERANKER

Value = str | int | float | bool


@dataclass(frozen=True)
class Setting:
    key: str
    default: Value
    help: str
    group: str
    choices: tuple = ()
    path: str = ""  # "in": a path that must exist; "out": a path the run writes; "in?": a path or a name
    # "run-free": changes nothing a run computes (a resume may change it); "label-free": LLM labels don't depend on it
    tags: tuple = ()


    @property
    def dest(self) -> str:
        return self.key.replace("-", "_")


_S = Setting
RUN_FREE, LABEL_FREE = ("run-free",), ("label-free",)
SETTINGS: dict[str, Setting] = {s.key: s for s in (
    # --- data: which users, and how they are dealt out to clients
    _S("task", "", "expected LaMP task ('' = the data's; synthetic data: LaMP_2M)", "data"),
    _S("data", "", "LaMP split folder ('' = FedHydra's deterministic synthetic users)", "data", path="in"),
    _S("data-name", "", "the data set's name in results, as written ('' = from a SOURCES.md/README.md heading "
       "'<name> as ...' beside the data or one folder up: '<name>, LaMP-N format'; else the task's name)", "data",
       tags=RUN_FREE),
    _S("clients", 6, "train clients (federated runs)", "data"),
    _S("test-clients", 6, "clients of unseen users, evaluated after training (federated runs)", "data"),
    _S("users-per-client", 1, "users each client holds", "data"),
    _S("partitioner", "id", "id: users dealt out at random; profile-size: clients of similar history length",
       "data", ("id", "profile-size")),
    _S("seed", 0, "seed of the user split, the models and the LLM samples", "data"),
    # --- centralized evaluation only (`fedhydra evaluate`; not a Flower run-config key)
    _S("train-users", 20, "users whose history trains the shared bases", "central"),
    _S("test-users", 20, "unseen users who are evaluated", "central"),
    _S("label-users", 0, "classification/rating: further users, disjoint from both, whose history gives the adapter "
       "only its label-set queries (adapter-label-queries; no LLM call): the shared adapter learns from more people "
       "than LLM labels can afford", "central"),
    # --- HYDRA: sizes (0 = the preset's) and method choices
    _S("preset", "cpu", "HYDRA sizes: paper (HYDRA's published ones), cpu (fewer LLM calls for 2-core machines) or "
       "auto (paper with CUDA, cpu without)", "hydra", ("cpu", "paper", "auto")),
    _S("pseudo-queries", 0, "profile items per user turned into training queries (0 = preset)", "hydra"),
    _S("retrieve", 0, "M: items BM25 gives the reranker (0 = preset)", "hydra"),
    _S("k", 4, "items the reranker puts in the prompt", "hydra"),
    _S("candidates", 0, "B: sampled LLM answers besides the greedy one (0 = preset)", "hydra"),
    _S("temperature", 0.7, "sampling temperature of the B candidates (MEASUREMENTS.md: 0.7 beats 1.0)", "hydra"),
    _S("style", "", "prompt format for profile items: system, chat or lamp ('' = the task's measured best)",
       "hydra", ("", "system", "chat", "lamp")),
    _S("adapter-labels", "graded", "adapter training target: graded (every candidate graded by the task metric, "
       "listwise loss), gold (HYDRA: the user's text positive, every LLM candidate negative), above-mean",
       "hydra", ("graded", "gold", "above-mean")),
    # The expected risk saturates: once a few flags put nearly all the softmax on one candidate, its gradient
    # vanishes even where that candidate is wrong, and Adam keeps moving the feature weights by about lr per step
    # in the sign of that tiny gradient. On Amazon ratings (60 train / 100 test users, seed 1) the greedy flags
    # drifted to ~35 log-odds and hydra answered greedy for every user (MAE 0.67); "best" gave 0.62.
    _S("adapter-loss", "risk", "listwise loss of the graded adapter: risk (expected task error of the softmax "
       "choice) or best (cross-entropy of the best-graded candidates' share of the softmax; it keeps a gradient "
       "where the adapter is confidently wrong)", "hydra", ("risk", "best"), tags=LABEL_FREE),
    # Amazon ratings (60 train / 100 test users, seed 1, --adapter-loss best; README): hydra's MAE 0.620 with median,
    # 0.610 with top (+0.010, -0.070 to +0.080), hydra-base 0.620 and 0.640: no measurable gain, so HYDRA's top stays.
    _S("rating-answer", "top", "a rating task's answer from the adapter's scores: top (HYDRA: the top-scored "
       "candidate) or median (the candidate with the least expected absolute error under the softmax of its scores: "
       "the MAE's Bayes decision)", "hydra", ("top", "median"), tags=LABEL_FREE),
    _S("adapter-label-queries", 12, "classification/rating: extra adapter queries per user over the closed label "
       "set (no LLM call)", "hydra"),
    _S("adapter-margin", "auto", "a sample replaces the greedy answer only when its adapter score beats greedy's by "
       "this much: auto (chosen on held-out training queries), off (always greedy), or a number", "hydra",
       tags=LABEL_FREE),
    _S("adapter-history", True, "the adapter's history features: how near a candidate is to the answers of the "
       "user's own profile items retrieved for the query, and (ratings) to their whole profile's ratings (false: "
       "zeroed, an ablation)", "hydra", tags=LABEL_FREE),
    _S("encoder", "", "HF encoder folder or name of both scorers ('' = all-MiniLM-L6-v2 from its package)", "hydra",
       path="in?"),
    _S("train-layers", 2, "top encoder layers that train and are shared", "hydra"),
    _S("head-layers", 2, "layers of each per-user head (1 or 2)", "hydra"),
    _S("max-length", 0, "token limit of a scored (query, text) pair (0 = preset)", "hydra"),
    _S("epochs", 0, "epochs over the labels (federated: per round) (0 = preset)", "hydra", tags=LABEL_FREE),
    _S("fit-epochs", 0, "epochs of the fit stage, where a new user's heads learn on the frozen base (its features "
       "are computed once, so epochs are cheap) (0 = preset)", "hydra", tags=LABEL_FREE),
    # New users' heads on Amazon titles (60 train / 100 test users, seed 1, ROUGE-1): hydra 0.0943 fitting both,
    # 0.0939 the adapter's only, 0.0993 none (hydra-base); no difference is measurable (README, "Amazon reviews in
    # LaMP-4 format"). HYDRA fits both, and so does every published FedHydra run: the default.
    _S("fit-heads", "both", "scorers whose heads the fit stage fits for each new user: both, adapter, reranker or "
       "none (a scorer left out answers new users with its shared default head, and its fit makes no LLM call)",
       "hydra", ("both", ADAPTER, RERANKER, "none")),
    # Amazon titles (60 train / 100 test users, seed 1): a new user's 3 pseudo-queries gave the adapter 2.3 ranked
    # candidate groups on average (most candidates of a 4-word title score ROUGE 0), and their fitted heads lowered
    # hydra below the default heads (0.0943 against 0.0993 ROUGE-1). A head of ~150k weights fitted on one or two
    # contrasts follows their noise; the shared default head was trained on every training user. With 3: 10 reranker
    # and 52 adapter heads for the 100 users, hydra 0.0993 (= hydra-base). Ratings keep every adapter head (12
    # label-set queries always rank).
    _S("fit-min-queries", 3, "a new user's head is fitted only when at least this many of their queries rank "
       "something (its candidates or items not all graded alike; capped at pseudo-queries); a user with fewer "
       "answers with the scorer's shared default head (0: every user with examples gets a head, HYDRA's way)",
       "hydra", tags=LABEL_FREE),
    _S("lr", 0.0, "learning rate of the shared base layers (0 = preset)", "hydra", tags=LABEL_FREE),
    _S("head-lr", 0.0, "learning rate of the heads (0 = preset)", "hydra", tags=LABEL_FREE),
    # Adam moves a weight by about lr per step, and the few feature weights must travel far even in a federated
    # client's few steps. Fitted on LaMP-7's cached candidates (60 train / 100 test users, ROUGE-1), central / 12
    # clients x 3 rounds: lr 0.1: 0.384 / 0.351; 0.5: 0.390 / 0.377; 1.0: 0.388 / 0.386.
    _S("feature-lr", 1.0, "learning rate of the adapter's shared candidate-feature weights (no weight decay)",
       "hydra", tags=LABEL_FREE),
    _S("batch-size", 0, "training batch size (0 = preset)", "hydra", tags=LABEL_FREE),
    _S("weight-decay", 0.01, "AdamW weight decay", "hydra", tags=LABEL_FREE),
    # --- the black-box LLM
    _S("llm", "embedded", "embedded: SmolLM2-135M-Instruct in-process; openai: any OpenAI-compatible endpoint",
       "llm", ("embedded", "openai")),
    _S("llm-base-url", "", "endpoint of --llm openai, e.g. http://127.0.0.1:8765/v1", "llm"),
    _S("llm-model", "", "model name sent to --llm openai (embedded: another GGUF file)", "llm"),
    _S("llm-api-key-env", "OPENAI_API_KEY", "environment variable that holds the endpoint's API key", "llm",
       tags=RUN_FREE),
    _S("llm-threads", 1, "CPU threads of the embedded LLM (1: llama.cpp's 2-thread pool stalls on shared cores)",
       "llm", tags=RUN_FREE),
    _S("llm-concurrency", 0, "LLM requests in flight together per process (0 = the backend's default: openai 16, "
       "embedded 1); in a simulation each running client has its own, so size it as the endpoint's limit over "
       "the clients that run at once (README)", "llm", tags=RUN_FREE),
    _S("llm-rpm", 0.0, "openai: cap on requests per minute of this process (0 = none; 429s are obeyed anyway)",
       "llm", tags=RUN_FREE),
    _S("llm-tpm", 0.0, "openai: cap on tokens per minute of this process, prompt + completion (0 = none)", "llm",
       tags=RUN_FREE),
    # LaMP itself cut FlanT5's inputs to 512 tokens; on 2 CPU cores the embedded model's prefill is most of a
    # call's time, so a smaller window makes long-history data (Amazon reviews) affordable.
    _S("llm-context-window", 2048, "tokens (prompt + answer) the LLM takes; prompts are cut to fit, LaMP's way "
       "(common/fit.py). openai: the endpoint model's window; embedded: its n_ctx (SmolLM2 was trained on 8192)",
       "llm"),
    _S("cache-dir", "", "LLM response cache folder ('' = $FEDHYDRA_CACHE_DIR or ~/.cache/fedhydra); in simulations "
       "every client reads through it, as through a provider that answers identical prompts once", "llm",
       path="out", tags=RUN_FREE),
    # --- federation (the ServerApp and ClientApp)
    _S("rounds", 3, "federated rounds per module: the reranker's, then the adapter's", "federation"),
    _S("strategy", "fedavg", "Flower strategy that aggregates the shared arrays", "federation",
       ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")),
    _S("fraction-train", 1.0, "fraction of the train clients sampled per round", "federation"),
    _S("proximal-mu", 0.01, "fedprox: weight of the proximal term", "federation"),
    _S("server-lr", 0.0, "server learning rate (0 = the strategy's usual one: fedavgm 1.0; fedadam, fedyogi, "
       "fedadagrad eta 0.001, as Flower's 0.1 moves pretrained encoder weights far too much)", "federation"),
    _S("server-momentum", 0.9, "fedavgm: server momentum; fedadam/fedyogi: beta-1", "federation"),
    _S("lr-schedule", "round", "clients' learning-rate decay: run (the rounds share one linear decay, as the "
       "centralized training over rounds x epochs) or round (each round decays from the full rate to 0)",
       "federation", ("run", "round")),
    _S("min-nodes", 2, "nodes to wait for before the first round", "federation", tags=RUN_FREE),
    _S("node-wait", 300.0, "seconds to wait for min-nodes to connect", "federation", tags=RUN_FREE),
    _S("round-timeout", 3600.0, "seconds a round waits for replies; clients that miss it are left out", "federation",
       tags=RUN_FREE),
    _S("out", "runs/federated", "server-side results and checkpoint folder", "federation", path="out", tags=RUN_FREE),
    _S("state-root", "runs/federated/clients", "simulation: folder of the clients' private state folders "
       "(a deployed SuperNode names its own with node config state=DIR)", "federation", path="out", tags=RUN_FREE),
    _S("resume", False, "continue from the checkpoint in out", "federation", tags=RUN_FREE),
    _S("stop-after-round", 0, "stop cleanly after this round (0 = run to the end); resume later", "federation",
       tags=RUN_FREE),
    _S("threads", 1, "torch threads of each client", "federation", tags=RUN_FREE),
    # --- Flower's simulation runtime (`simulate`, `demo`, `privacy-sweep`; not a run-config key: the runtime's own)
    _S("ray-address", "", "an existing Ray cluster's head (HOST:PORT, as `ray start --head` prints) to run the "
       "virtual clients on ('' = a Ray instance of its own per run)", "runtime", tags=RUN_FREE),
    # --- privacy (PRIVACY.md): differential privacy and secure aggregation of the shared arrays
    _S("dp", "off", "differential privacy: off, user (each client's update clipped, Gaussian noise on the sum at "
       "the server, Flower's RDP accountant) or record (DP-SGD with Opacus on each client)", "privacy",
       ("off", "user", "record")),
    _S("dp-epsilon", 0.0, "target epsilon of the whole planned training; the noise multiplier is computed from it "
       "(0 = use dp-noise-multiplier)", "privacy"),
    _S("dp-noise-multiplier", 0.0, "Gaussian noise std over the clip norm (used when dp-epsilon is 0)", "privacy"),
    _S("dp-clip", 1.0, "clip norm C: of a client's update (user) or of one unit's gradient (record)", "privacy"),
    _S("dp-delta", 1e-5, "delta of the (epsilon, delta) guarantee", "privacy"),
    _S("dp-max-epsilon", 0.0, "never release beyond this epsilon: a round that would exceed it is not run "
       "(0 = dp-epsilon when set, else no cap)", "privacy"),
    _S("secagg", False, "secure aggregation (Flower's SecAgg+): the server sees only the sum of the train "
       "clients' updates", "privacy"),
)}

GROUPS = ("data", "hydra", "llm", "federation", "privacy")  # the Flower app's: its run config holds exactly these
# What a SuperNode's node config may set for its own client: its LLM endpoint (the llm group) and what changes
# nothing the run computes (run-free, e.g. threads). Everything else every client of a run must share.
NODE_SETTINGS = tuple(k for k, s in SETTINGS.items() if s.group == "llm" or "run-free" in s.tags)
TITLES = {"data": "data and clients", "central": "centralized evaluation", "runtime": "simulation runtime", "hydra": "HYDRA", "llm": "black-box LLM",
          "federation": "federation", "privacy": "privacy"}


def tagged(tag: str) -> tuple[str, ...]:
    """The keys of the settings that carry `tag` (see Setting.tags)."""
    return tuple(k for k, s in SETTINGS.items() if tag in s.tags)


def defaults(groups: tuple[str, ...] = GROUPS) -> dict[str, Value]:
    return {k: s.default for k, s in SETTINGS.items() if s.group in groups}


def _coerce(setting: Setting, value) -> Value:
    """`value` as the setting's type (TOML ints are accepted for floats), or ValueError naming the key."""
    want = type(setting.default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not want:
        raise ValueError(f"setting {setting.key!r} must be a {want.__name__}, got {value!r}")
    if setting.choices and value not in setting.choices:
        raise ValueError(f"setting {setting.key!r} is {value!r}; choose one of {', '.join(map(repr, setting.choices))}")
    return value


def resolve(*layers: dict, groups: tuple[str, ...] = GROUPS, extra_keys: tuple[str, ...] = ()) -> dict[str, Value]:
    """Defaults of `groups`, then each layer over them (later layers win). Unknown keys are an error,
    except `extra_keys` (values that are not settings, e.g. Flower's partition-id), which pass through."""
    out: dict[str, Value] = defaults(groups)
    for layer in layers:
        for key, value in dict(layer).items():
            if key in extra_keys:
                out[key] = value
                continue
            setting = SETTINGS.get(key)
            if setting is None or setting.group not in groups:
                known = ", ".join(k for k, s in SETTINGS.items() if s.group in groups)
                raise ValueError(f"unknown setting {key!r}; known: {known}")
            out[key] = _coerce(setting, value)
    return out


def absolute_paths(values: dict[str, Value]) -> dict[str, Value]:
    """`values` with every path setting made absolute against this process's working directory, the user's.

    Paths are resolved once, where the user gave them, because Flower's SuperLink, SuperNodes and ClientApps
    run in other working directories. An input path that does not exist is refused here, before anything starts.
    An encoder is a folder or a model name: only what looks like a path ('.', '/' or '~' first) must exist.
    """
    from pathlib import Path

    out = dict(values)
    for key, value in values.items():
        kind = SETTINGS[key].path if key in SETTINGS else ""
        if not kind or not value:
            continue
        if kind == "in?" and not str(value).startswith((".", "/", "~")) and not Path(str(value)).exists():
            continue  # a model name, not a path
        path = Path(str(value)).expanduser().resolve()
        if kind.startswith("in") and not path.exists():
            raise ValueError(f"--{key} {value}: no such file or folder ({path})")
        out[key] = str(path)
    return out


# ---------------------------------------------------------------- command line
def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser, groups: tuple[str, ...], skip: tuple[str, ...] = (),
                  shown_defaults: dict | None = None) -> None:
    """`--key` flags for the settings of `groups` (argparse default None: `from_args` keeps only what was given).
    `shown_defaults` are a command's own defaults (e.g. the demo's sizes), shown in --help."""
    shown = dict(shown_defaults or {})
    for group in groups:
        g = parser.add_argument_group(TITLES[group])
        for key, s in SETTINGS.items():
            if s.group != group or key in skip:
                continue
            default = shown.get(key, s.default)
            kw = {"type": _parse_bool if isinstance(s.default, bool) else type(s.default), "default": None,
                  "dest": s.dest, "metavar": key.upper().replace("-", "_"),
                  "help": f"{s.help} (default {default!r})".replace("%", "%%")}
            if s.choices:
                kw["choices"] = s.choices
                kw.pop("metavar")
            g.add_argument(f"--{key}", **kw)


def from_args(args: argparse.Namespace, groups: tuple[str, ...] = GROUPS) -> dict[str, Value]:
    """The settings of `groups` given on the command line (flags left out are not in the result)."""
    return {k: getattr(args, s.dest) for k, s in SETTINGS.items()
            if s.group in groups and getattr(args, s.dest, None) is not None}


# ---------------------------------------------------------------- Flower app config
def toml_value(value: Value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def app_config_toml(values: dict[str, Value] | None = None) -> str:
    """The `[tool.flwr.app.config]` section: every setting with its default (or `values`), its meaning above it."""
    values = {**defaults(), **(values or {})}
    lines = ["[tool.flwr.app.config]"]
    for key, s in SETTINGS.items():
        if s.group in GROUPS:
            lines += [f"# {s.help}", f"{key} = {toml_value(values[key])}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(app_config_toml(), end="")
