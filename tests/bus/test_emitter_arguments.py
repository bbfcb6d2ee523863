"""Bad arguments to the emitter surface raise at the call, as Node's EventEmitter does
(issue 14, item 22): nothing is changed, nothing is sent."""
from __future__ import annotations

from typing import Any, Callable

import pytest

from ipcbus import IpcBusBroker, IpcBusClient

from helpers import sync


def _listener(event: Any, *args: Any) -> None:
    pass


NOT_CALLABLE = [None, 5, "listener", b"x", [_listener]]
BAD_CHANNELS: list[tuple[Any, type[Exception]]] = [(None, TypeError), (5, TypeError),
                                                   (b"ch", TypeError), ("", ValueError),
                                                   ("x" * 1025, ValueError)]


@pytest.mark.parametrize("bad", NOT_CALLABLE)
@pytest.mark.parametrize("method", ["off", "remove_listener", "on", "add_listener", "once",
                                    "prepend_listener", "prepend_once_listener"])
def test_a_listener_that_is_not_callable_raises_type_error(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient], method: str,
        bad: Any) -> None:
    c = clients(broker_path(broker))
    c.on("ch", _listener)
    with pytest.raises(TypeError):
        getattr(c, method)("ch", bad)
    assert c.listeners("ch") == [_listener]


@pytest.mark.parametrize("bad, error", BAD_CHANNELS)
@pytest.mark.parametrize("method", ["on", "once", "off", "remove_listener", "prepend_listener",
                                    "prepend_once_listener"])
def test_a_bad_channel_raises_at_the_call(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient], method: str, bad: Any,
        error: type[Exception]) -> None:
    c = clients(broker_path(broker))
    with pytest.raises(error):
        getattr(c, method)(bad, _listener)
    with pytest.raises(error):
        c.listeners(bad)
    with pytest.raises(error):
        c.listener_count(bad)
    if bad is not None:  # remove_all_listeners(None): every channel
        with pytest.raises(error):
            c.remove_all_listeners(bad)
    assert c.event_names() == []


@pytest.mark.parametrize("bad", NOT_CALLABLE)
def test_on_closed_and_off_closed_check_the_handler(
        broker: IpcBusBroker, clients: Callable[..., IpcBusClient], bad: Any) -> None:
    c = clients(broker_path(broker))
    with pytest.raises(TypeError):
        c.on_closed(bad)
    with pytest.raises(TypeError):
        c.off_closed(bad)
    c.off_closed(lambda: None)  # a callable never given is ignored, as off() does
    sync(c)


def broker_path(broker: IpcBusBroker) -> Any:
    return broker.address
