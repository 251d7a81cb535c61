"""The request context every blueprint shares: the daemon's `Runtime` and who is asking.

A leaf of `appliance.http`: the blueprints import it, and the app (which imports the
blueprints) sets it up, so no module of the package imports its importer back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final

from quart import current_app, g

from appliance.auth.apikeys import ApiKey, KeyStore
from appliance.auth.budgets import Budgets
from appliance.auth.gate import Gate
from appliance.backup.service import Backups
from appliance.config import Settings
from appliance.http.errors import ApiError
from appliance.llm.backends import BackendReport
from appliance.llm.engine import InferenceService
from appliance.llm.pulls import Pulls
from appliance.llm.registry import ModelRegistry
from appliance.llm.remote.client import RemoteLLM
from appliance.metrics import ProcessSampler, RequestStats
from appliance.privacy.keys import Keys
from appliance.privacy.redaction import Redactor
from appliance.privacy.retention import RetentionService
from appliance.search.service import WebSearch
from appliance.store.client import Store
from appliance.store.conversations import Conversations
from appliance.supervisor import Supervisor

# The HTTP service's own liveness probe; its requests are not access-logged.
PROBE_USER_AGENT: Final = "appliance-self-probe"


@dataclass
class Runtime:
    """What the handlers need from the daemon; owned by the daemon, shared by reference."""

    settings: Settings
    supervisor: Supervisor
    store: Store
    registry: ModelRegistry
    engine: InferenceService
    keys: Keys
    redactor: Redactor
    conversations: Conversations
    retention: RetentionService
    backups: Backups
    apikeys: KeyStore
    gate: Gate
    budgets: Budgets
    # Model downloads started through the API (POST /api/v1/models/pull).
    pulls: Pulls
    # The remote LLM client, when REMOTE_LLM_ENABLED; None means no code path can reach it.
    remote: RemoteLLM | None = None
    # The web search client, when SEARCH_ENABLED; None means no code path can search.
    search: WebSearch | None = None
    urls: list[str] = field(default_factory=list)
    # Open streamed generations per key id (APPLIANCE_MAX_STREAMS_PER_KEY).
    streams: dict[str, int] = field(default_factory=dict)
    # llama.cpp backends built in and in use (appliance.llm.backends.backend_report).
    backend: BackendReport | None = None
    started: float = field(default_factory=time.monotonic)
    sampler: ProcessSampler = field(default_factory=ProcessSampler)
    requests: RequestStats = field(default_factory=RequestStats)


def runtime() -> Runtime:
    value: Runtime = current_app.extensions["appliance"]
    return value


def current_key() -> ApiKey:
    """The API key of this request (every route but live/ready has one)."""
    key: ApiKey | None = g.get("api_key")
    if key is None:
        raise ApiError(401, "invalid_api_key", "a valid API key is needed")
    return key


def current_owner() -> str:
    """Who owns what this request stores: the key's id, so a key sees only its own."""
    return current_key().id
