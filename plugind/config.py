"""Settings from the environment, validated once at start.

A bad value stops the daemon with one line naming the variable (docs/configuration.md), because
a daemon that starts with a half-understood configuration fails later, far from the cause.

Drop-in for Dify: the names Dify's Compose file gives its plugin daemon (``SERVER_KEY``,
``SERVER_PORT``, ``DB_*``, ``REDIS_*``, ``PLUGIN_MAX_EXECUTION_TIMEOUT``...) are read as aliases
wherever plugind's own name is unset, so swapping the image of Dify's ``plugin_daemon`` service
is enough. plugind's own name always wins; an error names the variable that was actually read.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from plugind.errors import ConfigError

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARN", "WARNING", "ERROR")
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
DEFAULT_TASK_TIMEOUT = 600.0  # seconds, as Dify's PLUGIN_MAX_EXECUTION_TIMEOUT
DEFAULT_TAKEOVER_AFTER = 30.0  # seconds of an owner's silence before its entries are taken over
MIN_TAKEOVER_AFTER = 2.0
MAX_TAKEOVER_AFTER = 3600.0
#: An owner refreshes its entries this many times per takeover period, so a live node would have
#: to miss several refreshes in a row (a stalled event loop, a hung connection) to lose one.
KEEPALIVES_PER_TAKEOVER = 6


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str | None = None
    database_url: str | None = None
    db_schema: str = "plugind"
    log_level: str = "INFO"
    log_format: str = "text"
    plugin_dir: Path = Path(".plugind/plugins")
    embedded_dir: Path = Path(".plugind")
    worker_count: int = 4
    install_concurrency: int = 2
    task_timeout: float = DEFAULT_TASK_TIMEOUT
    install_timeout: float = 600.0
    max_package_size: int = 50 * 1024 * 1024
    max_result_size: int = 16 * 1024 * 1024
    plugin_instances: int = 1
    plugin_memory_limit: int | None = None
    plugin_heartbeat_timeout: float = 120.0  # as Dify's daemon
    namespace: str = "plugind"
    max_deliveries: int = 5
    dedupe_ttl: int = 24 * 3600
    takeover_after: float = DEFAULT_TAKEOVER_AFTER
    connect_timeout: float = 30.0
    stream_retention: float = 3600.0
    http_port: int = 5002
    gateway_port: int = 5003
    http_host: str = "0.0.0.0"
    api_key: str | None = None
    dify_api_url: str | None = None
    dify_inner_api_key: str | None = None
    # plugins' calls back into Dify (plugind.backwards): upstream's timeouts, a bounded pool
    dify_inner_api_connect_timeout: float = 5.0
    dify_inner_api_write_timeout: float = 5.0
    dify_inner_api_read_timeout: float = 240.0
    dify_inner_api_pool_size: int = 64
    plugin_storage_max_size: int = 100 * 1024 * 1024  # per tenant and plugin, whatever it asks
    endpoint_max_request_size: int = 10 * 1024 * 1024  # the body of a request to /e/{hook_id}
    endpoint_max_response_size: int = 8 * 1024 * 1024  # the body a plugin endpoint answers
    plugin_python: str | None = None
    plugin_pip_index_url: str | None = None
    plugin_offline: bool = False
    verify_signature: bool = False
    signature_public_keys: tuple[Path, ...] = ()
    node: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    def __post_init__(self) -> None:
        # Resolved once, against the working directory the daemon starts in: plugin
        # environments are built with the plugin's own folder as the working directory, where
        # a relative PLUGIN_DIR would no longer point anywhere.
        object.__setattr__(self, "plugin_dir", _absolute(self.plugin_dir))
        object.__setattr__(self, "embedded_dir", _absolute(self.embedded_dir))
        object.__setattr__(
            self, "signature_public_keys", tuple(_absolute(p) for p in self.signature_public_keys)
        )

    @property
    def embedded(self) -> bool:
        return self.redis_url is None or self.database_url is None

    @property
    def keepalive_interval(self) -> float:
        """How often a node refreshes the idle time of the entries it runs (derived, never set):
        a sixth of ``takeover_after``, 5 s by default."""
        return self.takeover_after / KEEPALIVES_PER_TAKEOVER


def check_settings(settings: Settings) -> None:
    """Refuse combinations that would break a guarantee; run by :func:`load_settings` and again by
    the daemon at start (tests and embedders build :class:`Settings` directly).

    Takeover is keyed on an owner's silence, not on the task timeout: an entry whose idle time
    reaches ``takeover_after`` belongs to a dead or frozen node. The keep-alive interval is derived
    from it (a sixth), so no setting can put the refresh after the takeover; below
    ``MIN_TAKEOVER_AFTER`` the refresh would come every few hundred milliseconds, within the
    scheduling jitter of a loaded machine, and a live node could lose its work.
    """
    if not MIN_TAKEOVER_AFTER <= settings.takeover_after <= MAX_TAKEOVER_AFTER:
        raise ConfigError(
            f"PLUGIND_TAKEOVER_AFTER must be between {MIN_TAKEOVER_AFTER:g} and "
            f"{MAX_TAKEOVER_AFTER:g} seconds, got {settings.takeover_after:g}: below that a live "
            "node's keep-alives (every sixth of it) could come late and its work be run twice"
        )


def _int(name: str, raw: str, *, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _float(name: str, raw: str, *, low: float, high: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not low < value <= high:
        raise ConfigError(f"{name} must be greater than {low} and at most {high}, got {value}")
    return value


def _seconds(name: str, raw: str) -> float:
    """Seconds; upstream's ``DIFY_BACKWARDS_INVOCATION_*_TIMEOUT`` aliases are milliseconds."""
    if name.startswith("DIFY_BACKWARDS_INVOCATION_"):
        return _float(name, raw, low=0, high=86_400_000) / 1000
    return _float(name, raw, low=0, high=86_400)


