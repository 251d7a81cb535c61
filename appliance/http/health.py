"""Health endpoints: live, ready, metrics (JSON or Prometheus) and supervised services."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Final, Literal, NamedTuple

import coredis
import msgspec
import trio
from quart import Blueprint, Response, g, request

from appliance import __version__
from appliance.http.context import Runtime, runtime
from appliance.http.errors import ApiError
from appliance.http.openapi_doc import (
    document_querystring,
    document_response,
    errors,
    plain_text,
)
from appliance.http.responses import json_response
from appliance.llm.memory import mb
from appliance.llm.registry import RegistryError
from appliance.metrics import count_models, system_metrics, to_prometheus, uptime_since
from appliance.metrics_snapshot import (
    HttpMetrics,
    LlmMetrics,
    Metrics,
    ModelCount,
    PrivacyMetrics,
    ProcessMetrics,
    RedisMetrics,
    ResidentModel,
    ServiceMetrics,
    SystemMetrics,
    TimeToFirstToken,
)
from appliance.privacy.rotation import key_usage, old_key_count
from appliance.store.client import StoreUnavailable
from appliance.supervisor import ServiceState

blueprint = Blueprint("health", __name__, url_prefix="/api/v1/health")

READY_PROBE_TIMEOUT = 1.0
MAX_SAMPLE_SECONDS: Final = 10.0


class Live(msgspec.Struct):
    """The process runs."""

    status: Literal["alive"]
    version: str
    uptime_seconds: float
    # A random id of the store this daemon serves: CLI commands compare it with their own.
    store_id: str


class Check(msgspec.Struct):
    """One readiness check and what it found."""

    name: Literal["redis", "disk", "models", "services"]
    state: Literal["ok", "fail"]
    detail: str


class Readiness(msgspec.Struct):
    """Ready (200) when every check is ok, else not ready (503)."""

    status: Literal["ready", "not_ready"]
    checks: list[Check]


class MetricsQuery(msgspec.Struct):
    # `prometheus` (or `Accept: text/plain`) answers in Prometheus' text format.
    format: Literal["json", "prometheus"] | msgspec.UnsetType = msgspec.UNSET
    # CPU figures cover the next N seconds.
    sample_seconds: (
        Annotated[float, msgspec.Meta(ge=0, le=MAX_SAMPLE_SECONDS)] | msgspec.UnsetType
    ) = msgspec.UNSET


class Services(msgspec.Struct):
    """Each supervised service: state, health, pid, restarts, last error, since when."""

    services: list[ServiceState]


@blueprint.get("/live")
@document_response(Live)
async def live() -> Response:
    """Alive whenever the process runs, with the version and uptime."""
    state = runtime()
    return json_response(
        Live(
            status="alive",
            version=__version__,
            uptime_seconds=uptime_since(state.started),
            store_id=state.store.identity,
        )
    )


class Finding(NamedTuple):
    """A check as an admin sees it, and the same in general terms for anyone else (no
    model names, paths, settings or service names: readiness is open to all)."""

    check: Check
    general: str

    def shown(self, detailed: bool) -> Check:
        if detailed:
            return self.check
        return Check(self.check.name, self.check.state, self.general)


async def _redis_check(state: Runtime) -> Finding:
    try:
        seconds = await state.store.ping(timeout=READY_PROBE_TIMEOUT)
    except StoreUnavailable as exc:
        return Finding(Check("redis", "fail", str(exc)), "storage does not answer")
    return Finding(Check("redis", "ok", f"answered in {seconds * 1000:.1f} ms"), "answering")


def _disk_check(state: Runtime) -> Finding:
    settings = state.settings
    try:
        free = shutil.disk_usage(settings.state_dir).free
    except OSError:
        return Finding(
            Check("disk", "fail", "the state directory is not readable"), "storage is unusable"
        )
    needed = settings.min_free_disk_mb * 1024 * 1024
    free_mb = free // (1024 * 1024)
    if free < needed:
        return Finding(
            Check(
                "disk",
                "fail",
                f"{free_mb} MB free in the state directory; "
                f"{settings.min_free_disk_mb} MB needed (APPLIANCE_MIN_FREE_DISK_MB)",
            ),
            "too little free disk space",
        )
    return Finding(Check("disk", "ok", f"{free_mb} MB free"), "enough free space")


async def _models_check(state: Runtime) -> Finding:
    try:
        default = await trio.to_thread.run_sync(
            state.registry.default_name, state.settings.default_model or None
        )
    except RegistryError as exc:
        return Finding(Check("models", "fail", str(exc)), "the models cannot be used")
    if default is None:
        return Finding(
            Check(
                "models",
                "fail",
                "no usable model is installed; import one with: appliance models import PATH",
            ),
            "no usable model is installed",
        )
    engine = state.engine
    failures = engine.preload_failures
    if failures:
        name, reason = next(iter(failures.items()))
        return Finding(
            Check("models", "fail", f"{name} (APPLIANCE_PRELOAD) did not load: {reason}"),
            "a model could not be loaded",
        )
    restarting = [
        worker.name
        for worker in engine.workers.values()
        if worker.name in engine.preloaded and not worker.ready
    ]
    if restarting:
        return Finding(
            Check("models", "fail", f"{', '.join(restarting)} not loaded yet"),
            "a model is still loading",
        )
    resident = [
        f"{worker.name} ({mb(worker.needs())} MB)"
        for worker in engine.workers.values()
        if worker.ready
    ]
    if resident:
        return Finding(
            Check(
                "models",
                "ok",
                f"resident: {', '.join(resident)} of a {mb(engine.budget)} MB budget; "
                f"default {default}",
            ),
            "a model is loaded",
        )
    return Finding(
        Check("models", "ok", f"{default} loads on first use"), "a model loads on first use"
    )


def _services_check(state: Runtime) -> Finding:
    failing = state.supervisor.unhealthy_critical()
    if failing:
        return Finding(
            Check("services", "fail", "not running: " + ", ".join(failing)),
            "a critical service is not running",
        )
    return Finding(
        Check("services", "ok", "all critical services running"), "all critical services running"
    )


@blueprint.get("/ready")
@document_response(Readiness)
@document_response(Readiness, 503)
async def ready() -> Response:
    """Ready when Redis, disk space, models and services are; lists each check.

    Open to all, in general terms; an admin key gets each check's details (which model,
    how much disk, which service).
    """
    state = runtime()
    key = g.get("api_key")
    detailed = key is not None and key.scope == "admin"
    findings = [
        await _redis_check(state),
        _disk_check(state),
        await _models_check(state),
        _services_check(state),
    ]
    is_ready = all(finding.check.state == "ok" for finding in findings)
    return json_response(
        Readiness(
            status="ready" if is_ready else "not_ready",
            checks=[finding.shown(detailed) for finding in findings],
        ),
        status=200 if is_ready else 503,
    )


async def metrics_snapshot(state: Runtime) -> Metrics:
    services = state.supervisor.snapshot()
    pids = {"appliance": os.getpid()}
    pids.update({s.name: s.pid for s in services if s.pid is not None})

    def sample() -> tuple[SystemMetrics, dict[str, ProcessMetrics | None], int]:
        return (
            system_metrics(Path(state.settings.state_dir)),
            {name: state.sampler.sample(pid) for name, pid in pids.items()},
            count_models(Path(state.settings.models_dir)),
        )

    system, processes, models = await trio.to_thread.run_sync(sample)
    redis = RedisMetrics(healthy=state.store.healthy())
    try:
        with trio.fail_after(READY_PROBE_TIMEOUT):
            memory = await state.store.memory()
        redis.used_memory_bytes = memory["used_memory"]
        redis.maxmemory_bytes = memory["maxmemory"]
        if memory["maxmemory"]:
            redis.memory_percent = round(100 * memory["used_memory"] / memory["maxmemory"], 1)
    except (StoreUnavailable, trio.TooSlowError):
        redis.healthy = False
    return Metrics(
        version=__version__,
        uptime_seconds=uptime_since(state.started),
        system=system,
        process=processes["appliance"],
        processes=processes,
        services=ServiceMetrics(redis=redis, models=ModelCount(models), supervised=services),
        http=HttpMetrics(
            by_status=dict(state.requests.by_status), in_flight=state.requests.in_flight
        ),
        llm=llm_metrics(state),
        privacy=await privacy_metrics(state),
        backups=state.backups.report(),
    )


async def privacy_metrics(state: Runtime) -> PrivacyMetrics:
    settings = state.settings
    retention = state.retention
    usage: dict[str, int] | None
    try:
        with trio.fail_after(READY_PROBE_TIMEOUT):
            usage = await key_usage(state.store.client)
    except (StoreUnavailable, trio.TooSlowError, coredis.exceptions.RedisError):
        usage = None
    return PrivacyMetrics(
        encrypt_at_rest=settings.privacy_encrypt_at_rest,
        current_key_id=state.keys.current_id if settings.privacy_encrypt_at_rest else None,
        redaction=settings.privacy_redact_aggressiveness,
        retention_days=settings.privacy_retention_days,
        retention_last_sweep=retention.last_sweep,
        retention_last_removed=retention.last_removed,
        retention_removed_total=retention.total_removed,
        conversations_by_key=usage,
        conversations_under_old_keys=(
            old_key_count(usage, state.keys.codec) if usage is not None else None
        ),
    )


def llm_metrics(state: Runtime) -> LlmMetrics:
    engine = state.engine
    stats = engine.stats
    recent = sorted(stats.recent_ttft)
    return LlmMetrics(
        loaded_model=engine.loaded_model,
        busy=engine.busy,
        running=engine.running,
        parallel=state.settings.parallel,
        queue_depth=engine.waiting,
        max_queue=state.settings.max_queue,
        completed=stats.completed,
        failed=stats.failed,
        rejected=stats.rejected,
        worker_crashes=stats.crashes,
        tokens_generated=stats.tokens,
        last_tokens_per_second=round(stats.last_tokens_per_second, 2),
        last_queue_wait_seconds=round(stats.last_queue_wait, 4),
        time_to_first_token_seconds=TimeToFirstToken(
            last=round(stats.last_time_to_first_token, 4),
            p50=round(recent[len(recent) // 2], 4) if recent else None,
            p99=round(recent[min(len(recent) - 1, int(len(recent) * 0.99))], 4) if recent else None,
        ),
        backend=state.backend,
        resident=[
            msgspec.convert(engine.describe(worker), ResidentModel)
            for worker in list(engine.workers.values())
        ],
        memory_budget_bytes=engine.budget,
        memory_used_bytes=engine.used_memory(),
        model_loads=engine.loads,
        model_unloads=engine.unloads,
    )


def _wants_prometheus() -> bool:
    answer_format = request.args.get("format")
    if answer_format is not None and answer_format not in ("json", "prometheus"):
        raise ApiError(
            400, "invalid_parameter", "format must be json or prometheus", param="format"
        )
    if answer_format is not None:
        return answer_format == "prometheus"
    accept = request.headers.get("Accept", "")
    return "text/plain" in accept and "application/json" not in accept


def _sample_seconds() -> float:
    raw = request.args.get("sample_seconds", "0")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_SAMPLE_SECONDS:
        raise ApiError(
            400,
            "invalid_parameter",
            f"sample_seconds must be a number from 0 to {MAX_SAMPLE_SECONDS:.0f}",
            param="sample_seconds",
        )
    return value


@blueprint.get("/metrics")
@document_querystring(MetricsQuery)
@document_response(Metrics)
@plain_text("Prometheus text format 0.0.4 (`?format=prometheus` or `Accept: text/plain`)")
@errors(400)
async def metrics() -> Response:
    """Metrics now; with `?sample_seconds=N`, CPU figures cover the next N seconds.

    System (CPU, memory, disk), process and service metrics, as JSON or as Prometheus text.
    """
    state = runtime()
    sample_seconds = _sample_seconds()
    prometheus = _wants_prometheus()
    if sample_seconds:
        # The first reading only starts the CPU counters; the snapshot closes the window.
        await metrics_snapshot(state)
        await trio.sleep(sample_seconds)
    snapshot = await metrics_snapshot(state)
    if prometheus:
        return Response(to_prometheus(snapshot), mimetype="text/plain; version=0.0.4")
    return json_response(snapshot)


@blueprint.get("/services")
@document_response(Services)
async def services() -> Response:
    """Each supervised service: state, healthy, pid, restarts, last error, since."""
    state = runtime()
    return json_response(Services(services=state.supervisor.snapshot()))
