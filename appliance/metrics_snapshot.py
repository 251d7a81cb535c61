"""The metrics snapshot: one typed value from where it is measured (appliance.http.health)
to where it is rendered, as JSON (msgspec encodes these Structs) and as Prometheus text
(appliance.metrics reads the same Structs).

A few parts are documented in the API as plain objects (docs/openapi.json has always
described them so): for mypy they are their Structs, for msgspec's schema `dict[str, Any]`.
Encoding does not look at annotations, so the JSON is the Structs' fields either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from appliance.backup.service import BackupMetrics
from appliance.llm.backends import BackendReport
from appliance.supervisor import ServiceState


class SystemMetrics(msgspec.Struct):
    cpu_percent: float
    cpu_count: int
    load_average: list[float]
    memory_total_bytes: int
    memory_available_bytes: int
    memory_percent: float
    disk_total_bytes: int
    disk_free_bytes: int
    disk_percent: float


class ProcessMetrics(msgspec.Struct):
    pid: int
    rss_bytes: int
    vms_bytes: int
    cpu_percent: float
    threads: int
    open_fds: int


if TYPE_CHECKING:
    SystemPart = SystemMetrics
    ProcessPart = ProcessMetrics
    # None only for a Runtime that no daemon completed (the daemon always reports one).
    BackendPart = BackendReport | None
    BackupsPart = BackupMetrics
else:
    SystemPart = ProcessPart = BackendPart = BackupsPart = dict[str, Any]


class RedisMetrics(msgspec.Struct):
    healthy: bool
    used_memory_bytes: int | msgspec.UnsetType = msgspec.UNSET
    maxmemory_bytes: int | msgspec.UnsetType = msgspec.UNSET
    # With noeviction, writes are refused once this reaches 100.
    memory_percent: float | msgspec.UnsetType = msgspec.UNSET


class ModelCount(msgspec.Struct):
    count: int


class ServiceMetrics(msgspec.Struct):
    redis: RedisMetrics
    models: ModelCount
    supervised: list[ServiceState]


class HttpMetrics(msgspec.Struct):
    by_status: dict[str, int]
    in_flight: int


class TimeToFirstToken(msgspec.Struct):
    last: float
    p50: float | None
    p99: float | None


class ResidentModel(msgspec.Struct):
    """A model loaded in a worker process of its own."""

    name: str
    state: Annotated[
        str, msgspec.Meta(extra_json_schema={"enum": ["starting", "running", "backoff"]})
    ]
    pid: int | None
    # What it counts against APPLIANCE_MODEL_MEMORY is the larger of the two.
    estimated_bytes: int
    rss_bytes: int
    context: int
    slots: int
    running: int
    waiting: int
    idle_seconds: float
    keep_alive: str
    # Until an idle model is unloaded; null while it is busy or kept for ever.
    expires_in_seconds: float | None
    # Times it was loaded into a fresh worker process (a crash or recycle loads it again).
    loads: int
    restarts: int


class LlmMetrics(msgspec.Struct):
    # The most recently used resident model.
    loaded_model: str | None
    busy: bool
    running: int
    parallel: int
    queue_depth: int
    max_queue: int
    completed: int
    failed: int
    rejected: int
    worker_crashes: int
    tokens_generated: int
    last_tokens_per_second: float
    last_queue_wait_seconds: float
    time_to_first_token_seconds: TimeToFirstToken
    # llama.cpp backends built in and in use.
    backend: BackendPart
    resident: list[ResidentModel]
    memory_budget_bytes: int
    memory_used_bytes: int
    # Models loaded and unloaded since start (keep-alive, room for another, requests).
    model_loads: int
    model_unloads: int


class PrivacyMetrics(msgspec.Struct):
    encrypt_at_rest: bool
    current_key_id: str | None
    redaction: str
    retention_days: int
    retention_last_sweep: float | None
    retention_last_removed: int
    retention_removed_total: int
    conversations_by_key: dict[str, int] | None
    conversations_under_old_keys: int | None


class Metrics(msgspec.Struct):
    """System, process and service metrics (the JSON form)."""

    version: str
    uptime_seconds: float
    system: SystemPart
    process: ProcessPart | None
    processes: dict[str, ProcessPart | None]
    services: ServiceMetrics
    http: HttpMetrics
    llm: LlmMetrics
    privacy: PrivacyMetrics
    backups: BackupsPart
