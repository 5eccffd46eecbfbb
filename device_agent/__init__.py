"""EdgeWard's on-board agent: verify, decrypt in memory, serve, monitor, wipe.

This package never imports ``packager`` or ``fleet``: a board installs only it and its small
dependency set (``pip install 'edgeward[device]'``).
"""

from device_agent.agent import Agent
from device_agent.errors import EdgeWardError

__all__ = ["Agent", "EdgeWardError"]
__version__ = "0.1.0"
