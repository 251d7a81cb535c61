"""Settings: one frozen object built from defaults, the env file and the environment.

Each setting is read under one name: the guide's names verbatim (`SECRET_KEY`, ...) and
`APPLIANCE_*` for the rest. Unknown `APPLIANCE_*` names and invalid values are errors that
name the key and the form it expects.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from appliance.config_docs import DOCS
from appliance.envfile import DEFAULT_ENV_FILE, EnvFileError, parse_env_file
from appliance.llm.keep_alive import InvalidKeepAlive, parse_keep_alive
from appliance.llm.remote_config import RemoteConfig, RemoteConfigError, plaintext_problem
from appliance.search.config import SearchConfig, SearchConfigError, parse_allow
from appliance.tls_files import tls_problems

PREFIX: Final = "APPLIANCE_"
ENV_FILE_NAME: Final = "APPLIANCE_ENV_FILE"
# Names read from the environment that are not settings themselves.
CONTROL_NAMES: Final = frozenset({"APPLIANCE_ENV_FILE", "APPLIANCE_SYSTEMCTL"})
SECRET_NAMES: Final = frozenset(
    {
        "SECRET_KEY",
        "PRIVACY_SALT",
        "SECRET_KEY_PREVIOUS",
        "PRIVACY_SALT_PREVIOUS",
        "APPLIANCE_SEARCH_API_KEY",
    }
)
MIN_SECRET_KEY_CHARS: Final = 32
# Where the packaged daemon keeps its data and (RuntimeDirectory=) its sockets.
SYSTEM_STATE_DIR: Final = "/var/lib/appliance"
SYSTEM_RUNTIME_DIR: Final = "/run/appliance"

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """Settings are invalid; the message is one line for the operator."""


# ASCII digits only (`\d` also matches other scripts' digits), and few enough for int().
_BIND = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(?P<port>[0-9]{1,5})$")
_MEMORY = re.compile(r"^[0-9]{1,15}(b|kb|mb|gb)?$", re.IGNORECASE)
_DURATION = re.compile(r"^(?P<amount>[0-9]{1,12})(?P<unit>s|m|h|d)?$")
_DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS: Final = {"": 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_HOST = re.compile(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*")


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The effective configuration. Field names are the variables' names in lower case."""

    env: Literal["development", "production"] = msgspec.field(
        default="development", name="APPLIANCE_ENV"
    )
    bind: str = msgspec.field(default="127.0.0.1:8000", name="APPLIANCE_BIND")
    state_dir: str = msgspec.field(default=SYSTEM_STATE_DIR, name="APPLIANCE_STATE_DIR")
    models_dir: str = msgspec.field(default="", name="APPLIANCE_MODELS_DIR")
    backup_dir: str = msgspec.field(default="", name="APPLIANCE_BACKUP_DIR")
    runtime_dir: str = msgspec.field(default="", name="APPLIANCE_RUNTIME_DIR")
    redis_url: str = msgspec.field(default="", name="APPLIANCE_REDIS_URL")
    redis_maxmemory: str = msgspec.field(default="256mb", name="APPLIANCE_REDIS_MAXMEMORY")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = msgspec.field(
        default="INFO", name="APPLIANCE_LOG_LEVEL"
    )
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = msgspec.field(
        default=1_048_576, name="APPLIANCE_MAX_BODY_BYTES"
    )
    graceful_timeout: PositiveFloat = msgspec.field(default=30.0, name="APPLIANCE_GRACEFUL_TIMEOUT")
    min_free_disk_mb: Annotated[int, msgspec.Meta(ge=0)] = msgspec.field(
        default=100, name="APPLIANCE_MIN_FREE_DISK_MB"
    )
    restart_limit: PositiveInt = msgspec.field(default=5, name="APPLIANCE_RESTART_LIMIT")
    restart_window: PositiveFloat = msgspec.field(default=60.0, name="APPLIANCE_RESTART_WINDOW")
    default_model: str = msgspec.field(default="", name="APPLIANCE_DEFAULT_MODEL")
    preload: str = msgspec.field(default="true", name="APPLIANCE_PRELOAD")
    context_size: Annotated[int, msgspec.Meta(ge=128)] = msgspec.field(
        default=4096, name="APPLIANCE_CONTEXT_SIZE"
    )
    threads: Annotated[int, msgspec.Meta(ge=0)] = msgspec.field(default=0, name="APPLIANCE_THREADS")
    gpu_layers: Annotated[int, msgspec.Meta(ge=-1)] = msgspec.field(
        default=0, name="APPLIANCE_GPU_LAYERS"
    )
    max_queue: Annotated[int, msgspec.Meta(ge=0)] = msgspec.field(
        default=8, name="APPLIANCE_MAX_QUEUE"
    )
    parallel: Annotated[int, msgspec.Meta(ge=1, le=64)] = msgspec.field(
        default=4, name="APPLIANCE_PARALLEL"
    )
    request_timeout: PositiveFloat = msgspec.field(default=300.0, name="APPLIANCE_REQUEST_TIMEOUT")
    max_tokens_limit: PositiveInt = msgspec.field(default=4096, name="APPLIANCE_MAX_TOKENS")
    default_max_tokens: PositiveInt = msgspec.field(
        default=512, name="APPLIANCE_DEFAULT_MAX_TOKENS"
    )
    worker_max_requests: Annotated[int, msgspec.Meta(ge=0)] = msgspec.field(
        default=1000, name="APPLIANCE_WORKER_MAX_REQUESTS"
    )
    worker_max_rss_mb: Annotated[int, msgspec.Meta(ge=0)] = msgspec.field(
        default=3072, name="APPLIANCE_WORKER_MAX_RSS_MB"
    )
    secret_key: str = msgspec.field(default="", name="SECRET_KEY")
    privacy_salt: str = msgspec.field(default="", name="PRIVACY_SALT")
    secret_key_previous: str = msgspec.field(default="", name="SECRET_KEY_PREVIOUS")
    privacy_salt_previous: str = msgspec.field(default="", name="PRIVACY_SALT_PREVIOUS")
    admin_key_hash: str = msgspec.field(default="", name="APPLIANCE_ADMIN_KEY_HASH")
    tokens_per_day: Annotated[int, msgspec.Meta(ge=0)] = msgspec.field(
        default=0, name="APPLIANCE_TOKENS_PER_DAY"
    )
    tokens_per_month: Annotated[int, msgspec.Meta(ge=0)] = msgspec.field(
        default=0, name="APPLIANCE_TOKENS_PER_MONTH"
    )
    rate_limit: Annotated[int, msgspec.Meta(ge=0)] = msgspec.field(
        default=600, name="APPLIANCE_RATE_LIMIT"
    )
    max_streams_per_key: Annotated[int, msgspec.Meta(ge=0)] = msgspec.field(
        default=4, name="APPLIANCE_MAX_STREAMS_PER_KEY"
    )
    auth: Literal["on", "off"] = msgspec.field(default="on", name="APPLIANCE_AUTH")
    backup_interval: str = msgspec.field(default="24h", name="APPLIANCE_BACKUP_INTERVAL")
    backup_keep: PositiveInt = msgspec.field(default=10, name="APPLIANCE_BACKUP_KEEP")
    retention_sweep_seconds: PositiveFloat = msgspec.field(
        default=3600.0, name="APPLIANCE_RETENTION_SWEEP_SECONDS"
    )
    cors_origins: str = msgspec.field(default="", name="BACKEND_CORS_ORIGINS")
    privacy_encrypt_at_rest: bool = msgspec.field(default=True, name="PRIVACY_ENCRYPT_AT_REST")
    privacy_redact_aggressiveness: Literal["off", "standard", "strict"] = msgspec.field(
        default="strict", name="PRIVACY_REDACT_AGGRESSIVENESS"
    )
    privacy_retention_days: PositiveInt = msgspec.field(default=7, name="PRIVACY_RETENTION_DAYS")
    budget_enforce: bool = msgspec.field(default=True, name="BUDGET_ENFORCE")
    search_enabled: bool = msgspec.field(default=False, name="SEARCH_ENABLED")
    remote_llm_enabled: bool = msgspec.field(default=False, name="REMOTE_LLM_ENABLED")
    remote_llm_url: str = msgspec.field(default="", name="APPLIANCE_REMOTE_LLM_URL")
    remote_llm_model: str = msgspec.field(default="", name="APPLIANCE_REMOTE_LLM_MODEL")
    remote_llm_key_file: str = msgspec.field(default="", name="APPLIANCE_REMOTE_LLM_KEY_FILE")
    remote_timeout: PositiveFloat = msgspec.field(default=60.0, name="APPLIANCE_REMOTE_TIMEOUT")
    remote_price_per_1k: Annotated[float, msgspec.Meta(ge=0)] = msgspec.field(
        default=0.0, name="APPLIANCE_REMOTE_PRICE_PER_1K_TOKENS"
    )
    remote_budget_monthly: Annotated[float, msgspec.Meta(ge=0)] = msgspec.field(
        default=0.0, name="APPLIANCE_REMOTE_BUDGET_MONTHLY"
    )
    npu_force_enable: bool = msgspec.field(default=False, name="NPU_FORCE_ENABLE")
    console: bool = msgspec.field(default=True, name="APPLIANCE_CONSOLE")
    # The request edge: proxies, TLS, production refusals (docs/security.md).
    trusted_proxies: str = msgspec.field(default="", name="APPLIANCE_TRUSTED_PROXIES")
    proxy_header: Literal["x-forwarded-for", "forwarded"] = msgspec.field(
        default="x-forwarded-for", name="APPLIANCE_PROXY_HEADER"
    )
    tls_cert: str = msgspec.field(default="", name="APPLIANCE_TLS_CERT")
    tls_key: str = msgspec.field(default="", name="APPLIANCE_TLS_KEY")
    remote_llm_allow_plaintext: bool = msgspec.field(
        default=False, name="APPLIANCE_REMOTE_LLM_ALLOW_PLAINTEXT"
    )
    # Where these settings were read from (set by load_settings, never by the env file).
    env_file: str = msgspec.field(default="", name="APPLIANCE_ENV_FILE")
    restore_previous_keep: PositiveInt = msgspec.field(
        default=3, name="APPLIANCE_RESTORE_PREVIOUS_KEEP"
    )
    restore_previous_max_days: Annotated[int, msgspec.Meta(ge=0)] = msgspec.field(
        default=30, name="APPLIANCE_RESTORE_PREVIOUS_MAX_DAYS"
    )
    # Generation under pressure (docs/generation.md).
    stream_stall_seconds: PositiveFloat = msgspec.field(
        default=30.0, name="APPLIANCE_STREAM_STALL_SECONDS"
    )
    parallel_per_key: Annotated[int, msgspec.Meta(ge=0, le=64)] = msgspec.field(
        default=0, name="APPLIANCE_PARALLEL_PER_KEY"
    )
    # Resident models, keep-alive and pulls (docs/models.md).
    model_memory: str = msgspec.field(default="", name="APPLIANCE_MODEL_MEMORY")
    keep_alive: str = msgspec.field(default="5m", name="APPLIANCE_KEEP_ALIVE")
    pull_hosts: str = msgspec.field(default="", name="APPLIANCE_PULL_HOSTS")
    pull_max_bytes: str = msgspec.field(default="64gb", name="APPLIANCE_PULL_MAX_BYTES")
    # Web search, under SEARCH_ENABLED (docs/search.md).
    search_provider: Literal["searxng", "brave"] = msgspec.field(
        default="searxng", name="APPLIANCE_SEARCH_PROVIDER"
    )
    search_url: str = msgspec.field(default="", name="APPLIANCE_SEARCH_URL")
    search_api_key: str = msgspec.field(default="", name="APPLIANCE_SEARCH_API_KEY")
    search_results: Annotated[int, msgspec.Meta(ge=1, le=20)] = msgspec.field(
        default=5, name="APPLIANCE_SEARCH_RESULTS"
    )
    search_timeout: PositiveFloat = msgspec.field(default=5.0, name="APPLIANCE_SEARCH_TIMEOUT")
    search_query_chars: Annotated[int, msgspec.Meta(ge=16, le=1000)] = msgspec.field(
        default=200, name="APPLIANCE_SEARCH_QUERY_CHARS"
    )
    search_budget_daily: Annotated[int, msgspec.Meta(ge=0)] = msgspec.field(
        default=100, name="SEARCH_BUDGET_DAILY"
    )
    search_allow: str = msgspec.field(default="admin,user", name="APPLIANCE_SEARCH_ALLOW")

    def __post_init__(self) -> None:
        bind = _BIND.match(self.bind)
        if bind is None or int(bind["port"]) > 65535:
            raise ValueError("APPLIANCE_BIND")
        if not _MEMORY.match(self.redis_maxmemory):
            raise ValueError("APPLIANCE_REDIS_MAXMEMORY")
        if self.admin_key_hash and not re.fullmatch(
            r"[0-9a-f]{16}:(v2:)?[0-9a-f]{64}", self.admin_key_hash
        ):
            raise ValueError("APPLIANCE_ADMIN_KEY_HASH")
        if not _DURATION.match(self.backup_interval):
            raise ValueError("APPLIANCE_BACKUP_INTERVAL")
        if self.redis_url and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
        ):
            raise ValueError("APPLIANCE_REDIS_URL")
        for name in ("state_dir", "models_dir", "backup_dir", "runtime_dir"):
            if not os.path.isabs(getattr(self, name)):
                raise ValueError(_field_env_name(name))
        parse_cors_origins(self.cors_origins)
        parse_networks(self.trusted_proxies)
        for name in ("tls_cert", "tls_key"):
            if getattr(self, name) and not os.path.isabs(getattr(self, name)):
                raise ValueError(_field_env_name(name))
        self.preload_models  # noqa: B018 - raises for an invalid list
        if self.model_memory and not _MEMORY.match(self.model_memory):
            raise ValueError("APPLIANCE_MODEL_MEMORY")
        if not _MEMORY.match(self.pull_max_bytes) or not parse_size(self.pull_max_bytes):
            raise ValueError("APPLIANCE_PULL_MAX_BYTES")
        try:
            parse_keep_alive(self.keep_alive)
        except InvalidKeepAlive:
            raise ValueError("APPLIANCE_KEEP_ALIVE") from None
        parse_hosts(self.pull_hosts)

    @property
    def backup_interval_seconds(self) -> int:
        """0 turns scheduled backups off."""
        match = _DURATION.match(self.backup_interval)
        assert match is not None  # validated in __post_init__
        return int(match["amount"]) * _DURATION_UNITS[match["unit"] or "s"]

    @property
    def preload_models(self) -> tuple[str, ...] | None:
        """APPLIANCE_PRELOAD: None for the default model (true), () for none (false), else
        the models named."""
        text = self.preload.strip()
        if text.lower() in _TRUE:
            return None
        if text.lower() in _FALSE or not text:
            return ()
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        if not all(_MODEL_NAME.fullmatch(name) and ".." not in name for name in names):
            raise ValueError("APPLIANCE_PRELOAD")
        return tuple(dict.fromkeys(names))

    @property
    def model_memory_bytes(self) -> int | None:
        """APPLIANCE_MODEL_MEMORY in bytes; None when unset (a share of the box's memory)."""
        return parse_size(self.model_memory) if self.model_memory else None

    @property
    def keep_alive_seconds(self) -> float:
        return parse_keep_alive(self.keep_alive)

    @property
    def pull_max_size(self) -> int:
        return parse_size(self.pull_max_bytes)

    @property
    def pull_allowed_hosts(self) -> tuple[str, ...]:
        return parse_hosts(self.pull_hosts)

    @property
    def host(self) -> str:
        return self.bind.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.bind.rsplit(":", 1)[1])

    @property
    def allowed_origins(self) -> tuple[str, ...]:
        return parse_cors_origins(self.cors_origins)

    @property
    def trusted_networks(self) -> tuple[Network, ...]:
        return parse_networks(self.trusted_proxies)

    @property
    def tls(self) -> bool:
        """Whether the API is served over HTTPS (both files set; checked at start)."""
        return bool(self.tls_cert and self.tls_key)

    @property
    def redis_socket(self) -> Path:
        return Path(self.runtime_dir) / "redis.sock"

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url


