"""The commands of a deployment across hosts: `fedhydra server ...` (simulations/server_cmd.py) on the server
machine and `fedhydra node ...` (simulations/node_cmd.py) on each user's device."""

from __future__ import annotations

import functools

from .node_cmd import add_node_commands
from .processes import DeployError
from .server_cmd import add_server_commands


def _one_line_errors(func):
    """A failed deployment step is reported as one clear line by the CLI (it catches ValueError), not a traceback."""
    @functools.wraps(func)
    def wrapped(args):
        try:
            return func(args)
        except DeployError as exc:
            raise ValueError(str(exc)) from exc

    return wrapped


def add_host_commands(sub) -> None:
    add_server_commands(sub)
    add_node_commands(sub)
    for name in ("server", "node"):
        actions = sub.choices[name]._subparsers._group_actions[0].choices
        for parser in actions.values():
            parser.set_defaults(func=_one_line_errors(parser.get_default("func")))
