"""The Flower app folder `flwr run` packages: a pyproject.toml naming the installed FedHydra components, with
every setting as a `[tool.flwr.app.config]` default (and, for tests, extra files such as a wrapped ClientApp)."""

from __future__ import annotations

import os
from pathlib import Path

from fedhydra.common.settings import app_config_toml

SERVERAPP = "fedhydra.server.server_app:app"
CLIENTAPP = "fedhydra.client.client_app:app"


def write_app(folder: str | os.PathLike, values: dict, name: str = "fedhydra-run",
              clientapp: str = CLIENTAPP, files: dict[str, str] | None = None) -> Path:
    """A minimal Flower app folder: pyproject.toml (and `files`, e.g. a test's own ClientApp module), pointing at
    the installed FedHydra apps, with every setting of `values` as its `[tool.flwr.app.config]` default.

    `flwr run` packages it as a FAB; the SuperLink and SuperNodes import the apps from the environment they
    run in, where FedHydra is installed (runtime installation is disabled), so the FAB never carries the
    repository or its `.venv`.
    """
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Written by fedhydra: the FedHydra Flower app, packaged by `flwr run` as a FAB.",
        "[build-system]", 'requires = ["setuptools>=68"]', 'build-backend = "setuptools.build_meta"', "",
        "[project]", f'name = "{name}"', 'version = "0.1.0"',
        'description = "FedHydra: federated HYDRA personalization of a black-box LLM"', 'license = "Apache-2.0"',
        "dependencies = []  # installed beforehand; Flower's runtime installation is disabled", "",
        "[tool.flwr.app]", 'publisher = "fedhydra"', "",
        "[tool.flwr.app.components]", f'serverapp = "{SERVERAPP}"', f'clientapp = "{clientapp}"', "",
    ]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n" + app_config_toml(values), encoding="utf-8")
    for rel, text in (files or {}).items():
        (folder / rel).write_text(text, encoding="utf-8")
    return folder
