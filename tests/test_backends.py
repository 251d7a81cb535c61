"""The inference backend report: what the llama.cpp build offers and what serves."""

from __future__ import annotations

from pathlib import Path

import trio

from appliance.config import Settings, load_settings
from appliance.llm.backends import NpuReport, backend_report, built_backends
from tests.harness import running_daemon


def _settings(**env: str) -> Settings:
    return load_settings(environ={"APPLIANCE_STATE_DIR": "/tmp/unused", **env}, env_file=None)


def test_backends_come_from_the_shared_libraries_of_the_build(tmp_path: Path) -> None:
    for name in ("libggml-base.so", "libggml-cpu.so", "libggml-cuda.so", "libllama.so"):
        (tmp_path / name).touch()
    (tmp_path / "libggml-cpu.so.0").touch()
    assert built_backends(tmp_path) == ["cpu", "cuda"]
    # The real build here is the portable CPU one.
    assert "cpu" in built_backends()


def test_the_report_is_honest_about_gpu_and_npu() -> None:
    settings = _settings(APPLIANCE_GPU_LAYERS="-1", NPU_FORCE_ENABLE="true")
    cpu_only = backend_report(settings, built=["cpu"])
    assert cpu_only.in_use == "cpu"
    assert "no GPU backend" in cpu_only.detail
    assert cpu_only.npu == NpuReport(
        requested=True,
        available=False,
        backend=None,
        detail="no NPU backend in this llama.cpp build; inference runs on CPU",
    )
    if not Path("/dev/nvidia0").exists():
        cuda_without_device = backend_report(settings, built=["cpu", "cuda"])
        assert cuda_without_device.in_use == "cpu"
        assert "no such device" in cuda_without_device.detail
    off = backend_report(_settings(), built=["cpu", "cuda"])
    assert off.in_use == "cpu" and "APPLIANCE_GPU_LAYERS=0" in off.detail


async def test_metrics_and_log_report_the_backend_and_the_npu_request() -> None:
    env = {"APPLIANCE_GPU_LAYERS": "-1", "NPU_FORCE_ENABLE": "true"}
    with trio.fail_after(60):
        async with running_daemon(env) as daemon, daemon.client() as client:
            metrics = (await client.get("/api/v1/health/metrics")).json()
            prometheus = (await client.get("/api/v1/health/metrics?format=prometheus")).text
            chat = await client.post("/api/v1/chat/send", json={"message": "hi", "max_tokens": 2})
    backend = metrics["llm"]["backend"]
    assert "cpu" in backend["built"] and backend["in_use"] == "cpu"
    assert backend["npu"]["requested"] is True and backend["npu"]["available"] is False
    assert 'appliance_llm_backend{backend="cpu"} 1.0' in prometheus
    assert "appliance_npu_available 0.0" in prometheus
    assert chat.status_code == 200  # layers that cannot be offloaded stay on the CPU
    warnings = [line["message"] for line in daemon.log_lines() if line.get("level") == "WARNING"]
    assert any(m.startswith("NPU_FORCE_ENABLE=true, but") for m in warnings)
    assert any(m.startswith("APPLIANCE_GPU_LAYERS=-1, but") for m in warnings)
