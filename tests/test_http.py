"""The HTTP surface of the real daemon: health endpoints, CORS, limits, errors, logs.

CORS, request ids and log lines are tested on the services started in the test's own
nursery (tests.inprocess); the rest on the daemon's own process."""

from __future__ import annotations

import json

import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import running_daemon
from tests.inprocess import inprocess_daemon

SECRET = "s3cret-value-that-must-never-be-logged-0123456789"
SALT = "salt-value-that-must-never-be-logged"


async def test_live_ready_services_and_metrics() -> None:
    with trio.fail_after(60):
        async with running_daemon() as daemon, daemon.client() as client:
            live = await client.get("/api/v1/health/live")
            assert live.status_code == 200
            assert live.json()["status"] == "alive"
            assert live.json()["uptime_seconds"] >= 0

            ready = await client.get("/api/v1/health/ready")
            assert ready.status_code == 200
            checks = {c["name"]: c["state"] for c in ready.json()["checks"]}
            assert checks == {"redis": "ok", "disk": "ok", "models": "ok", "services": "ok"}

            services = (await client.get("/api/v1/health/services")).json()["services"]
            by_name = {s["name"]: s for s in services}
            assert set(by_name) == {
                "redis",
                "store",
                "retention",
                "backups",
                "models",
                "worker:tiny",
                "pulls",
                "http",
            }
            assert by_name["redis"]["pid"] > 0
            assert all(s["state"] == "running" and s["restarts"] == 0 for s in services)

            metrics = (await client.get("/api/v1/health/metrics")).json()
            assert metrics["system"]["memory_total_bytes"] > 0
            assert metrics["system"]["disk_total_bytes"] > 0
            assert metrics["process"]["rss_bytes"] > 0
            assert metrics["processes"]["redis"]["rss_bytes"] > 0
            assert metrics["services"]["redis"]["healthy"] is True
            assert metrics["services"]["redis"]["maxmemory_bytes"] == 256 * 1024 * 1024
            assert 0 < metrics["services"]["redis"]["memory_percent"] < 100
            assert metrics["services"]["models"]["count"] == 1


async def test_metrics_in_prometheus_text() -> None:
    with trio.fail_after(60):
        async with running_daemon() as daemon, daemon.client() as client:
            for response in (
                await client.get("/api/v1/health/metrics", params={"format": "prometheus"}),
                await client.get("/api/v1/health/metrics", headers={"Accept": "text/plain"}),
            ):
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/plain")
                families = {f.name: f for f in text_string_to_metric_families(response.text)}
                assert families["appliance_redis_up"].samples[0].value == 1
                rss = {
                    s.labels["process"]: s.value
                    for s in families["appliance_process_rss_bytes"].samples
                }
                assert rss["appliance"] > 0 and rss["redis"] > 0
                assert "appliance_system_memory_total_bytes" in families
            bad = await client.get("/api/v1/health/metrics", params={"sample_seconds": "lots"})
            assert bad.status_code == 400
            assert bad.json()["error"]["param"] == "sample_seconds"


async def test_ready_fails_when_disk_space_is_below_the_minimum() -> None:
    with trio.fail_after(60):
        async with running_daemon({"APPLIANCE_MIN_FREE_DISK_MB": "999999999"}) as daemon:
            async with daemon.client() as client:
                ready = await client.get("/api/v1/health/ready")
            assert ready.status_code == 503
            disk = next(c for c in ready.json()["checks"] if c["name"] == "disk")
            assert disk["state"] == "fail"
            assert "APPLIANCE_MIN_FREE_DISK_MB" in disk["detail"]


