"""Settings: defaults, parsing, and one clear line per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugind.config import load_settings, mask_url
from plugind.errors import ConfigError


def test_defaults_mean_the_embedded_services() -> None:
    settings = load_settings({})
    assert settings.embedded
    assert (settings.worker_count, settings.http_port, settings.gateway_port) == (4, 5002, 5003)
    assert settings.max_package_size == 50 * 1024 * 1024
    assert settings.namespace == "plugind"


def test_values_are_parsed() -> None:
    settings = load_settings(
        {
            "REDIS_URL": "redis://r:6379/0",
            "DATABASE_URL": "postgresql://u:p@db/x",
            "PLUGIN_WORKER_COUNT": "16",
            "PLUGIN_TASK_TIMEOUT": "2.5",
            "PLUGIN_OFFLINE": "yes",
            "LOG_LEVEL": "warn",
            "PLUGIND_DATA_DIR": "/srv/plugind",
        }
    )
    assert not settings.embedded
    assert settings.worker_count == 16 and settings.task_timeout == 2.5
    assert settings.plugin_offline and settings.log_level == "WARN"
    assert settings.plugin_dir == Path("/srv/plugind/plugins")


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("PLUGIN_WORKER_COUNT", "four", "PLUGIN_WORKER_COUNT must be an integer"),
        ("PLUGIN_WORKER_COUNT", "0", "PLUGIN_WORKER_COUNT must be between"),
        ("PLUGIN_TASK_TIMEOUT", "-1", "PLUGIN_TASK_TIMEOUT must be greater than"),
        ("REDIS_URL", "localhost:6379", "REDIS_URL must start with"),
        ("DATABASE_URL", "mysql://x", "DATABASE_URL must start with"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL must be one of"),
        ("PLUGIN_OFFLINE", "maybe", "PLUGIN_OFFLINE must be true or false"),
        ("PLUGIND_NAMESPACE", "{bad}", "PLUGIND_NAMESPACE must be"),
        ("PLUGIN_VERIFY_SIGNATURE", "true", "PLUGIN_SIGNATURE_PUBLIC_KEYS names no key"),
        ("PLUGIN_SIGNATURE_PUBLIC_KEYS", "/no/such/key.pem", "no such file"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_settings({name: value})


def test_passwords_are_masked() -> None:
    assert mask_url("postgresql://u:secret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert mask_url("redis://:secret@r:6379") == "redis://:***@r:6379"
    assert mask_url("redis://r:6379") == "redis://r:6379"


def test_relative_paths_are_resolved_against_the_starting_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    default = load_settings({})
    assert default.plugin_dir == tmp_path / ".plugind" / "plugins"
    assert default.embedded_dir == tmp_path / ".plugind"
    relative = load_settings({"PLUGIN_DIR": "plugins", "PLUGIND_DATA_DIR": "data"})
    assert (relative.plugin_dir, relative.embedded_dir) == (tmp_path / "plugins", tmp_path / "data")
    monkeypatch.chdir("/")
    assert relative.plugin_dir == tmp_path / "plugins"  # fixed at start, not at each use
