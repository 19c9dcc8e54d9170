"""The commands of a deployment across hosts: `fedhydra server ...` (simulations/server_cmd.py) on the server
machine and `fedhydra node ...` (simulations/node_cmd.py) on each user's device."""

from __future__ import annotations

from .node_cmd import add_node_commands
from .server_cmd import add_server_commands


def add_host_commands(sub) -> None:
    add_server_commands(sub)
    add_node_commands(sub)
