"""What an operator reads about each setting: its form and meaning, by variable name.

Errors for invalid values quote the form; the names are the settings that exist (unknown
APPLIANCE_* names are refused), and a test checks that docs/configuration.md's table lists
every one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class SettingDoc:
    """What an operator reads about one setting (the settings table, error messages)."""

    form: str
    meaning: str


DOCS: Final[dict[str, SettingDoc]] = {
    "APPLIANCE_ENV": SettingDoc("development | production", "production refuses weak secrets"),
    "APPLIANCE_BIND": SettingDoc("HOST:PORT, e.g. 127.0.0.1:8000", "where the HTTP API listens"),
    "APPLIANCE_STATE_DIR": SettingDoc(
        "absolute path", "data; default $STATE_DIRECTORY under systemd, else /var/lib/appliance"
    ),
    "APPLIANCE_MODELS_DIR": SettingDoc("absolute path", "GGUF models; default <state>/models"),
    "APPLIANCE_BACKUP_DIR": SettingDoc("absolute path", "backups; default <state>/backups"),
    "APPLIANCE_ADMIN_KEY_HASH": SettingDoc(
        "written by appliance init", "the first admin key (id and hash; never the key)"
    ),
    "APPLIANCE_TOKENS_PER_DAY": SettingDoc(
        "tokens, 0 = no limit", "default daily token budget of a key (keys may override)"
    ),
    "APPLIANCE_TOKENS_PER_MONTH": SettingDoc(
        "tokens, 0 = no limit", "default monthly token budget of a key (keys may override)"
    ),
    "APPLIANCE_RATE_LIMIT": SettingDoc(
        "requests per minute per API key; 0 = no limit", "beyond it 429 with Retry-After"
    ),
    "APPLIANCE_MAX_STREAMS_PER_KEY": SettingDoc(
        "whole number; 0 = no limit", "streamed generations one key may have open at once"
    ),
    "APPLIANCE_AUTH": SettingDoc(
        "on | off", "API keys; off only in development on a loopback bind (one local admin)"
    ),
    "APPLIANCE_BACKUP_INTERVAL": SettingDoc(
        "duration such as 24h, 30m, 3600 (seconds); 0 = off", "time between scheduled backups"
    ),
    "APPLIANCE_BACKUP_KEEP": SettingDoc(
        "whole number, 1 or more", "backups kept; older ones are deleted after a new one"
    ),
    "APPLIANCE_RUNTIME_DIR": SettingDoc(
        "absolute path", "sockets; default $RUNTIME_DIRECTORY under systemd, else <state>/run"
    ),
    "APPLIANCE_REDIS_URL": SettingDoc(
        "redis://, rediss:// or unix:// URL of one server; redis+cluster://HOST:PORT"
        "[,HOST:PORT...] (or rediss+cluster://) for a Redis Cluster",
        "external Redis shared by several appliances; empty starts the embedded one",
    ),
    "APPLIANCE_REDIS_MAXMEMORY": SettingDoc(
        "size such as 256mb", "embedded Redis memory cap (writes refused beyond it)"
    ),
    "APPLIANCE_LOG_LEVEL": SettingDoc("DEBUG | INFO | WARNING | ERROR", "log threshold"),
    "APPLIANCE_MAX_BODY_BYTES": SettingDoc("bytes, 1024 or more", "larger request bodies get 413"),
    "APPLIANCE_GRACEFUL_TIMEOUT": SettingDoc(
        "seconds, above 0", "how long requests in flight may finish on stop"
    ),
    "APPLIANCE_MIN_FREE_DISK_MB": SettingDoc(
        "megabytes, 0 or more", "ready turns 503 below this free space in the state dir"
    ),
    "APPLIANCE_RESTART_LIMIT": SettingDoc(
        "whole number, 1 or more", "service failures tolerated per window before exiting"
    ),
    "APPLIANCE_RESTART_WINDOW": SettingDoc("seconds, above 0", "the window for the restart limit"),
    "APPLIANCE_DEFAULT_MODEL": SettingDoc(
        "a model name", "model used when a request names none; default: the only or first one"
    ),
    "APPLIANCE_PRELOAD": SettingDoc(
        "true | false | comma-separated model names",
        "models loaded before READY (true: the default model); they stay resident until unloaded",
    ),
    "APPLIANCE_CONTEXT_SIZE": SettingDoc(
        "tokens, 128 or more", "context window (capped at the model's own)"
    ),
    "APPLIANCE_THREADS": SettingDoc(
        "whole number; 0 = usable cores",
        "llama.cpp threads of each model's worker, each bound to a core of its own "
        "(OMP_PROC_BIND or OMP_PLACES in the environment: yours apply)",
    ),
    "APPLIANCE_GPU_LAYERS": SettingDoc(
        "whole number; -1 = all", "layers offloaded to a GPU backend, if built with one"
    ),
    "APPLIANCE_PARALLEL": SettingDoc(
        "whole number, 1 to 64", "generations decoded together (continuous batching)"
    ),
    "APPLIANCE_MAX_QUEUE": SettingDoc(
        "whole number", "generations that may wait; beyond it 429 with Retry-After"
    ),
    "APPLIANCE_REQUEST_TIMEOUT": SettingDoc(
        "seconds, above 0", "deadline of one generation, queueing included"
    ),
    "APPLIANCE_MAX_TOKENS": SettingDoc("whole number, 1 or more", "largest max_tokens accepted"),
    "APPLIANCE_DEFAULT_MAX_TOKENS": SettingDoc(
        "whole number, 1 or more", "max_tokens when a request gives none"
    ),
    "APPLIANCE_WORKER_MAX_REQUESTS": SettingDoc(
        "whole number; 0 = never", "recycle the worker after this many requests"
    ),
    "APPLIANCE_WORKER_MAX_RSS_MB": SettingDoc(
        "megabytes; 0 = no limit", "recycle the worker when its RSS grows past this"
    ),
    "SECRET_KEY": SettingDoc("32+ characters", "root secret; required in production"),
    "PRIVACY_SALT": SettingDoc(
        "text", "salt for key derivation and hashed ids; required in production"
    ),
    "SECRET_KEY_PREVIOUS": SettingDoc(
        "the SECRET_KEY before a rotation", "keeps data sealed under it readable until rotated"
    ),
    "PRIVACY_SALT_PREVIOUS": SettingDoc(
        "the PRIVACY_SALT before a rotation", "goes with SECRET_KEY_PREVIOUS"
    ),
    "APPLIANCE_RETENTION_SWEEP_SECONDS": SettingDoc(
        "seconds, above 0", "how often conversations past PRIVACY_RETENTION_DAYS are deleted"
    ),
    "BACKEND_CORS_ORIGINS": SettingDoc(
        "comma-separated or JSON list of origins", "browser origins allowed (none by default)"
    ),
    "PRIVACY_ENCRYPT_AT_REST": SettingDoc("true | false", "seal stored content"),
    "PRIVACY_REDACT_AGGRESSIVENESS": SettingDoc("off | standard | strict", "redaction level"),
    "PRIVACY_RETENTION_DAYS": SettingDoc("whole number of days, 1 or more", "retention period"),
    "BUDGET_ENFORCE": SettingDoc("true | false", "enforce token budgets"),
    "SEARCH_ENABLED": SettingDoc(
        "true | false", "web search through APPLIANCE_SEARCH_URL (off: nothing is contacted)"
    ),
    "REMOTE_LLM_ENABLED": SettingDoc("true | false", "remote LLM (off: no outbound connection)"),
    "APPLIANCE_REMOTE_LLM_URL": SettingDoc(
        "https:// base URL ending in /v1", "OpenAI-compatible server of the remote LLM"
    ),
    "APPLIANCE_REMOTE_LLM_MODEL": SettingDoc(
        "the remote server's model name", "clients ask for it as remote:<name>"
    ),
    "APPLIANCE_REMOTE_LLM_KEY_FILE": SettingDoc(
        "absolute path, mode 0600", "file holding the remote LLM's API key"
    ),
    "APPLIANCE_REMOTE_TIMEOUT": SettingDoc(
        "seconds, above 0", "wait for the remote's answer and for each streamed piece"
    ),
    "APPLIANCE_REMOTE_PRICE_PER_1K_TOKENS": SettingDoc(
        "money per 1000 tokens, 0 or more", "what the remote charges (counts spending)"
    ),
    "APPLIANCE_REMOTE_BUDGET_MONTHLY": SettingDoc(
        "money, 0 = no limit", "remote spending of the whole appliance per calendar month"
    ),
    "NPU_FORCE_ENABLE": SettingDoc("true | false", "ask for an NPU backend"),
    "APPLIANCE_CONSOLE": SettingDoc(
        "true | false", "serve the web console (chat page at /, operator page at /operator)"
    ),
    "APPLIANCE_TRUSTED_PROXIES": SettingDoc(
        "comma-separated addresses or networks, e.g. 127.0.0.1, 10.0.0.0/8",
        "reverse proxies whose forwarded client address is believed (APPLIANCE_PROXY_HEADER)",
    ),
    "APPLIANCE_PROXY_HEADER": SettingDoc(
        "x-forwarded-for | forwarded", "the header the trusted proxies write the client into"
    ),
    "APPLIANCE_TLS_CERT": SettingDoc(
        "absolute path of a PEM certificate chain", "serve HTTPS (with APPLIANCE_TLS_KEY)"
    ),
    "APPLIANCE_TLS_KEY": SettingDoc(
        "absolute path of the PEM private key, no passphrase, mode 0600",
        "serve HTTPS (with APPLIANCE_TLS_CERT)",
    ),
    "APPLIANCE_REMOTE_LLM_ALLOW_PLAINTEXT": SettingDoc(
        "true | false", "production accepts a plain http:// remote LLM on another machine"
    ),
    "APPLIANCE_ENV_FILE": SettingDoc(
        "absolute path", "the env file read; production refuses one that others may read"
    ),
    "APPLIANCE_RESTORE_PREVIOUS_KEEP": SettingDoc(
        "whole number, 1 or more",
        "data dirs a restore moved aside kept at most; a restore refuses when that many exist",
    ),
    "APPLIANCE_RESTORE_PREVIOUS_MAX_DAYS": SettingDoc(
        "whole number of days, 0 = until pruned",
        "data a restore moved aside is deleted once this old (appliance backups prune-previous)",
    ),
    "APPLIANCE_STREAM_STALL_SECONDS": SettingDoc(
        "seconds, above 0",
        "a streamed answer whose client takes no data for this long is cancelled and its "
        "connection closed",
    ),
    "APPLIANCE_PARALLEL_PER_KEY": SettingDoc(
        "whole number, 0 to 64; 0 = APPLIANCE_PARALLEL - 1 (at least 1)",
        "generations one API key may run at once (the rest wait, fairly across keys)",
    ),
    "APPLIANCE_MODEL_MEMORY": SettingDoc(
        "bytes, or a size such as 4gb; empty = half of the box's memory",
        "memory all resident models may use (estimated from each GGUF header, checked "
        "against the workers' RSS); the least recently used idle model is unloaded to make room",
    ),
    "APPLIANCE_KEEP_ALIVE": SettingDoc(
        "a duration such as 5m, 1h, 300 (seconds); 0 = unload after each request; -1 = never",
        "how long a model stays resident after its last request (a request's keep_alive "
        "overrides it)",
    ),
    "APPLIANCE_PULL_HOSTS": SettingDoc(
        "comma-separated host names; *.example.com for every name under one",
        "hosts `appliance models pull` may download from over https:// (loopback always); "
        "empty: none off the box",
    ),
    "APPLIANCE_PULL_MAX_BYTES": SettingDoc(
        "a size such as 64gb", "largest model file a pull accepts"
    ),
    "APPLIANCE_SEARCH_PROVIDER": SettingDoc(
        "searxng | brave", "the search service at APPLIANCE_SEARCH_URL (docs/search.md)"
    ),
    "APPLIANCE_SEARCH_URL": SettingDoc(
        "http:// or https:// URL, no query",
        "SearXNG's base URL, or Brave's endpoint; the only host a search contacts",
    ),
    "APPLIANCE_SEARCH_API_KEY": SettingDoc(
        "the provider's API key (brave); https:// only off the box",
        "sent in a header to APPLIANCE_SEARCH_URL only",
    ),
    "APPLIANCE_SEARCH_RESULTS": SettingDoc(
        "whole number, 1 to 20", "results put into the prompt as numbered sources"
    ),
    "APPLIANCE_SEARCH_TIMEOUT": SettingDoc(
        "seconds, above 0", "wait for the provider's whole answer (504 beyond)"
    ),
    "APPLIANCE_SEARCH_QUERY_CHARS": SettingDoc(
        "whole number, 16 to 1000", "the redacted query sent out is cut to this length"
    ),
    "SEARCH_BUDGET_DAILY": SettingDoc(
        "searches, 0 = no limit", "searches per API key per day (429 beyond, under BUDGET_ENFORCE)"
    ),
    "APPLIANCE_SEARCH_ALLOW": SettingDoc(
        "comma-separated scopes (admin, user) and key:<name or id> entries",
        "the API keys that may search (403 for others)",
    ),
}
