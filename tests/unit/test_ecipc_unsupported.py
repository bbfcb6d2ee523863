"""What a Node (electron-common-ipc) bus cannot do raises NotImplementedError at the call,
naming that limit: groups, request_all, sync, wait_for_listeners and a service hosted by a
group (issue 17's features need the ipcbus hub). Checked on a client turned into an
EcipcClient (the error comes before any I/O, connected or not)."""
from __future__ import annotations

from typing import Any, Callable

import pytest

from ipcbus import IpcBusClient
from ipcbus.ecipc.client import EcipcClient


@pytest.mark.parametrize("call", [
    lambda c: c.on("jobs", lambda event: None, group="pool"),
    lambda c: c.once("jobs", lambda event: None, group="pool"),
    lambda c: c.request_all("jobs", 1.0),
    lambda c: c.sync(1.0),
    lambda c: c.wait_for_listeners("jobs", 1, 1.0),
    lambda c: c._register_service("calc", 1.0, "pool"),
], ids=["on-group", "once-group", "request_all", "sync", "wait_for_listeners",
        "service-group"])
def test_what_node_cannot_do_raises_a_clear_error(call: Callable[[Any], Any]) -> None:
    client = EcipcClient.adopt(IpcBusClient.create())
    with pytest.raises(NotImplementedError, match="electron-common-ipc bus"):
        call(client)

