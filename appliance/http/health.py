"""Health endpoints: live, ready, metrics (JSON or Prometheus) and supervised services."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import coredis
import msgspec
import trio
from quart import Blueprint, Response, request

from appliance import __version__
from appliance.http.app import Runtime, runtime
from appliance.http.errors import ApiError
from appliance.llm.registry import RegistryError
from appliance.metrics import count_models, system_metrics, to_prometheus, uptime_since
from appliance.privacy.rotation import key_usage, old_key_count
from appliance.store.client import StoreUnavailable

blueprint = Blueprint("health", __name__, url_prefix="/api/v1/health")

READY_PROBE_TIMEOUT = 1.0


def _json(body: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status=status, mimetype="application/json")


@blueprint.get("/live")
async def live() -> Response:
    state = runtime()
    return _json(
        {"status": "alive", "version": __version__, "uptime_seconds": uptime_since(state.started)}
    )


async def _redis_check(state: Runtime) -> dict[str, Any]:
    try:
        seconds = await state.store.ping(timeout=READY_PROBE_TIMEOUT)
    except StoreUnavailable as exc:
        return {"name": "redis", "state": "fail", "detail": str(exc)}
    return {"name": "redis", "state": "ok", "detail": f"answered in {seconds * 1000:.1f} ms"}


def _disk_check(state: Runtime) -> dict[str, Any]:
    settings = state.settings
    try:
        free = shutil.disk_usage(settings.state_dir).free
    except OSError:
        return {"name": "disk", "state": "fail", "detail": "the state directory is not readable"}
    needed = settings.min_free_disk_mb * 1024 * 1024
    free_mb = free // (1024 * 1024)
    if free < needed:
        return {
            "name": "disk",
            "state": "fail",
            "detail": f"{free_mb} MB free in the state directory; "
            f"{settings.min_free_disk_mb} MB needed (APPLIANCE_MIN_FREE_DISK_MB)",
        }
    return {"name": "disk", "state": "ok", "detail": f"{free_mb} MB free"}


async def _models_check(state: Runtime) -> dict[str, Any]:
    try:
        default = await trio.to_thread.run_sync(
            state.registry.default_name, state.settings.default_model or None
        )
    except RegistryError as exc:
        return {"name": "models", "state": "fail", "detail": str(exc)}
    if default is None:
        return {
            "name": "models",
            "state": "fail",
            "detail": "no usable model is installed; import one with: appliance models import PATH",
        }
    loaded = state.engine.loaded_model
    if loaded is not None:
        return {"name": "models", "state": "ok", "detail": f"{loaded} loaded"}
    if state.settings.preload:
        return {"name": "models", "state": "fail", "detail": f"{default} is not loaded yet"}
    return {"name": "models", "state": "ok", "detail": f"{default} loads on first use"}


def _services_check(state: Runtime) -> dict[str, Any]:
    failing = state.supervisor.unhealthy_critical()
    if failing:
        return {"name": "services", "state": "fail", "detail": "not running: " + ", ".join(failing)}
    return {"name": "services", "state": "ok", "detail": "all critical services running"}


@blueprint.get("/ready")
async def ready() -> Response:
    state = runtime()
    checks = [
        await _redis_check(state),
        _disk_check(state),
        await _models_check(state),
        _services_check(state),
    ]
    is_ready = all(check["state"] == "ok" for check in checks)
    return _json(
        {"status": "ready" if is_ready else "not_ready", "checks": checks},
        status=200 if is_ready else 503,
    )


async def metrics_snapshot(state: Runtime) -> dict[str, Any]:
    services = state.supervisor.snapshot()
    pids = {"appliance": os.getpid()}
    pids.update({s.name: s.pid for s in services if s.pid is not None})

    def sample() -> dict[str, Any]:
        return {
            "system": system_metrics(Path(state.settings.state_dir)),
            "processes": {name: state.sampler.sample(pid) for name, pid in pids.items()},
            "models": count_models(Path(state.settings.models_dir)),
        }

    sampled = await trio.to_thread.run_sync(sample)
    redis: dict[str, Any] = {"healthy": state.store.healthy()}
    try:
        with trio.fail_after(READY_PROBE_TIMEOUT):
            memory = await state.store.memory()
        redis["used_memory_bytes"] = memory["used_memory"]
        redis["maxmemory_bytes"] = memory["maxmemory"]
        if memory["maxmemory"]:
            # With noeviction, writes are refused once this reaches 100.
            redis["memory_percent"] = round(100 * memory["used_memory"] / memory["maxmemory"], 1)
    except (StoreUnavailable, trio.TooSlowError):
        redis["healthy"] = False
    return {
        "version": __version__,
        "uptime_seconds": uptime_since(state.started),
        "system": sampled["system"],
        "process": sampled["processes"]["appliance"],
        "processes": sampled["processes"],
        "services": {
            "redis": redis,
            "models": {"count": sampled["models"]},
            "supervised": [msgspec.to_builtins(s) for s in services],
        },
        "http": {
            "by_status": dict(state.requests.by_status),
            "in_flight": state.requests.in_flight,
        },
        "llm": {**llm_metrics(state), "backend": state.backend},
        "privacy": await privacy_metrics(state),
        "backups": state.backups.metrics(),
    }


async def privacy_metrics(state: Runtime) -> dict[str, Any]:
    settings = state.settings
    retention = state.retention
    body: dict[str, Any] = {
        "encrypt_at_rest": settings.privacy_encrypt_at_rest,
        "current_key_id": state.keys.current_id if settings.privacy_encrypt_at_rest else None,
        "redaction": settings.privacy_redact_aggressiveness,
        "retention_days": settings.privacy_retention_days,
        "retention_last_sweep": retention.last_sweep,
        "retention_last_removed": retention.last_removed,
        "retention_removed_total": retention.total_removed,
    }
    try:
        with trio.fail_after(READY_PROBE_TIMEOUT):
            usage = await key_usage(state.store.client)
    except (StoreUnavailable, trio.TooSlowError, coredis.exceptions.RedisError):
        usage = None
    body["conversations_by_key"] = usage
    body["conversations_under_old_keys"] = (
        old_key_count(usage, state.keys.codec) if usage is not None else None
    )
    return body


def llm_metrics(state: Runtime) -> dict[str, Any]:
    engine = state.engine
    stats = engine.stats
    recent = sorted(stats.recent_ttft)
    return {
        "loaded_model": engine.loaded_model,
        "busy": engine.busy,
        "running": engine.running,
        "parallel": state.settings.parallel,
        "queue_depth": engine.waiting,
        "max_queue": state.settings.max_queue,
        "completed": stats.completed,
        "failed": stats.failed,
        "rejected": stats.rejected,
        "worker_crashes": stats.crashes,
        "tokens_generated": stats.tokens,
        "last_tokens_per_second": round(stats.last_tokens_per_second, 2),
        "last_queue_wait_seconds": round(stats.last_queue_wait, 4),
        "time_to_first_token_seconds": {
            "last": round(stats.last_time_to_first_token, 4),
            "p50": round(recent[len(recent) // 2], 4) if recent else None,
            "p99": round(recent[min(len(recent) - 1, int(len(recent) * 0.99))], 4)
            if recent
            else None,
        },
    }


def _wants_prometheus() -> bool:
    if request.args.get("format") == "prometheus":
        return True
    accept = request.headers.get("Accept", "")
    return "text/plain" in accept and "application/json" not in accept


MAX_SAMPLE_SECONDS = 10.0


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
async def metrics() -> Response:
    """Metrics now; with `?sample_seconds=N`, CPU figures cover the next N seconds."""
    state = runtime()
    sample_seconds = _sample_seconds()
    if sample_seconds:
        # The first reading only starts the CPU counters; the snapshot closes the window.
        await metrics_snapshot(state)
        await trio.sleep(sample_seconds)
    snapshot = await metrics_snapshot(state)
    if _wants_prometheus():
        return Response(to_prometheus(snapshot), mimetype="text/plain; version=0.0.4")
    return _json(snapshot)


@blueprint.get("/services")
async def services() -> Response:
    state = runtime()
    return _json({"services": [msgspec.to_builtins(s) for s in state.supervisor.snapshot()]})