ENV_NAMES: Final = frozenset(DOCS)
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _field_env_name(field_name: str) -> str:
    for field in msgspec.structs.fields(Settings):
        if field.name == field_name:
            return field.encode_name
    raise KeyError(field_name)


def parse_cors_origins(raw: str) -> tuple[str, ...]:
    """Origins from a comma-separated list or a JSON array; each must be `*` or scheme://host."""
    text = raw.strip()
    if not text:
        return ()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, a number over 4300 digits, deep nesting
            raise ValueError("BACKEND_CORS_ORIGINS") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError("BACKEND_CORS_ORIGINS")
    else:
        items = text.split(",")
    origins = tuple(item.strip().rstrip("/") for item in items if item.strip())
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", origin):
            raise ValueError("BACKEND_CORS_ORIGINS")
    return origins


def parse_size(text: str) -> int:
    """`4gb`, `512mb`, `1000000` (bytes) in bytes; the form is checked by _MEMORY."""
    match = re.fullmatch(r"([0-9]+)([a-z]*)", text.strip().lower())
    if match is None or match[2] not in _SIZE_UNITS:
        raise ValueError(text)
    return int(match[1]) * _SIZE_UNITS[match[2]]


def parse_hosts(raw: str) -> tuple[str, ...]:
    """Host names, comma-separated; `*.example.com` stands for every name under it."""
    hosts = tuple(item.strip().lower().rstrip(".") for item in raw.split(",") if item.strip())
    if not all(_HOST.fullmatch(host) and len(host) <= 253 for host in hosts):
        raise ValueError("APPLIANCE_PULL_HOSTS")
    return hosts


