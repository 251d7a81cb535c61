"""`appliance serve`: start the services in order, tell systemd, stop them in reverse."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any, Final

import trio

from appliance import __version__
from appliance.auth.apikeys import KeyStore
from appliance.auth.budgets import Budgets
from appliance.auth.gate import Gate
from appliance.backup.restore import recover_before_start
from appliance.backup.service import Backups, BackupService
from appliance.config import Settings, remote_config, search_config
from appliance.http.app import Runtime, create_app
from appliance.http.service import HttpService, check_bind
from appliance.llm.backends import backend_report
from appliance.llm.engine import InferenceService
from appliance.llm.pulls import Pulls
from appliance.llm.registry import ModelRegistry
from appliance.llm.remote import RemoteLLM
from appliance.metrics import count_models
from appliance.privacy.keys import load_keys
from appliance.privacy.redaction import Redactor
from appliance.privacy.retention import DAY_SECONDS, RetentionService
from appliance.privacy.rotation import check_keys
from appliance.search.service import WebSearch
from appliance.store.access import daemon_lock
from appliance.store.client import Store, is_cluster_url
from appliance.store.conversations import Conversations
from appliance.store.identity import embedded_identity, external_identity
from appliance.store.lock import StateLock
from appliance.store.server import EmbeddedRedis
from appliance.supervisor import Supervisor
from appliance.systemd import Notifier, watchdog_loop

LOGGER = logging.getLogger("appliance.daemon")

STATUS_REFRESH: Final = 5.0
# Time for redis-server to save and exit, on top of the HTTP drain.
STORE_STOP_TIMEOUT: Final = 30.0


def status_line(
    supervisor: Supervisor, settings: Settings, urls: list[str], backups: Backups
) -> str:
    failing = supervisor.unhealthy_critical()
    models = count_models(Path(settings.models_dir))
    where = urls[0] if urls else settings.bind
    counted = f"{models} model{'' if models == 1 else 's'}; {backups.status_phrase()}"
    if supervisor.maintenance is not None:
        return f"maintenance: {supervisor.maintenance}; {counted}"
    if failing:
        return f"degraded: {', '.join(failing)} not healthy; {counted}; {where}"
    return f"ready: {counted}; serving {where}"


async def _keep_status(notifier: Notifier, supervisor: Supervisor, state: Runtime) -> None:
    while True:
        notifier.status(status_line(supervisor, state.settings, state.urls, state.backups))
        with trio.move_on_after(STATUS_REFRESH):
            await supervisor.changed.wait()


async def _report(
    scope: trio.CancelScope,
    notifier: Notifier,
    supervisor: Supervisor,
    state: Runtime,
) -> None:
    """Watchdog pings and STATUS= updates, until the daemon starts stopping."""
    with scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog_loop, notifier, supervisor.watchdog_problems)
            nursery.start_soon(_keep_status, notifier, supervisor, state)


def _prepare_directories(settings: Settings) -> None:
    for path in (settings.state_dir, settings.runtime_dir, settings.models_dir):
        Path(path).mkdir(parents=True, exist_ok=True, mode=0o700)


async def serve(settings: Settings, notifier: Notifier | None = None) -> int:
    """Run until SIGTERM/SIGINT; return the exit code. ServiceFailed propagates."""
    notifier = notifier or Notifier()
    await trio.to_thread.run_sync(check_bind, settings)  # a taken port stops the start at once
    await trio.to_thread.run_sync(_prepare_directories, settings)
    # Before anything touches the state dir: one daemon per state dir (StateDirBusy).
    lock = await daemon_lock(settings)
    try:
        return await _serve_locked(settings, notifier, lock)
    finally:
        # Only once every child (redis-server above all) has stopped.
        lock.release()


async def _serve_locked(settings: Settings, notifier: Notifier, lock: StateLock) -> int:
    LOGGER.info("appliance %s starting (%s)", __version__, settings.env)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(
                nursery,
                restart_limit=settings.restart_limit,
                restart_window=settings.restart_window,
            )
            stop_requested = trio.Event()

            async def wait_for_signal(startup: trio.CancelScope) -> None:
                async for signum in signals:
                    LOGGER.info("received %s; stopping", signal.Signals(signum).name)
                    stop_requested.set()
                    startup.cancel()
                    return

            reporting = trio.CancelScope()
            with trio.CancelScope() as startup:
                nursery.start_soon(wait_for_signal, startup)
                state = await _start_services(supervisor, settings, lock)
                notifier.ready(status_line(supervisor, settings, state.urls, state.backups))
                LOGGER.info("ready on %s", ", ".join(state.urls))
                nursery.start_soon(_report, reporting, notifier, supervisor, state)
            await stop_requested.wait()
            reporting.cancel()
            notifier.stopping()
            await supervisor.stop_all(timeout=settings.graceful_timeout + STORE_STOP_TIMEOUT)
            nursery.cancel_scope.cancel()
    LOGGER.info("stopped")
    return 0


async def _store_identity(settings: Settings, store: Store) -> str:
    if settings.embedded_redis:
        found = await trio.to_thread.run_sync(
            lambda: embedded_identity(Path(settings.state_dir), create=True)
        )
        return found or ""
    return await external_identity(store.client)


def _log_backend(settings: Settings, backend: dict[str, Any]) -> None:
    LOGGER.info("inference backend: %s (%s)", backend["in_use"], backend["detail"])
    if settings.gpu_layers != 0 and backend["in_use"] == "cpu":
        LOGGER.warning("APPLIANCE_GPU_LAYERS=%d, but %s", settings.gpu_layers, backend["detail"])
    if settings.npu_force_enable and not backend["npu"]["available"]:
        LOGGER.warning("NPU_FORCE_ENABLE=true, but %s", backend["npu"]["detail"])


async def _start_services(supervisor: Supervisor, settings: Settings, lock: StateLock) -> Runtime:
    if settings.embedded_redis:
        await trio.to_thread.run_sync(recover_before_start, settings)
        redis = EmbeddedRedis(
            Path(settings.state_dir),
            Path(settings.runtime_dir),
            settings.redis_maxmemory,
            lock=lock,
        )
        await supervisor.start(redis)
        url = f"unix://{redis.socket_path}"
    else:
        url = settings.redis_url
        LOGGER.info(
            "store: the external %s at APPLIANCE_REDIS_URL; backups are left to its own "
            "persistence (RDB/AOF)",
            "Redis Cluster" if is_cluster_url(url) else "Redis",
        )
    store = Store(url)
    await supervisor.start(store)
    store.identity = await _store_identity(settings, store)
    keys = await trio.to_thread.run_sync(load_keys, settings)
    # Data sealed under a key we do not have must stop the start, not turn into 500s.
    await check_keys(store.client, keys.codec)
    conversations = Conversations(
        store, keys.codec, retention_seconds=settings.privacy_retention_days * DAY_SECONDS
    )
    retention = RetentionService(
        conversations, settings.privacy_retention_days, settings.retention_sweep_seconds
    )
    await supervisor.start(retention)
    apikeys = KeyStore(lambda: store.client, keys.hash_key, keys.previous_hash_key)
    if settings.admin_key_hash and await apikeys.ensure_first_admin(settings.admin_key_hash):
        LOGGER.info("recorded the first admin key (made by appliance init)")
    gate = Gate(
        lambda: store.client,
        apikeys,
        keys.hash_key,
        settings.rate_limit,
        enabled=settings.auth == "on",
    )
    if settings.auth == "off":
        LOGGER.warning("APPLIANCE_AUTH=off: every request is the local admin, no budgets")
    backups = Backups(settings, supervisor, store, keys)
    await supervisor.start(BackupService(backups))
    backend = await trio.to_thread.run_sync(backend_report, settings)
    _log_backend(settings, backend)
    registry = ModelRegistry(Path(settings.models_dir))
    engine = InferenceService(settings, registry)
    # Before HTTP: READY waits for the models of APPLIANCE_PRELOAD.
    await supervisor.start(engine)
    pulls = Pulls(settings, registry)
    await supervisor.start(pulls)
    remote = None
    if settings.remote_llm_enabled:
        # startup_problems has checked the settings and the key file.
        remote = RemoteLLM(await trio.to_thread.run_sync(remote_config, settings))
        await supervisor.start(remote)
        LOGGER.info("remote LLM on: remote:%s at %s", remote.model, settings.remote_llm_url)
    search = None
    if settings.search_enabled:
        # startup_problems has checked the settings; nothing is contacted until a search.
        search = WebSearch(search_config(settings), keys.client_hash)
        await supervisor.start(search)
        LOGGER.info("web search on: %s at %s", search.provider.name, search.config.host)
    state = Runtime(
        settings=settings,
        supervisor=supervisor,
        store=store,
        registry=registry,
        engine=engine,
        keys=keys,
        redactor=Redactor(settings.privacy_redact_aggressiveness),
        conversations=conversations,
        retention=retention,
        backups=backups,
        apikeys=apikeys,
        gate=gate,
        budgets=Budgets(lambda: store.client, settings.budget_enforce),
        pulls=pulls,
        backend=backend,
        remote=remote,
        search=search,
    )
    http = HttpService(create_app(state), settings, state.requests)
    await supervisor.start(http)
    state.urls = http.urls
    return state