async def test_cors_follows_the_configured_origins_exactly() -> None:
    env = {"BACKEND_CORS_ORIGINS": "https://good.example,https://also.example"}
    with trio.fail_after(60):
        async with inprocess_daemon(env) as daemon, daemon.client() as client:
            allowed = await client.get(
                "/api/v1/health/live", headers={"Origin": "https://good.example"}
            )
            assert allowed.headers["access-control-allow-origin"] == "https://good.example"
            denied = await client.get(
                "/api/v1/health/live", headers={"Origin": "https://evil.example"}
            )
            assert "access-control-allow-origin" not in denied.headers
            preflight = await client.options(
                "/api/v1/health/live",
                headers={
                    "Origin": "https://also.example",
                    "Access-Control-Request-Method": "GET",
                },
            )
            assert preflight.headers["access-control-allow-origin"] == "https://also.example"


async def test_without_cors_origins_no_origin_is_allowed() -> None:
    with trio.fail_after(60):
        async with inprocess_daemon() as daemon, daemon.client() as client:
            response = await client.get(
                "/api/v1/health/live", headers={"Origin": "https://good.example"}
            )
            assert "access-control-allow-origin" not in response.headers


async def test_body_limit_unknown_routes_and_request_ids() -> None:
    with trio.fail_after(60):
        async with (
            inprocess_daemon({"APPLIANCE_MAX_BODY_BYTES": "2048"}) as daemon,
            daemon.client() as client,
        ):
            big = await client.post("/api/v1/health/live", content=b"x" * 4096)
            assert big.status_code == 413
            assert "APPLIANCE_MAX_BODY_BYTES" in big.json()["error"]["message"]

            missing = await client.get("/api/v1/nothing-here")
            assert missing.status_code == 404
            assert missing.headers["content-type"] == "application/json"
            assert missing.json()["error"]["type"] == "not_found_error"

            wrong_method = await client.delete("/api/v1/health/live")
            assert wrong_method.status_code == 405
            assert wrong_method.json()["error"]["code"] == "method_not_allowed"

            echoed = await client.get("/api/v1/health/live", headers={"X-Request-ID": "req-123"})
            assert echoed.headers["x-request-id"] == "req-123"
            for insane in ("has space", "x" * 300, "<script>"):
                replaced = await client.get("/api/v1/health/live", headers={"X-Request-ID": insane})
                assert replaced.headers["x-request-id"].startswith("req-")
                assert replaced.headers["x-request-id"] != insane
            generated = await client.get("/api/v1/health/live")
            assert generated.headers["x-request-id"].startswith("req-")
            assert missing.json()["error"]["request_id"] == missing.headers["x-request-id"]


async def test_access_log_line_fields_and_no_secrets_in_logs() -> None:
    env = {"SECRET_KEY": SECRET, "PRIVACY_SALT": SALT}
    with trio.fail_after(60):
        async with inprocess_daemon(env) as daemon, daemon.client() as client:
            await client.get("/api/v1/health/ready", headers={"X-Request-ID": "req-log-1"})
        lines = daemon.log_lines()
        access = [line for line in lines if line.get("request_id") == "req-log-1"]
        assert len(access) == 1
        entry = access[0]
        for key in ("timestamp", "level", "logger", "message", "endpoint", "duration_ms", "status"):
            assert key in entry, key
        assert entry["endpoint"] == "/api/v1/health/ready"
        assert entry["status"] == 200
        assert entry["level"] == "INFO"
        assert entry["logger"] == "appliance.access"
        assert entry["timestamp"].endswith("Z")
        assert isinstance(entry["duration_ms"], float)
        raw = daemon.log_text()
        assert SECRET not in raw and SALT not in raw
        # Every line is one JSON object.
        assert all("raw" not in line for line in lines), [line for line in lines if "raw" in line]
        assert all(json.dumps(line) for line in lines)


async def test_log_level_setting_filters_lines() -> None:
    # APPLIANCE_AUTH=off is said at start with a warning: something at the level is kept.
    env = {"APPLIANCE_LOG_LEVEL": "warning", "APPLIANCE_AUTH": "off"}
    with trio.fail_after(60):
        async with inprocess_daemon(env) as daemon, daemon.client() as client:
            await client.get("/api/v1/health/live")
        levels = {line.get("level") for line in daemon.log_lines()}
        assert "WARNING" in levels
        assert "INFO" not in levels