def parse_networks(raw: str) -> tuple[Network, ...]:
    """Addresses and networks, comma-separated (`127.0.0.1, 10.0.0.0/8, ::1`); a bare
    address is a network of one. Host bits set in a network are refused (a typo)."""
    networks = []
    for item in raw.split(","):
        text = item.strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError:
            raise ValueError("APPLIANCE_TRUSTED_PROXIES") from None
    return tuple(networks)


def _normalise(name: str, value: str) -> Any:
    value = value.strip()
    kind = msgspec.structs.fields(Settings)
    for field in kind:
        if field.encode_name != name:
            continue
        if field.type is bool:
            lowered = value.lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
        if name == "APPLIANCE_LOG_LEVEL":
            return value.upper()
        if name in (
            "APPLIANCE_ENV",
            "PRIVACY_REDACT_AGGRESSIVENESS",
            "APPLIANCE_PROXY_HEADER",
            "APPLIANCE_SEARCH_PROVIDER",
        ):
            return value.lower()
    return value


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: Path | None = None
) -> Settings:
    """Defaults < env file < environment. `env_file=None` means the default one if present."""
    environ = dict(os.environ if environ is None else environ)
    unknown = sorted(
        key
        for key in environ
        if key.startswith(PREFIX) and key not in ENV_NAMES and key not in CONTROL_NAMES
    )
    if unknown:
        raise ConfigError(
            f"unknown setting {unknown[0]} in the environment; known APPLIANCE_* settings: "
            + ", ".join(sorted(n for n in ENV_NAMES if n.startswith(PREFIX)))
        )
    if env_file is None and environ.get("APPLIANCE_ENV_FILE"):
        env_file = Path(environ["APPLIANCE_ENV_FILE"])
    raw: dict[str, str] = {}
    path: Path | None = None
    if env_file is not None or DEFAULT_ENV_FILE.exists():
        path = env_file if env_file is not None else DEFAULT_ENV_FILE
        try:
            from_file = parse_env_file(path)
        except EnvFileError as exc:
            raise ConfigError(str(exc)) from None
        for key in from_file:
            if key not in ENV_NAMES:
                raise ConfigError(f"unknown setting {key} in env file {path}")
            if key == ENV_FILE_NAME:
                raise ConfigError(
                    f"{ENV_FILE_NAME} in env file {path}: an env file cannot name another; "
                    "remove the line"
                )
        raw.update(from_file)
    raw.update({k: v for k, v in environ.items() if k in ENV_NAMES})
    raw[ENV_FILE_NAME] = str(path) if path is not None else ""
    _apply_directory_defaults(raw, environ)
    for name, value in raw.items():
        if not _is_utf8(value):
            # Undecodable bytes in the environment come as lone surrogates.
            raise ConfigError(f"{name} holds bytes that are not UTF-8 text; write it in UTF-8")
    values = {name: _normalise(name, value) for name, value in raw.items()}
    try:
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, values)) from None


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _apply_directory_defaults(raw: dict[str, str], environ: Mapping[str, str]) -> None:
    # systemd passes StateDirectory=/RuntimeDirectory= as (colon-separated) absolute paths.
    if not raw.get("APPLIANCE_STATE_DIR"):
        systemd_state = environ.get("STATE_DIRECTORY", "").split(":")[0]
        raw["APPLIANCE_STATE_DIR"] = systemd_state or SYSTEM_STATE_DIR
    state = raw["APPLIANCE_STATE_DIR"]
    if not raw.get("APPLIANCE_MODELS_DIR"):
        raw["APPLIANCE_MODELS_DIR"] = os.path.join(state, "models")
    if not raw.get("APPLIANCE_BACKUP_DIR"):
        raw["APPLIANCE_BACKUP_DIR"] = os.path.join(state, "backups")
    if not raw.get("APPLIANCE_RUNTIME_DIR"):
        # The installed layout's commands (run by root, without $RUNTIME_DIRECTORY) must
        # find the daemon's sockets where the unit's RuntimeDirectory= puts them.
        systemd_runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        installed = state == SYSTEM_STATE_DIR and SYSTEM_RUNTIME_DIR
        raw["APPLIANCE_RUNTIME_DIR"] = systemd_runtime or installed or os.path.join(state, "run")


