"""EdgeWard's on-board agent: verify, decrypt in memory, serve, monitor, wipe.

This package never imports ``packager`` or ``fleet``: a board installs only it and its small
dependency set (``pip install 'edgeward[device]'``).

Rooms: ``bundle`` (the format and its verification), ``trust`` (the pure trust core),
``store`` (the data directory and its one owner, ``store.layout``), ``runtime`` (running a
model), ``service`` (the guarded local API), ``telemetry`` (reports to the fleet); ``agent``
orchestrates them and ``cli`` is the command line. Importing a room does not import the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from device_agent.agent import Agent
    from device_agent.errors import EdgeWardError

__all__ = ["Agent", "EdgeWardError"]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the pure trust core does not load the runtimes and the store.
    if name == "Agent":
        from device_agent.agent import Agent

        return Agent
    if name == "EdgeWardError":
        from device_agent.errors import EdgeWardError

        return EdgeWardError
    raise AttributeError(f"module 'device_agent' has no attribute {name!r}")