def _bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _url(name: str, raw: str, schemes: tuple[str, ...]) -> str:
    if not raw.startswith(tuple(f"{s}://" for s in schemes)):
        raise ConfigError(f"{name} must start with one of {', '.join(s + '://' for s in schemes)}")
    return raw


def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.strip().upper() if name == "LOG_LEVEL" else raw.strip().lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return value


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read :class:`Settings` from ``env`` (default ``os.environ``); raises :class:`ConfigError`."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}

    def take(name: str, key: str, parse: Callable[[str, str], T], *aliases: str) -> None:
        """``values[key]`` from ``name``, else from the first alias that is set."""
        for candidate in (name, *aliases):
            raw = env.get(candidate)
            if raw is not None and raw != "":
                values[key] = parse(candidate, raw)
                return

    take("REDIS_URL", "redis_url", lambda n, r: _url(n, r, ("redis", "rediss", "unix")))
    if "redis_url" not in values:
        _from_dify_redis(env, values)
    take("DATABASE_URL", "database_url", lambda n, r: _url(n, r, ("postgres", "postgresql")))
    if "database_url" not in values:
        _from_dify_db(env, values)
    take("PLUGIND_DB_SCHEMA", "db_schema", _schema)
    take("LOG_LEVEL", "log_level", lambda n, r: _choice(n, r, LOG_LEVELS))
    take("LOG_FORMAT", "log_format", lambda n, r: _choice(n, r, ("text", "json")))
    take("PLUGIN_DIR", "plugin_dir", lambda n, r: Path(r), "PLUGIN_WORKING_PATH")
    take("PLUGIND_DATA_DIR", "embedded_dir", lambda n, r: Path(r))
    take("PLUGIN_WORKER_COUNT", "worker_count", lambda n, r: _int(n, r, low=1, high=4096))
    take(
        "PLUGIN_INSTALL_CONCURRENCY",
        "install_concurrency",
        lambda n, r: _int(n, r, low=1, high=64),
    )
    take(
        "PLUGIN_TASK_TIMEOUT",
        "task_timeout",
        lambda n, r: _float(n, r, low=0, high=86_400),
        "PLUGIN_MAX_EXECUTION_TIMEOUT",
    )
    take(
        "PLUGIN_INSTALL_TIMEOUT",
        "install_timeout",
        lambda n, r: _float(n, r, low=0, high=86_400),
        "PYTHON_ENV_INIT_TIMEOUT",
    )
    take(
        "PLUGIN_MAX_PACKAGE_SIZE",
        "max_package_size",
        lambda n, r: _int(n, r, low=1024, high=2**34),
        "MAX_PLUGIN_PACKAGE_SIZE",
    )
    take(
        "PLUGIN_MAX_RESULT_SIZE",
        "max_result_size",
        lambda n, r: _int(n, r, low=1024, high=2**31),
    )
    take(
        "PLUGIN_MEMORY_LIMIT",
        "plugin_memory_limit",
        lambda n, r: _int(n, r, low=16 * 1024 * 1024, high=2**40),
    )
    take("PLUGIN_INSTANCES", "plugin_instances", lambda n, r: _int(n, r, low=1, high=64))
    take(
        "PLUGIN_HEARTBEAT_TIMEOUT",
        "plugin_heartbeat_timeout",
        lambda n, r: _float(n, r, low=10, high=86_400),
    )
    take("PLUGIND_NAMESPACE", "namespace", _namespace)
    take("PLUGIND_MAX_DELIVERIES", "max_deliveries", lambda n, r: _int(n, r, low=1, high=1000))
    take("PLUGIND_DEDUPE_TTL", "dedupe_ttl", lambda n, r: _int(n, r, low=60, high=90 * 86_400))
    if env.get("PLUGIND_RECLAIM_GRACE"):
        raise ConfigError(
            "PLUGIND_RECLAIM_GRACE is no longer read: a dead node's work is taken over after "
            "PLUGIND_TAKEOVER_AFTER seconds of silence (default 30), whatever "
            "PLUGIN_TASK_TIMEOUT; remove it (and set PLUGIND_TAKEOVER_AFTER if 30 s does not suit)"
        )
    take(
        "PLUGIND_TAKEOVER_AFTER",
        "takeover_after",
        lambda n, r: _float(n, r, low=0, high=86_400),
    )
    take(
        "PLUGIND_STREAM_RETENTION",
        "stream_retention",
        lambda n, r: _float(n, r, low=0, high=90 * 86_400),
    )
    take(
        "PLUGIND_CONNECT_TIMEOUT",
        "connect_timeout",
        lambda n, r: _float(n, r, low=0, high=3600),
    )
    take(
        "PLUGIND_HTTP_PORT",
        "http_port",
        lambda n, r: _int(n, r, low=0, high=65_535),
        "SERVER_PORT",
    )
    take(
        "PLUGIND_GATEWAY_PORT",
        "gateway_port",
        lambda n, r: _int(n, r, low=0, high=65_535),
        "PLUGIN_REMOTE_INSTALLING_PORT",
    )
    take("PLUGIND_HTTP_HOST", "http_host", lambda n, r: r, "SERVER_HOST")
    take("PLUGIND_API_KEY", "api_key", lambda n, r: r, "SERVER_KEY")
    take(
        "DIFY_INNER_API_URL",
        "dify_api_url",
        lambda n, r: _url(n, r, ("http", "https")),
        "DIFY_API_URL",
    )
    take("DIFY_INNER_API_KEY", "dify_inner_api_key", lambda n, r: r)
    take(
        "DIFY_INNER_API_CONNECT_TIMEOUT",
        "dify_inner_api_connect_timeout",
        lambda n, r: _float(n, r, low=0, high=3600),
    )
    take(
        "DIFY_INNER_API_WRITE_TIMEOUT",
        "dify_inner_api_write_timeout",
        _seconds,
        "DIFY_BACKWARDS_INVOCATION_WRITE_TIMEOUT",
    )
    take(
        "DIFY_INNER_API_READ_TIMEOUT",
        "dify_inner_api_read_timeout",
        _seconds,
        "DIFY_BACKWARDS_INVOCATION_READ_TIMEOUT",
    )
    take(
        "DIFY_INNER_API_POOL_SIZE",
        "dify_inner_api_pool_size",
        lambda n, r: _int(n, r, low=1, high=10_000),
    )
    take(
        "PLUGIN_STORAGE_MAX_SIZE",
        "plugin_storage_max_size",
        lambda n, r: _int(n, r, low=1024, high=2**40),
        "PERSISTENCE_STORAGE_MAX_SIZE",
    )
    take(
        "PLUGIN_ENDPOINT_MAX_REQUEST_SIZE",
        "endpoint_max_request_size",
        lambda n, r: _int(n, r, low=1024, high=2**31),
    )
    take(
        "PLUGIN_ENDPOINT_MAX_RESPONSE_SIZE",
        "endpoint_max_response_size",
        lambda n, r: _int(n, r, low=1024, high=2**31),
    )
    take("PLUGIN_PYTHON", "plugin_python", lambda n, r: r)
    take(
        "PLUGIN_PIP_INDEX_URL",
        "plugin_pip_index_url",
        lambda n, r: _url(n, r, ("http", "https", "file")),
        "PIP_MIRROR_URL",
    )
    take("PLUGIN_OFFLINE", "plugin_offline", _bool)
    take("PLUGIN_VERIFY_SIGNATURE", "verify_signature", _bool, "FORCE_VERIFYING_SIGNATURE")
    take("PLUGIN_SIGNATURE_PUBLIC_KEYS", "signature_public_keys", _paths)
    take("PLUGIND_NODE", "node", lambda n, r: r)
    if values.get("verify_signature") and not values.get("signature_public_keys"):
        switch = "PLUGIN_VERIFY_SIGNATURE" if env.get("PLUGIN_VERIFY_SIGNATURE") else None
        raise ConfigError(
            f"{switch} is on but PLUGIN_SIGNATURE_PUBLIC_KEYS names no key"
            if switch
            else "FORCE_VERIFYING_SIGNATURE is true but PLUGIN_SIGNATURE_PUBLIC_KEYS names no "
            "key: plugind bundles no signing key, so give the path of each trusted public key "
            "(Dify's official key for marketplace packages), or set FORCE_VERIFYING_SIGNATURE="
            "false to accept unsigned packages"
        )
    if "plugin_dir" not in values and "embedded_dir" in values:
        values["plugin_dir"] = Path(str(values["embedded_dir"])) / "plugins"
    settings = Settings(**values)  # type: ignore[arg-type]
    check_settings(settings)
    return settings