def _explain(exc: msgspec.ValidationError, values: Mapping[str, Any]) -> str:
    message = str(exc)
    match = re.search(r"at `\$\.(\w+)`", message)
    # __post_init__ raises ValueError(<name>); msgspec reports its text as the message.
    name = match.group(1) if match else message.split(" - ")[0].strip()
    doc = DOCS.get(name)
    if doc is None:
        return f"invalid settings: {message}"
    if name in SECRET_NAMES:
        return f"{name} is invalid; expected {doc.form}"
    shown = str(values.get(name, ""))[:60]
    if not shown.isprintable():  # a line break or control character: one line, escaped
        shown = repr(shown)
    return f"{name}={shown} is invalid; expected {doc.form}"


def production_problems(settings: Settings) -> list[str]:
    """What stops this configuration from running in production, one line each."""
    if settings.env != "production":
        return []
    problems = []
    if not settings.secret_key:
        problems.append(
            "SECRET_KEY is not set; production needs 32 or more characters "
            "(generate an env file with: appliance init)"
        )
    elif len(settings.secret_key) < MIN_SECRET_KEY_CHARS:
        problems.append(
            f"SECRET_KEY is {len(settings.secret_key)} characters; production needs "
            f"{MIN_SECRET_KEY_CHARS} or more (generate one with: appliance init)"
        )
    if not settings.privacy_salt:
        problems.append(
            "PRIVACY_SALT is not set; production needs one (generate one with: appliance init)"
        )
    if "*" in settings.allowed_origins:
        problems.append(
            "BACKEND_CORS_ORIGINS allows '*'; production needs the exact origins of your sites"
        )
    if not settings.privacy_encrypt_at_rest:
        problems.append(
            "PRIVACY_ENCRYPT_AT_REST=false is refused in production: conversations would lie "
            "readable in Redis, its files and every backup; remove the line (default true)"
        )
    if settings.remote_llm_enabled and not settings.remote_llm_allow_plaintext:
        plaintext = plaintext_problem(settings.remote_llm_url)
        if plaintext:
            problems.append(plaintext)
    return problems


