"""System, process and service metrics (psutil), and the snapshot as Prometheus text."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import msgspec
import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.backup.service import BackupMetrics
from appliance.metrics_snapshot import (
    HttpMetrics,
    LlmMetrics,
    Metrics,
    PrivacyMetrics,
    ProcessMetrics,
    ServiceMetrics,
    SystemMetrics,
    TimeToFirstToken,
)


class RequestStats:
    """Counts of HTTP requests by status class, kept by the app that serves them."""

    def __init__(self) -> None:
        self.by_status: Counter[str] = Counter()
        self.in_flight = 0

    def record(self, status: int) -> None:
        self.by_status[f"{status // 100}xx"] += 1


class ProcessSampler:
    """psutil handles kept between scrapes, so CPU percentages cover the interval since."""

    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}

    def sample(self, pid: int) -> ProcessMetrics | None:
        process = self._processes.get(pid)
        try:
            if process is None:
                process = psutil.Process(pid)
                process.cpu_percent(None)
                self._processes[pid] = process
            with process.oneshot():
                memory = process.memory_info()
                return ProcessMetrics(
                    pid=pid,
                    rss_bytes=memory.rss,
                    vms_bytes=memory.vms,
                    cpu_percent=process.cpu_percent(None),
                    threads=process.num_threads(),
                    open_fds=process.num_fds(),
                )
        except psutil.Error:
            self._processes.pop(pid, None)
            return None


def system_metrics(state_dir: Path) -> SystemMetrics:
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(state_dir)) if state_dir.exists() else None
    return SystemMetrics(
        cpu_percent=psutil.cpu_percent(None),
        cpu_count=psutil.cpu_count() or 0,
        load_average=list(os.getloadavg()),
        memory_total_bytes=memory.total,
        memory_available_bytes=memory.available,
        memory_percent=memory.percent,
        disk_total_bytes=disk.total if disk else 0,
        disk_free_bytes=disk.free if disk else 0,
        disk_percent=disk.percent if disk else 0.0,
    )


def count_models(models_dir: Path) -> int:
    try:
        return sum(1 for entry in models_dir.iterdir() if entry.suffix == ".gguf")
    except OSError:
        return 0


# The per-process gauges, in the order they are written.
_PROCESS_GAUGES: Final[tuple[tuple[str, Callable[[ProcessMetrics], float]], ...]] = (
    ("rss_bytes", lambda p: p.rss_bytes),
    ("vms_bytes", lambda p: p.vms_bytes),
    ("cpu_percent", lambda p: p.cpu_percent),
    ("threads", lambda p: p.threads),
    ("open_fds", lambda p: p.open_fds),
)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Metrics) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot
        yield from _system(snap.system)
        for key, value_of in _PROCESS_GAUGES:
            family = GaugeMetricFamily(
                f"appliance_process_{key}", f"{key} per process", labels=["process"]
            )
            for name, proc in snap.processes.items():
                if proc is not None:
                    family.add_metric([name], value_of(proc))
            yield family
        yield _gauge("appliance_uptime_seconds", "seconds since start", snap.uptime_seconds)
        yield from _services(snap.services)
        yield from _http(snap.http)
        yield from _llm(snap.llm)
        yield from _resident_models(snap.llm)
        yield from _time_to_first_token(snap.llm.time_to_first_token_seconds)
        yield from _privacy(snap.privacy)
        yield from _backups(snap.backups)


def _system(system: SystemMetrics) -> Iterator[Metric]:
    # Every number (load_average is a list: not a gauge), in the Struct's order.
    for key in system.__struct_fields__:
        value = getattr(system, key)
        if isinstance(value, int | float):
            yield _gauge(f"appliance_system_{key}", f"system {key}", value)


def _services(services: ServiceMetrics) -> Iterator[Metric]:
    redis = services.redis
    yield _gauge("appliance_redis_up", "1 when Redis answers", 1 if redis.healthy else 0)
    if redis.used_memory_bytes is not msgspec.UNSET:
        yield _gauge(
            "appliance_redis_used_memory_bytes", "Redis used_memory_bytes", redis.used_memory_bytes
        )
    if redis.maxmemory_bytes is not msgspec.UNSET:
        yield _gauge(
            "appliance_redis_maxmemory_bytes", "Redis maxmemory_bytes", redis.maxmemory_bytes
        )
    yield _gauge("appliance_models", "models available", services.models.count)
    healthy = GaugeMetricFamily(
        "appliance_service_healthy", "1 when the service runs and answers", labels=["service"]
    )
    restarts = GaugeMetricFamily(
        "appliance_service_restarts", "restarts since start", labels=["service"]
    )
    for service in services.supervised:
        healthy.add_metric([service.name], 1 if service.healthy else 0)
        restarts.add_metric([service.name], service.restarts)
    yield healthy
    yield restarts


def _http(http: HttpMetrics) -> Iterator[Metric]:
    requests = GaugeMetricFamily(
        "appliance_http_requests", "requests answered, by status class", labels=["status"]
    )
    for status, count in sorted(http.by_status.items()):
        requests.add_metric([status], count)
    yield requests
    yield _gauge("appliance_http_in_flight", "requests in flight", http.in_flight)


def _llm(llm: LlmMetrics) -> Iterator[Metric]:
    yield _gauge("appliance_llm_queue_depth", "generations waiting", llm.queue_depth)
    yield _gauge("appliance_llm_busy", "1 while a generation runs", 1 if llm.busy else 0)
    yield _gauge(
        "appliance_llm_running",
        "generations decoding together now (at most APPLIANCE_PARALLEL)",
        llm.running,
    )
    counters = (
        ("completed", llm.completed),
        ("failed", llm.failed),
        ("rejected", llm.rejected),
        ("worker_crashes", llm.worker_crashes),
        ("tokens_generated", llm.tokens_generated),
    )
    for key, value in counters:
        yield _gauge(f"appliance_llm_{key}", f"generations {key} since start", value)
    yield _gauge(
        "appliance_llm_tokens_per_second",
        "decode speed of the last generation",
        llm.last_tokens_per_second,
    )
    yield _gauge(
        "appliance_llm_queue_wait_seconds",
        "queue wait of the last generation",
        llm.last_queue_wait_seconds,
    )
    backend = llm.backend
    if backend is not None:
        info = GaugeMetricFamily(
            "appliance_llm_backend", "1 for the llama.cpp backend in use", labels=["backend"]
        )
        info.add_metric([backend.in_use], 1)
        yield info
        yield _gauge(
            "appliance_npu_available",
            "1 when an NPU backend and device are present",
            int(backend.npu.available),
        )


def _time_to_first_token(ttft: TimeToFirstToken) -> Iterator[Metric]:
    family = GaugeMetricFamily(
        "appliance_llm_time_to_first_token_seconds", "time to first token", labels=["stat"]
    )
    for stat, value in (("last", ttft.last), ("p50", ttft.p50), ("p99", ttft.p99)):
        if value is not None:
            family.add_metric([stat], value)
    yield family


def _privacy(privacy: PrivacyMetrics) -> Iterator[Metric]:
    if privacy.conversations_under_old_keys is not None:
        yield _gauge(
            "appliance_privacy_conversations_under_old_keys",
            "conversations with records sealed under a previous key",
            privacy.conversations_under_old_keys,
        )
    yield _gauge(
        "appliance_privacy_retention_removed_total",
        "conversations deleted by retention since start",
        privacy.retention_removed_total,
    )


def _backups(backups: BackupMetrics) -> Iterator[Metric]:
    for key, when in (
        ("last_success", backups.last_success),
        ("last_failure", backups.last_failure),
    ):
        if when is not None:
            yield _gauge(
                f"appliance_backup_{key}_timestamp_seconds",
                f"unix time of the {key.replace('_', ' ')} of a backup",
                when,
            )
    for key, count in (("succeeded", backups.succeeded), ("failed", backups.failed)):
        yield _gauge(f"appliance_backups_{key}", f"backups {key} since start", count)
    yield _gauge("appliance_backup_running", "1 while a backup runs", int(backups.running))
    yield _gauge(
        "appliance_restore_previous_dirs",
        "data dirs that restores moved aside (restore-previous-*)",
        backups.previous_data_count,
    )
    yield _gauge(
        "appliance_restore_previous_bytes",
        "bytes in the data dirs that restores moved aside",
        backups.previous_data_bytes,
    )


def _resident_models(llm: LlmMetrics) -> Iterator[Metric]:
    resident = llm.resident
    yield _gauge("appliance_llm_resident_models", "models loaded in workers", len(resident))
    yield _gauge(
        "appliance_llm_memory_budget_bytes",
        "memory resident models may use (APPLIANCE_MODEL_MEMORY)",
        llm.memory_budget_bytes,
    )
    yield _gauge(
        "appliance_llm_memory_used_bytes",
        "memory resident models count against the budget",
        llm.memory_used_bytes,
    )
    for key, count in (("model_loads", llm.model_loads), ("model_unloads", llm.model_unloads)):
        yield _gauge(f"appliance_llm_{key}", f"{key.replace('_', ' ')} since start", count)
    memory = GaugeMetricFamily(
        "appliance_llm_model_memory_bytes",
        "a resident model's estimated need and its worker's RSS",
        labels=["model", "kind"],
    )
    running = GaugeMetricFamily(
        "appliance_llm_model_running", "generations running per resident model", labels=["model"]
    )
    for model in resident:
        memory.add_metric([model.name, "estimated"], model.estimated_bytes)
        memory.add_metric([model.name, "rss"], model.rss_bytes)
        running.add_metric([model.name], model.running)
    yield memory
    yield running


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def to_prometheus(snapshot: Metrics) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)


def uptime_since(started_monotonic: float) -> float:
    return round(time.monotonic() - started_monotonic, 3)