def _from_dify_redis(env: Mapping[str, str], values: dict[str, object]) -> None:
    """``REDIS_URL`` from Dify's ``REDIS_HOST``, ``_PORT``, ``_USERNAME``, ``_PASSWORD``, ``_DB``
    and ``_USE_SSL``."""
    host = env.get("REDIS_HOST", "")
    if not host:
        return
    if _bool("REDIS_USE_SENTINEL", env.get("REDIS_USE_SENTINEL", "")):
        raise ConfigError(
            "REDIS_USE_SENTINEL: plugind does not speak Redis Sentinel; set REDIS_URL to the "
            "primary instead"
        )
    port = _int("REDIS_PORT", env.get("REDIS_PORT") or "6379", low=1, high=65_535)
    db = _int("REDIS_DB", env.get("REDIS_DB") or "0", low=0, high=1_000_000)
    scheme = "rediss" if _bool("REDIS_USE_SSL", env.get("REDIS_USE_SSL", "")) else "redis"
    user, password = env.get("REDIS_USERNAME", ""), env.get("REDIS_PASSWORD", "")
    auth = ""
    if user or password:
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if password else f"{user}@"
    values["redis_url"] = f"{scheme}://{auth}{_host(host)}:{port}/{db}"


def _from_dify_db(env: Mapping[str, str], values: dict[str, object]) -> None:
    """``DATABASE_URL`` from Dify's ``DB_HOST``/``PORT``/``USERNAME``/``PASSWORD``/``DATABASE``/
    ``SSL_MODE`` (Dify's default database for its daemon is ``dify_plugin``)."""
    host = env.get("DB_HOST", "")
    if not host:
        return
    db_type = (env.get("DB_TYPE") or "postgresql").strip().lower()
    if db_type not in ("postgresql", "postgres", "pgvector"):
        raise ConfigError(f"DB_TYPE must be postgresql (plugind needs PostgreSQL), got {db_type!r}")
    port = _int("DB_PORT", env.get("DB_PORT") or "5432", low=1, high=65_535)
    user = quote(env.get("DB_USERNAME") or "postgres", safe="")
    password = env.get("DB_PASSWORD", "")
    auth = f"{user}:{quote(password, safe='')}@" if password else f"{user}@"
    database = quote(env.get("DB_DATABASE") or "dify_plugin", safe="")
    ssl_mode = (env.get("DB_SSL_MODE") or "").strip().lower()
    modes = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
    if ssl_mode and ssl_mode not in modes:
        raise ConfigError(f"DB_SSL_MODE must be one of {', '.join(modes)}, got {ssl_mode!r}")
    query = f"?sslmode={ssl_mode}" if ssl_mode else ""
    values["database_url"] = f"postgresql://{auth}{_host(host)}:{port}/{database}{query}"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _schema(name: str, raw: str) -> str:
    if not _SCHEMA_RE.match(raw):
        raise ConfigError(
            f"{name} must be a lower-case SQL name (letters, digits, _; 63 at most), got {raw!r}"
        )
    return raw


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser()))


def _paths(name: str, raw: str) -> tuple[Path, ...]:
    paths = tuple(Path(p.strip()) for p in raw.split(",") if p.strip())
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"{name}: no such file {str(path)!r}")
    return paths


def _namespace(name: str, raw: str) -> str:
    if not _NAMESPACE_RE.match(raw) or "{" in raw or "}" in raw:
        raise ConfigError(f"{name} must be 1-64 letters, digits or _ . : -, got {raw!r}")
    return raw


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
