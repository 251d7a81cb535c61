"""Everything that stops the daemon from starting with these settings, one line each.

Composes the checks that need more than the settings' own values (appliance.config is a
leaf): production rules, the env file's mode, TLS files, web search and the remote LLM
(whose key file is read here).
"""

from __future__ import annotations

from appliance.config import Settings, env_file_problems, production_problems
from appliance.llm.remote.config import RemoteConfig, RemoteConfigError, plaintext_problem
from appliance.search.config import SearchConfig, SearchConfigError, parse_allow
from appliance.tls_files import tls_problems


def startup_problems(settings: Settings) -> list[str]:
    """Everything that stops the daemon from starting with these settings."""
    problems = production_problems(settings)
    if (
        settings.env == "production"
        and settings.remote_llm_enabled
        and not settings.remote_llm_allow_plaintext
    ):
        plaintext = plaintext_problem(settings.remote_llm_url)
        if plaintext:
            problems.append(plaintext)
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
