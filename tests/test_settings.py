"""One table of settings: the Flower app config, the CLI flags, precedence, parsing and the presets."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedhydra.cli.main import build_parser
from fedhydra.client.client_app import client_settings
from fedhydra.common import settings
from fedhydra.common.config import PRESETS, HydraConfig, get_config

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_is_the_table():
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    config = doc["tool"]["flwr"]["app"]["config"]
    assert config == settings.defaults(), "regenerate with: python -m fedhydra.common.settings"
    assert all(type(config[k]) is type(s.default) for k, s in settings.SETTINGS.items() if s.group in settings.GROUPS)
    assert doc["tool"]["flwr"]["app"]["components"] == {"serverapp": "fedhydra.server.server_app:app",
                                                        "clientapp": "fedhydra.client.client_app:app"}
    assert settings.app_config_toml() in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def test_every_command_flag_of_a_setting_has_the_same_name_and_reaches_the_values():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("evaluate", "simulate", "deploy"):
        flags = {o for a in sub.choices[command]._actions for o in a.option_strings}
        settings_flags = {f"--{k}" for k in settings.SETTINGS} & flags
        assert "--epochs" in settings_flags and "--partition" not in flags and "--local-epochs" not in flags
    args = parser.parse_args(["simulate", "--out", "x", "--epochs", "2", "--partitioner", "profile-size",
                              "--strategy", "fedprox", "--llm-threads", "2", "--cache-dir", "/c",
                              "--llm-api-key-env", "MY_KEY", "--style", "chat", "--adapter-labels", "gold"])
    given = settings.from_args(args)
    assert given == {"epochs": 2, "partitioner": "profile-size", "strategy": "fedprox", "llm-threads": 2,
                     "cache-dir": "/c", "llm-api-key-env": "MY_KEY", "style": "chat", "adapter-labels": "gold",
                     "out": "x"}


def test_precedence_node_config_then_run_config_then_defaults():
    run_config = {**settings.defaults(), "threads": 2, "llm": "openai", "rounds": 7}
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 3, "num-partitions": 4, "threads": 4},
                  state=RecordDict(), run_config=run_config)
    values = client_settings(ctx)
    assert values["threads"] == 4 and values["llm"] == "openai" and values["rounds"] == 7  # node > run > default
    assert values["k"] == settings.SETTINGS["k"].default
    assert values["partition-id"] == 3 and values["num-partitions"] == 4
    # the CLI: flags over a command's own defaults over the table
    assert settings.resolve({"rounds": 2}, {"rounds": 5})["rounds"] == 5
    assert settings.resolve({"rounds": 2})["rounds"] == 2


def test_a_node_config_may_not_change_what_the_whole_run_shares():
    for key, value in (("rounds", 7), ("seed", 3), ("dp", "record")):
        ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0, key: value}, state=RecordDict(),
                      run_config=settings.defaults())
        with pytest.raises(ValueError, match=f"node config sets {key}, which every client of a run must share"):
            client_settings(ctx)
    ok = Context(run_id=1, node_id=5, node_config={"threads": 3, "llm": "openai", "llm-base-url": "http://127.0.0.1:9/v1"},
                 state=RecordDict(), run_config=settings.defaults())
    assert client_settings(ok)["llm-base-url"] == "http://127.0.0.1:9/v1"


@pytest.mark.parametrize("layer, message", [
    ({"no-such-key": 1}, "unknown setting 'no-such-key'"),
    ({"rounds": "three"}, "'rounds' must be a int"),
    ({"rounds": 2.5}, "'rounds' must be a int"),
    ({"strategy": "fedsgd"}, "choose one of"),
    ({"resume": "yes"}, "'resume' must be a bool"),
])
def test_bad_settings_are_refused_naming_the_key(layer, message):
    with pytest.raises(ValueError, match=message):
        settings.resolve(layer)


def test_toml_numbers_are_coerced_and_bools_parse_on_the_command_line():
    assert settings.resolve({"lr": 0, "rounds": 3.0})["lr"] == 0.0
    assert isinstance(settings.resolve({"lr": 0})["lr"], float)
    args = build_parser().parse_args(["simulate", "--out", "x", "--resume", "true"])
    assert settings.from_args(args)["resume"] is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--out", "x", "--resume", "maybe"])


def test_presets_fill_only_the_sizes_left_at_zero():
    cpu = HydraConfig.from_settings(settings.defaults())
    assert cpu.preset == "cpu" and cpu.pseudo_queries == PRESETS["cpu"]["pseudo-queries"]
    paper = HydraConfig.from_settings({**settings.defaults(), "preset": "paper", "candidates": 3})
    assert paper.retrieve == 10 and paper.candidates == 3 and paper.lr == 2e-5
    assert get_config("cpu", k=2, seed=7).k == 2 and get_config("cpu", seed=7).seed == 7
    with pytest.raises(ValueError, match="k=5 must be between 1 and retrieve"):
        get_config("cpu", k=5, retrieve=3)
    with pytest.raises(ValueError, match="adapter-margin must be auto, off or a number"):
        get_config("cpu", adapter_margin="sometimes")
    assert get_config("cpu", adapter_margin="0.5").margin == 0.5 and get_config("cpu").margin == "auto"
    assert HydraConfig.from_dict(cpu.as_dict()) == cpu
    # a state written before a setting existed loads with that setting's default, its own values kept
    newer = get_config("paper", k=2, seed=5).as_dict()
    older = {k: v for k, v in newer.items() if k not in ("rating_answer", "epochs")}
    loaded = HydraConfig.from_dict(older)
    assert loaded.rating_answer == settings.SETTINGS["rating-answer"].default
    assert loaded.epochs == PRESETS["paper"]["epochs"]
    assert loaded.k == 2 and loaded.seed == 5 and loaded.retrieve == 10
