"""Settings: defaults, parsing, and one clear line per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugind.config import load_settings, mask_url
from plugind.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


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


# -- Dify's names for the daemon's settings (drop-in) -------------------------------------------

DIFY_COMPOSE_ENV = {
    # what Dify's docker-compose passes to its plugin_daemon service (defaults of docker/.env)
    "SERVER_PORT": "5002",
    "SERVER_KEY": "lYkiYYT6owG+71oLerGzA7GXCgOT++6ovaezWAjpCjf+Sjc3ZtU+qUEi",
    "DIFY_INNER_API_URL": "http://api:5001",
    "DIFY_INNER_API_KEY": "QaHbTe77CtuXmsfyhR7+vRjI/+XbV1AaFy691iy+kGDv2Jvy0/eAh8Y1",
    "DB_HOST": "db_postgres",
    "DB_PORT": "5432",
    "DB_USERNAME": "postgres",
    "DB_PASSWORD": "difyai123456",
    "DB_DATABASE": "dify_plugin",
    "DB_SSL_MODE": "disable",
    "REDIS_HOST": "redis",
    "REDIS_PORT": "6379",
    "REDIS_PASSWORD": "difyai123456",
    "REDIS_DB": "0",
    "REDIS_USE_SSL": "false",
    "PLUGIN_MAX_EXECUTION_TIMEOUT": "600",
    "MAX_PLUGIN_PACKAGE_SIZE": "52428800",
    "PLUGIN_REMOTE_INSTALLING_HOST": "0.0.0.0",
    "PLUGIN_REMOTE_INSTALLING_PORT": "5003",
    "FORCE_VERIFYING_SIGNATURE": "false",
    "PLUGIN_WORKING_PATH": "/app/storage/cwd",
    "PLUGIN_STORAGE_LOCAL_ROOT": "/app/storage",
    "PIP_MIRROR_URL": "https://pypi.example.org/simple",
    "PYTHON_ENV_INIT_TIMEOUT": "120",
}


def test_dify_compose_environment_is_understood() -> None:
    settings = load_settings(DIFY_COMPOSE_ENV)
    assert not settings.embedded
    assert settings.database_url == (
        "postgresql://postgres:difyai123456@db_postgres:5432/dify_plugin?sslmode=disable"
    )
    assert settings.redis_url == "redis://:difyai123456@redis:6379/0"
    assert settings.api_key == DIFY_COMPOSE_ENV["SERVER_KEY"]
    assert (settings.http_port, settings.gateway_port) == (5002, 5003)
    assert settings.dify_api_url == "http://api:5001"
    assert settings.dify_inner_api_key == DIFY_COMPOSE_ENV["DIFY_INNER_API_KEY"]
    assert settings.task_timeout == 600 and settings.install_timeout == 120
    assert settings.max_package_size == 52428800
    assert settings.plugin_dir == Path("/app/storage/cwd")
    assert settings.plugin_pip_index_url == "https://pypi.example.org/simple"
    assert not settings.verify_signature
    assert settings.db_schema == "plugind"


def test_plugind_names_win_over_dify_names() -> None:
    settings = load_settings(
        {
            **DIFY_COMPOSE_ENV,
            "DATABASE_URL": "postgresql://me@pg/plugind",
            "REDIS_URL": "redis://r:6380/1",
            "PLUGIND_API_KEY": "own",
            "PLUGIND_HTTP_PORT": "7002",
            "PLUGIN_TASK_TIMEOUT": "30",
            "PLUGIN_DIR": "/srv/plugins",
            "PLUGIND_DB_SCHEMA": "plugind_b",
        }
    )
    assert settings.database_url == "postgresql://me@pg/plugind"
    assert settings.redis_url == "redis://r:6380/1"
    assert (settings.api_key, settings.http_port, settings.task_timeout) == ("own", 7002, 30)
    assert settings.plugin_dir == Path("/srv/plugins")
    assert settings.db_schema == "plugind_b"


def test_dify_connection_settings_are_quoted_and_optional() -> None:
    settings = load_settings(
        {
            "DB_HOST": "db",
            "DB_PASSWORD": "p@ss:w/rd",
            "DB_SSL_MODE": "require",
            "REDIS_HOST": "::1",
            "REDIS_USERNAME": "default",
            "REDIS_PASSWORD": "a@b",
            "REDIS_USE_SSL": "true",
            "REDIS_DB": "2",
        }
    )
    assert settings.database_url == (
        "postgresql://postgres:p%40ss%3Aw%2Frd@db:5432/dify_plugin?sslmode=require"
    )
    assert settings.redis_url == "rediss://default:a%40b@[::1]:6379/2"
    assert mask_url(settings.database_url) == (
        "postgresql://postgres:***@db:5432/dify_plugin?sslmode=require"
    )
    bare = load_settings({"DB_HOST": "db", "REDIS_HOST": "cache"})
    assert bare.database_url == "postgresql://postgres@db:5432/dify_plugin"
    assert bare.redis_url == "redis://cache:6379/0"
    assert load_settings({}).task_timeout == 600  # Dify's default, without any setting


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"SERVER_PORT": "http"}, "SERVER_PORT must be an integer"),
        ({"DB_HOST": "db", "DB_PORT": "x"}, "DB_PORT must be an integer"),
        ({"DB_HOST": "db", "DB_TYPE": "mysql"}, "DB_TYPE must be postgresql"),
        ({"DB_HOST": "db", "DB_SSL_MODE": "sometimes"}, "DB_SSL_MODE must be one of"),
        ({"REDIS_HOST": "r", "REDIS_USE_SSL": "maybe"}, "REDIS_USE_SSL must be true or false"),
        ({"REDIS_HOST": "r", "REDIS_USE_SENTINEL": "true"}, "REDIS_USE_SENTINEL"),
        ({"PLUGIN_MAX_EXECUTION_TIMEOUT": "0"}, "PLUGIN_MAX_EXECUTION_TIMEOUT must be greater"),
        ({"MAX_PLUGIN_PACKAGE_SIZE": "big"}, "MAX_PLUGIN_PACKAGE_SIZE must be an integer"),
        ({"PIP_MIRROR_URL": "mirror"}, "PIP_MIRROR_URL must start with"),
        ({"FORCE_VERIFYING_SIGNATURE": "true"}, "FORCE_VERIFYING_SIGNATURE is true but"),
        ({"PLUGIND_DB_SCHEMA": "Bad-Name"}, "PLUGIND_DB_SCHEMA must be"),
    ],
)
def test_bad_dify_values_name_the_variable_read(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_settings(env)


def test_force_verifying_signature_with_a_key(tmp_path: Path) -> None:
    key = tmp_path / "dify.pem"
    key.write_text("-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n")
    settings = load_settings(
        {"FORCE_VERIFYING_SIGNATURE": "true", "PLUGIN_SIGNATURE_PUBLIC_KEYS": str(key)}
    )
    assert settings.verify_signature and settings.signature_public_keys == (key,)


def test_the_compose_override_for_dify_gives_a_valid_configuration() -> None:
    """deploy/docker-compose.dify.yaml over Dify's plugin_daemon service starts as is.

    Compose merges the two `environment` maps; `${VAR:-default}` takes its default here, as
    on a Dify whose .env leaves plugind's variables alone (Dify's own default for
    FORCE_VERIFYING_SIGNATURE is true).
    """
    import re

    import yaml

    override = yaml.safe_load((REPO / "deploy" / "docker-compose.dify.yaml").read_text())
    service = override["services"]["plugin_daemon"]
    assert set(override["services"]) == {"plugin_daemon"}
    assert "curl" in " ".join(service["healthcheck"]["test"])

    def expand(value: str) -> str:
        return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", lambda m: m.group(1), str(value))

    env = {**DIFY_COMPOSE_ENV, "FORCE_VERIFYING_SIGNATURE": "true"}
    env.update({k: expand(v) for k, v in service["environment"].items()})
    settings = load_settings(env)
    assert settings.plugin_dir == Path("/app/storage/plugind")
    assert not settings.verify_signature
    assert settings.database_url is not None and "/dify_plugin" in settings.database_url
    assert (settings.api_key, settings.http_port) == (DIFY_COMPOSE_ENV["SERVER_KEY"], 5002)
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(r"apt-get install [^\n]*\bcurl\b", dockerfile)


def test_calls_back_into_dify_and_endpoints() -> None:
    defaults = load_settings({})
    assert (
        defaults.dify_inner_api_connect_timeout,
        defaults.dify_inner_api_write_timeout,
        defaults.dify_inner_api_read_timeout,
    ) == (5.0, 5.0, 240.0)
    assert defaults.dify_inner_api_pool_size == 64
    assert defaults.plugin_storage_max_size == 100 * 1024 * 1024
    assert defaults.endpoint_max_request_size == 10 * 1024 * 1024
    dify_names = load_settings(
        {
            "DIFY_BACKWARDS_INVOCATION_WRITE_TIMEOUT": "2500",
            "DIFY_BACKWARDS_INVOCATION_READ_TIMEOUT": "60000",
            "PERSISTENCE_STORAGE_MAX_SIZE": "4096",
        }
    )
    assert dify_names.dify_inner_api_write_timeout == 2.5  # upstream's are milliseconds
    assert dify_names.dify_inner_api_read_timeout == 60.0
    assert dify_names.plugin_storage_max_size == 4096
    ours = load_settings(
        {
            "DIFY_INNER_API_READ_TIMEOUT": "30",
            "DIFY_BACKWARDS_INVOCATION_READ_TIMEOUT": "60000",
            "DIFY_INNER_API_POOL_SIZE": "8",
            "PLUGIN_ENDPOINT_MAX_REQUEST_SIZE": "2048",
            "PLUGIN_ENDPOINT_MAX_RESPONSE_SIZE": "4096",
        }
    )
    assert ours.dify_inner_api_read_timeout == 30.0
    assert (ours.dify_inner_api_pool_size, ours.endpoint_max_request_size) == (8, 2048)
    assert ours.endpoint_max_response_size == 4096
    with pytest.raises(ConfigError, match="DIFY_INNER_API_POOL_SIZE"):
        load_settings({"DIFY_INNER_API_POOL_SIZE": "0"})
    with pytest.raises(ConfigError, match="DIFY_BACKWARDS_INVOCATION_READ_TIMEOUT"):
        load_settings({"DIFY_BACKWARDS_INVOCATION_READ_TIMEOUT": "soon"})
