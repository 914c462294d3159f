"""The install handler's decisions: which events an install produces, field by field.

Plain functions, no services: each test pins the event as it goes on the wire (its JSON), what
it does to the installed-plugin registry, which version it retires and the log line.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from plugind.bus.emit import RegistryChange
from plugind.errors import PackageNotFound, PlugindError
from plugind.handlers.decide import (
    LogLine,
    expected_identifier_error,
    install_failed,
    install_progress,
    install_started,
    installed,
)
from plugind.messages import EventFactory, InstallCommand, PackageRef, encode
from plugind.package.difypkg import PluginPackage

AT = "2025-01-02T03:04:05.000006Z"
EVENTS = EventFactory("node-1", new_id=lambda: "event-1", now=lambda: AT)
CHECKSUM = "c" * 64
IDENTIFIER = f"acme/calc:0.2.0@{CHECKSUM}"
OLD = f"acme/calc:0.1.0@{'b' * 64}"
COMMON = {"v": 1, "event_id": "event-1", "at": AT, "node": "node-1"}

PACKAGE = PluginPackage(
    data=b"zip",
    sha256="a" * 64,
    checksum=CHECKSUM,
    author="acme",
    name="calc",
    version="0.2.0",
    manifest={
        "label": {"en_US": "Calculator"},
        "description": {"en_US": "Adds numbers."},
        "meta": {"runner": {"language": "python", "version": "3.12", "entrypoint": "main"}},
    },
    declaration={},
    tools=("calc/add", "calc/divide"),
)
MANIFEST = {
    "label": {"en_US": "Calculator"},
    "description": {"en_US": "Adds numbers."},
    "author": "acme",
    "runner": {"language": "python", "version": "3.12", "entrypoint": "main"},
    "tools": ["calc/add", "calc/divide"],
}


def command(**changes: Any) -> InstallCommand:
    fields: dict[str, Any] = {
        "request_id": "r1",
        "tenant_id": "t1",
        "package": PackageRef(path="acme-calc-0.2.0.difypkg"),
    }
    return InstallCommand(**(fields | changes))


def wire(event: Any) -> Any:
    return orjson.loads(encode(event))


@pytest.mark.parametrize(
    ("package", "source"),
    [
        (PackageRef(path="acme-calc-0.2.0.difypkg"), "path:acme-calc-0.2.0.difypkg"),
        (PackageRef(sha256="a" * 64), f"sha256:{'a' * 64}"),
        (PackageRef(base64="UEsDBA=="), "base64:8 chars"),
    ],
)
def test_started_names_the_source(package: PackageRef, source: str) -> None:
    assert wire(install_started(EVENTS, command(package=package))) == {
        "type": "plugin.install_started",
        **COMMON,
        "request_id": "r1",
        "tenant_id": "t1",
        "source": source,
    }


def test_progress() -> None:
    event = install_progress(EVENTS, command(), "dependencies", "uv sync: 12 packages")
    assert wire(event) == {
        "type": "plugin.install_progress",
        **COMMON,
        "request_id": "r1",
        "tenant_id": "t1",
        "step": "dependencies",
        "message": "uv sync: 12 packages",
    }


def test_a_first_install() -> None:
    done = installed(EVENTS, command(), PACKAGE, previous=None, duration_ms=3912.5)
    assert wire(done.event) == {
        "type": "plugin.installed",
        **COMMON,
        "request_id": "r1",
        "tenant_id": "t1",
        "plugin_id": "acme/calc",
        "identifier": IDENTIFIER,
        "version": "0.2.0",
        "checksum": CHECKSUM,
        "manifest": MANIFEST,
        "upgraded_from": None,
        "duration_ms": 3912.5,
    }
    assert done.registry == RegistryChange("set", "t1", "acme/calc", IDENTIFIER)
    assert done.retire is None
    assert not done.always_log
    (line,) = done.logs
    assert line.level == logging.INFO
    assert line.render() == (
        f"Plugin installed: {IDENTIFIER}, tenant=t1, request_id=r1, duration=3.9s"
    )


def test_another_version_is_an_upgrade_that_retires_the_old_one() -> None:
    done = installed(EVENTS, command(), PACKAGE, previous=OLD, duration_ms=1500.0)
    assert wire(done.event)["upgraded_from"] == OLD
    assert done.registry == RegistryChange("set", "t1", "acme/calc", IDENTIFIER)
    assert done.retire == OLD
    (line,) = done.logs
    assert line.render() == (
        f"Plugin installed: {IDENTIFIER}, tenant=t1, request_id=r1, duration=1.5s, "
        f"upgraded_from={OLD}"
    )


def test_the_same_version_again_is_not_an_upgrade() -> None:
    done = installed(EVENTS, command(), PACKAGE, previous=IDENTIFIER, duration_ms=10.0)
    assert wire(done.event)["upgraded_from"] is None
    assert done.retire is None
    assert "upgraded_from" not in done.logs[0].render()


def test_a_failure_after_the_package_was_read_names_the_plugin() -> None:
    error = PlugindError("dependency_install_failed", "uv sync failed: no such package 'nope'")
    failed = install_failed(
        EVENTS, command(), error, plugin_id="acme/calc", install_timeout=300, duration_ms=812.25
    )
    assert wire(failed.event) == {
        "type": "plugin.install_failed",
        **COMMON,
        "request_id": "r1",
        "tenant_id": "t1",
        "plugin_id": "acme/calc",
        "error": {
            "code": "dependency_install_failed",
            "message": "uv sync failed: no such package 'nope'",
        },
        "duration_ms": 812.25,
    }
    assert failed.registry is None and failed.retire is None
    assert failed.always_log
    assert failed.logs == (
        LogLine(
            logging.WARNING,
            "Plugin install failed: %s, request_id=%s, code=%s, error=%s",
            ("acme/calc", "r1", "dependency_install_failed", error.message),
        ),
    )


def test_a_failure_before_the_package_was_read_names_the_source() -> None:
    error = PackageNotFound("no package file 'x.difypkg' in /inbox")
    failed = install_failed(
        EVENTS,
        command(package=PackageRef(path="x.difypkg")),
        error,
        plugin_id=None,
        install_timeout=300,
        duration_ms=1.0,
    )
    assert wire(failed.event) == {
        "type": "plugin.install_failed",
        **COMMON,
        "request_id": "r1",
        "tenant_id": "t1",
        "plugin_id": None,
        "error": {"code": "package_not_found", "message": error.message},
        "duration_ms": 1.0,
    }
    assert failed.logs[0].render() == (
        "Plugin install failed: path:x.difypkg, request_id=r1, code=package_not_found, "
        "error=no package file 'x.difypkg' in /inbox"
    )


def test_running_out_of_time_is_a_timeout() -> None:
    failed = install_failed(
        EVENTS,
        command(),
        TimeoutError(),
        plugin_id="acme/calc",
        install_timeout=2.5,
        duration_ms=2500.125,
    )
    assert wire(failed.event) == {
        "type": "plugin.install_failed",
        **COMMON,
        "request_id": "r1",
        "tenant_id": "t1",
        "plugin_id": "acme/calc",
        "error": {"code": "timeout", "message": "install did not finish within 2.5s"},
        "duration_ms": 2500.125,
    }
    assert failed.logs[0].render() == (
        "Plugin install failed: acme/calc, request_id=r1, code=timeout, "
        "error=install did not finish within 2.5s"
    )


def test_an_expected_identifier_must_match() -> None:
    assert expected_identifier_error(command(), PACKAGE) is None
    assert expected_identifier_error(command(expected_identifier=IDENTIFIER), PACKAGE) is None
    error = expected_identifier_error(command(expected_identifier=OLD), PACKAGE)
    assert error is not None
    assert (error.code, error.message) == (
        "checksum_mismatch",
        f"package is {IDENTIFIER}, expected {OLD}",
    )
