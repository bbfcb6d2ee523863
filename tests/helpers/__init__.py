"""What the tests share, in one place (the fixtures stay in ``tests/conftest.py``).

- ``helpers.bus``: ``Collector`` (a listener to wait on), ``sync`` (a round trip through the
  broker), and small questions to a running hub (``peer_names``, ``tcp_address``);
- ``helpers.waits``: ``wait_until`` (bounded polling) and ``elapsed`` (the duration of a block);
- ``helpers.processes``: ``Children``, ``running`` and ``pid_of`` (child processes, always
  joined with a bound and killed at the end);
- ``helpers.measure``: RSS, descriptors and the ``[figure]`` lines of the reliability tests;
- ``helpers.rawpeer`` and ``helpers.rawbus``: a hand-driven peer on a raw socket, and the
  brokers and bridges it attacks (the ``make_target`` fixture);
- ``helpers.node``: the Node processes of the electron-common-ipc interop tests;
- ``helpers.rel_exit``: a script that exits with clients still connected.

The first three are re-exported here: ``from helpers import Collector, sync, wait_until``.
``tests/`` is on ``sys.path`` through ``pythonpath`` in pyproject.toml (and ``mypy_path`` for
mypy), so ``helpers`` imports the same way in the test modules and in their spawned children.
"""
from __future__ import annotations

from helpers.bus import Collector, sync
from helpers.processes import Children, Reports, pid_of, running
from helpers.waits import elapsed, wait_until

__all__ = ["Children", "Collector", "Reports", "elapsed", "pid_of", "running", "sync", "wait_until"]