def env_file_problems(settings: Settings) -> list[str]:
    """Production refuses an env file that others than its owner may read or change (it
    holds SECRET_KEY and PRIVACY_SALT, which open every stored conversation)."""
    if settings.env != "production" or not settings.env_file:
        return []
    try:
        mode = stat.S_IMODE(os.stat(settings.env_file).st_mode)
    except OSError:
        return []  # it was read a moment ago; a file gone since is not this check's business
    if not mode & 0o077:
        return []
    return [
        f"env file {settings.env_file} has mode {mode:04o}: group or others may read its "
        f"secrets; production needs 0600 (run: chmod 600 {settings.env_file})"
    ]


def startup_problems(settings: Settings) -> list[str]:
    """Everything that stops the daemon from starting with these settings."""
    problems = production_problems(settings)
    problems.extend(env_file_problems(settings))
    problems.extend(tls_problems(settings.tls_cert, settings.tls_key, settings.env))
    if settings.search_enabled:
        problems.extend(search_problems(settings))
    if settings.remote_llm_enabled:
        problems.extend(remote_problems(settings))
    if settings.auth == "off":
        if settings.env == "production":
            problems.append("APPLIANCE_AUTH=off is refused in production; remove it")
        elif not _loopback_host(settings.host):
            problems.append(
                f"APPLIANCE_AUTH=off needs a loopback APPLIANCE_BIND (127.0.0.1), not "
                f"{settings.host}: without keys anyone who reaches the port is admin"
            )
    return problems


