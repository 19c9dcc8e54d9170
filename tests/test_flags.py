"""No silent surprises: every flag of every command that runs something reaches the plan that command runs (or is
refused with a clear error), and every Flower run-config key is read by the app.

A flag added to a parser but not wired into its command's plan fails `test_every_flag_reaches_the_plan`; a setting
that no code reads fails `test_every_app_config_key_is_read_by_the_app`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from fedhydra.cli.main import RUNS, build_parser, command_plan
from fedhydra.common import settings
from fedhydra.common.encoder import default_encoder_path
from fedhydra.common.synthetic import write_synthetic
from fedhydra.simulations.simulate import oversubscription

ROOT = Path(__file__).resolve().parents[1]
# the arguments each command needs besides the flag under test
REQUIRED = {"evaluate": ["--data", "{data}", "--out", "{tmp}/out"], "simulate": ["--out", "{tmp}/out"],
            "demo": [], "privacy-sweep": ["--out", "{tmp}/out"], "deploy": ["--out", "{tmp}/out"],
            "server run": ["--out", "{tmp}/out"]}
# values that keep a plan valid where "default + 1" would not (the plan checks them)
CHOSEN = {"k": 5, "retrieve": 8, "fraction-train": 0.5, "dp-delta": 1e-6, "train-users": 10, "test-users": 10, "min-nodes": 3,
          "task": "LaMP_2M", "llm-base-url": "http://127.0.0.1:9/v1", "adapter-margin": "0.5",
          "epsilons": "inf,3", "methods": {"evaluate": "zero-shot,hydra", "simulate": "rag-2,hydra-fed"}}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _value(command: str, action: argparse.Action, tmp: Path, data: Path) -> str | None:
    """A valid value that differs from the default (None: a switch)."""
    key = action.option_strings[0][2:]
    if action.nargs == 0:
        return None
    if key in CHOSEN:
        chosen = CHOSEN[key]
        return str(chosen[command] if isinstance(chosen, dict) else chosen)
    setting = settings.SETTINGS.get(key)
    default = setting.default if setting else action.default
    if action.choices:
        return str(next(c for c in action.choices if c != default))
    if setting and setting.path:
        return {"data": str(data), "encoder": default_encoder_path()}.get(key, str(tmp / key))
    if key in ("out", "workdir", "certs", "train-data", "test-data"):
        return str(data if key.endswith("-data") else tmp / key)
    if isinstance(default, bool):
        return str(not default).lower()
    if isinstance(default, (int, float)) or action.type in (int, float):
        return str((default or 0) + 1 if action.type is int or isinstance(default, int) else (default or 0) + 0.25)
    return "x"


def _effective(command: str, plan: dict) -> list[dict]:
    """The settings a plan hands to the code that runs: the Flower run config(s), or the centralized values."""
    if command in ("simulate", "demo"):
        return [plan["federated"], plan["values"]]
    if command == "privacy-sweep":
        return [fed for _, fed in plan["runs"].values()]
    return [plan["values"]]


def _reaches(command: str, plan: dict, action: argparse.Action, parsed) -> bool:
    key, dest = action.option_strings[0][2:], action.dest
    if key in settings.SETTINGS and key != "out":  # --out is every command's own results folder, not the setting
        setting = settings.SETTINGS[key]
        want = settings.absolute_paths({key: parsed})[key] if setting.path else parsed
        ok = all(values[key] == want for values in _effective(command, plan))
        if setting.group == "hydra" and ok:  # the HYDRA config is built from the same values
            cfg = plan.get("config") or plan.get("central")
            ok = cfg is None or getattr(cfg, setting.dest) == want or key == "preset" or not want
        return ok
    if dest == "methods":
        return plan["methods"] == parsed.split(",")
    if dest == "epsilons":
        return set(plan["runs"]) == {"inf", "3"}
    if dest not in plan:
        return False
    value = plan[dest]
    return value == parsed or (value is not None and str(value) == str(Path(str(parsed)).resolve()))


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("synth")
    write_synthetic(dest, n_users=42)  # 20 train + 20 test users by default, and room for --label-users
    return dest


@pytest.mark.parametrize("command", list(RUNS))
def test_every_flag_reaches_the_plan(command, tmp_path, synth):
    parser = build_parser()
    sub = parser
    for word in command.split():  # `server run`: a command's action
        sub = _subparsers(sub)[word]
    base = [a.format(tmp=tmp_path, data=synth) for a in REQUIRED[command]]
    refused, missed = {}, []
    flags = _flags(sub)
    assert len(flags) > 5
    for action in flags:
        flag = action.option_strings[0]
        if flag in base:
            continue
        value = _value(command, action, tmp_path, synth)
        argv = [*command.split(), *base, flag] + ([] if value is None else [value])
        args = parser.parse_args(argv)
        parsed = getattr(args, action.dest)
        try:
            plan = command_plan(args)
        except (ValueError, FileNotFoundError) as exc:
            refused[flag] = str(exc)
            continue
        if not _reaches(command, plan, action, parsed):
            missed.append(f"{flag} {value}")
    assert not missed, f"`fedhydra {command}` accepts these flags but its plan does not carry them: {missed}"
    # the only refusals are combinations the command explains (evaluate: --train-data needs --test-data)
    assert set(refused) <= {"--train-data", "--test-data"}, refused
    for flag, message in refused.items():
        assert "--train-data" in message and "--test-data" in message


def test_an_explicit_threads_flag_wins_over_the_automatic_share(tmp_path):
    args = build_parser().parse_args(["simulate", "--out", str(tmp_path), "--threads", "3", "--parallel", "2"])
    plan = command_plan(args)
    assert plan["federated"]["threads"] == 3
    auto = command_plan(build_parser().parse_args(["simulate", "--out", str(tmp_path), "--parallel", "2"]))
    assert auto["federated"]["threads"] == auto["federated"]["llm-threads"] == auto["runtime"]["client-resources-num-cpus"]


def test_explicit_threads_that_oversubscribe_the_cores_are_warned_about(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    parse = build_parser().parse_args

    def warning(*flags: str) -> str:
        plan = command_plan(parse(["simulate", "--out", str(tmp_path), *flags]))
        return oversubscription(plan["federated"], plan["runtime"])

    assert warning() == ""  # the automatic share: 2 clients at once, 1 thread each
    assert warning("--llm-threads", "2").startswith("warning: 2 client(s) at once x 2 threads each on 2 cores")
    assert warning("--llm-threads", "2", "--parallel", "1") == ""  # one client at a time may use both cores
    assert "x 4 threads" in warning("--threads", "4", "--parallel", "1")


def test_invalid_combinations_are_refused(tmp_path, synth):
    parser = build_parser()
    with pytest.raises(ValueError, match="not both"):
        command_plan(parser.parse_args(["evaluate", "--data", str(synth), "--train-data", str(synth), "--test-data",
                                        str(synth), "--out", str(tmp_path)]))
    with pytest.raises(ValueError, match="min-nodes"):
        command_plan(parser.parse_args(["deploy", "--out", str(tmp_path), "--clients", "2", "--test-clients", "1",
                                        "--min-nodes", "4"]))
    with pytest.raises(ValueError, match="unknown method 'hydra-global'"):
        command_plan(parser.parse_args(["simulate", "--out", str(tmp_path), "--methods", "zero-shot,hydra-global"]))
    with pytest.raises(SystemExit):  # the sweep chooses the noise from each epsilon: the flag does not exist
        parser.parse_args(["privacy-sweep", "--out", str(tmp_path), "--dp-noise-multiplier", "1.0"])
    with pytest.raises(ValueError, match="no such file or folder"):
        command_plan(parser.parse_args(["simulate", "--out", str(tmp_path), "--data", str(tmp_path / "absent")]))


def _sources(*folders: str) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for f in folders for p in sorted((ROOT / f).rglob("*.py"))
                     if p.name != "settings.py")


def test_every_app_config_key_is_read_by_the_app():
    """Each [tool.flwr.app.config] key is read by the ServerApp or ClientApp (or the core they call): as a
    settings key (`values["key"]`, `.get("key")`, a key list) or, for HYDRA settings, as a HydraConfig field."""
    code = _sources("server", "client", "common")
    unread = []
    for key, s in settings.SETTINGS.items():
        if s.group not in settings.GROUPS:
            continue
        as_key = re.search(rf"""["']{re.escape(key)}["']""", code)
        as_field = s.group == "hydra" and re.search(rf"\.{s.dest}\b", code)
        if not (as_key or as_field):
            unread.append(key)
    assert not unread, f"run-config keys no app code reads: {unread}"


def test_centralized_settings_are_not_run_config_keys():
    toml = settings.app_config_toml()
    assert "train-users" not in toml and "test-users" not in toml
    with pytest.raises(ValueError, match="unknown setting 'train-users'"):
        settings.resolve({"train-users": 5})  # a Flower run config that sets it is refused, not ignored
    evaluate = (ROOT / "simulations" / "evaluate.py").read_text(encoding="utf-8")
    assert 'values["train-users"]' in evaluate and 'values["test-users"]' in evaluate
