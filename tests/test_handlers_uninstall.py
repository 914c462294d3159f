"""The uninstall handler's decisions: an installed plugin, and one that is not.

Plain functions, no services: the event as it goes on the wire, the registry change, the version
it retires and the log line.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from plugind.bus.delivery import Delivery
from plugind.bus.emit import RegistryChange
from plugind.handlers.decide import LogLine, uninstall
from plugind.messages import EventFactory, UninstallCommand, encode

AT = "2025-01-02T03:04:05.000006Z"
EVENTS = EventFactory("node-1", new_id=lambda: "event-1", now=lambda: AT)
COMMON = {"v": 1, "event_id": "event-1", "at": AT, "node": "node-1"}
IDENTIFIER = f"acme/calc:0.1.0@{'c' * 64}"
COMMAND = UninstallCommand(request_id="r2", tenant_id="t1", plugin_id="acme/calc")
RAW = b'{"type":"uninstall","request_id":"r2","tenant_id":"t1","plugin_id":"acme/calc"}'
DELIVERY = Delivery("{plugind}:install", "1795892996997-0", {b"cmd": RAW}, deliveries=1)


def wire(event: Any) -> Any:
    return orjson.loads(encode(event))


def test_an_installed_plugin_is_uninstalled_and_its_version_retired() -> None:
    done = uninstall(EVENTS, COMMAND, DELIVERY, installed=IDENTIFIER)
    assert wire(done.event) == {
        "type": "plugin.uninstalled",
        **COMMON,
        "request_id": "r2",
        "tenant_id": "t1",
        "plugin_id": "acme/calc",
        "identifier": IDENTIFIER,
    }
    assert done.registry == RegistryChange("del", "t1", "acme/calc")
    assert done.retire == IDENTIFIER  # stopped once no tenant uses it any more
    assert not done.always_log
    assert done.logs == (
        LogLine(
            logging.INFO,
            "Plugin uninstalled: %s, tenant=%s, request_id=%s",
            (IDENTIFIER, "t1", "r2"),
        ),
    )
    assert done.logs[0].render() == f"Plugin uninstalled: {IDENTIFIER}, tenant=t1, request_id=r2"


def test_a_plugin_that_is_not_installed_is_a_rejected_command() -> None:
    done = uninstall(EVENTS, COMMAND, DELIVERY, installed=None)
    assert wire(done.event) == {
        "type": "command.rejected",
        **COMMON,
        "request_id": "r2",
        "tenant_id": "t1",
        "stream": "{plugind}:install",
        "entry_id": "1795892996997-0",
        "error": {
            "code": "not_installed",
            "message": "plugin acme/calc is not installed for tenant t1",
        },
        "raw": RAW.decode(),
    }
    assert done.registry is None and done.retire is None
    assert done.always_log
    (line,) = done.logs
    assert line.level == logging.WARNING
    assert line.render() == (
        "Command rejected: {plugind}:install 1795892996997-0, request_id=r2, "
        "code=not_installed, error=plugin acme/calc is not installed for tenant t1"
    )