def remote_problems(settings: Settings) -> list[str]:
    """Why the remote LLM settings are unusable (reads the key file), one line at most."""
    if not settings.remote_llm_url:
        return [
            "REMOTE_LLM_ENABLED=true needs APPLIANCE_REMOTE_LLM_URL (the remote server's "
            "OpenAI-compatible base URL, e.g. https://api.example.com/v1)"
        ]
    if not settings.remote_llm_model:
        return ["REMOTE_LLM_ENABLED=true needs APPLIANCE_REMOTE_LLM_MODEL (its model name)"]
    try:
        remote_config(settings)
    except RemoteConfigError as exc:
        return [str(exc)]
    return []


def remote_config(settings: Settings) -> RemoteConfig:
    """The remote LLM's config from the settings, its key read from the key file."""
    return RemoteConfig.load(
        url=settings.remote_llm_url,
        model=settings.remote_llm_model,
        key_file=settings.remote_llm_key_file,
        timeout=settings.remote_timeout,
        price_per_1k=settings.remote_price_per_1k,
    )


def search_problems(settings: Settings) -> list[str]:
    """Why the search settings are unusable, one line at most."""
    try:
        config = search_config(settings)
    except SearchConfigError as exc:
        return [str(exc)]
    if not config.allow:
        return [
            "APPLIANCE_SEARCH_ALLOW is empty, so no key could search; name the scopes or keys "
            "that may (e.g. admin, user), or set SEARCH_ENABLED=false"
        ]
    return []


def search_config(settings: Settings) -> SearchConfig:
    """The search provider's config from the settings (SearchConfigError when unusable)."""
    return SearchConfig(
        provider=settings.search_provider,
        url=settings.search_url,
        api_key=settings.search_api_key,
        results=settings.search_results,
        timeout=settings.search_timeout,
        query_chars=settings.search_query_chars,
        budget_daily=settings.search_budget_daily,
        allow=parse_allow(settings.search_allow),
    )


def _loopback_host(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def masked(settings: Settings) -> dict[str, str]:
    """Every effective setting by its variable name, secrets replaced by a description."""
    shown: dict[str, str] = {}
    for field in msgspec.structs.fields(Settings):
        value = getattr(settings, field.name)
        if field.encode_name in SECRET_NAMES:
            shown[field.encode_name] = f"set ({len(value)} characters)" if value else "not set"
        elif isinstance(value, bool):
            shown[field.encode_name] = "true" if value else "false"
        else:
            shown[field.encode_name] = str(value)
    return shown
