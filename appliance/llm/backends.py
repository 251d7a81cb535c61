"""Which llama.cpp compute backends this installation has, and which one serves.

llama.cpp builds each ggml backend as its own shared library next to libllama
(`libggml-cpu.so`, `libggml-cuda.so`, ...), so the supervisor can tell what the build
offers from file names alone, without loading llama.cpp into its own process. Whether
a device is really there is judged from its device nodes; the worker's llama.cpp makes
the final call when it loads a model (layers it cannot offload stay on the CPU).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
from pathlib import Path
from typing import Final

import msgspec

from appliance.config import Settings

_LIBRARY: Final = re.compile(r"^libggml-([a-z0-9]+)\.so$")
_NOT_BACKENDS: Final = frozenset({"base"})
GPU_BACKENDS: Final = {
    "cuda": ("NVIDIA CUDA", ("/dev/nvidia0", "/dev/nvidiactl")),
    "hip": ("AMD ROCm", ("/dev/kfd",)),
    "vulkan": ("Vulkan", ("/dev/dri/renderD*",)),
    "sycl": ("Intel SYCL", ("/dev/dri/renderD*",)),
    "musa": ("Moore Threads MUSA", ("/dev/mtgpu*",)),
    "opencl": ("OpenCL", ("/dev/dri/renderD*",)),
}
NPU_BACKENDS: Final = {
    "cann": ("Huawei Ascend CANN", ("/dev/davinci*",)),
    "openvino": ("Intel OpenVINO", ("/dev/accel/accel*",)),
}


def library_dir() -> Path | None:
    """llama-cpp-python's lib/ directory, found without importing llama_cpp."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def built_backends(directory: Path | None = None) -> list[str]:
    directory = directory or library_dir()
    if directory is None or not directory.is_dir():
        return []
    names = {match[1] for f in os.listdir(directory) if (match := _LIBRARY.match(f))}
    return sorted(names - _NOT_BACKENDS)


def _device_present(patterns: tuple[str, ...]) -> bool:
    return any(glob.glob(pattern) for pattern in patterns)


class NpuReport(msgspec.Struct):
    requested: bool
    available: bool
    backend: str | None
    detail: str


class BackendReport(msgspec.Struct):
    """The llama.cpp backends built in, the one in use, and the NPU's state."""

    built: list[str]
    in_use: str
    gpu_layers: int
    detail: str
    npu: NpuReport


def backend_report(settings: Settings, built: list[str] | None = None) -> BackendReport:
    """What metrics show: the backends built in, the one in use, and the NPU's honest state."""
    built = built_backends() if built is None else built
    gpus = [name for name in built if name in GPU_BACKENDS]
    usable = [name for name in gpus if _device_present(GPU_BACKENDS[name][1])]
    if settings.gpu_layers == 0:
        in_use, detail = "cpu", "APPLIANCE_GPU_LAYERS=0: every layer runs on the CPU"
    elif usable:
        in_use = usable[0]
        detail = f"{GPU_BACKENDS[in_use][0]}: up to {settings.gpu_layers} layers offloaded"
        if settings.gpu_layers < 0:
            detail = f"{GPU_BACKENDS[in_use][0]}: all layers offloaded"
    elif gpus:
        in_use = "cpu"
        detail = f"built with {', '.join(gpus)}, but no such device is present: CPU only"
    else:
        in_use = "cpu"
        detail = "this llama.cpp build has no GPU backend (see docs/operations.md: GPU and NPU)"
    npus = [name for name in built if name in NPU_BACKENDS]
    npu_usable = [name for name in npus if _device_present(NPU_BACKENDS[name][1])]
    if npu_usable:
        npu_detail = f"{NPU_BACKENDS[npu_usable[0]][0]} is available"
    elif npus:
        npu_detail = f"built with {', '.join(npus)}, but no NPU device is present"
    else:
        npu_detail = "no NPU backend in this llama.cpp build; inference runs on " + in_use.upper()
    return BackendReport(
        built=built,
        in_use=in_use,
        gpu_layers=settings.gpu_layers,
        detail=detail,
        npu=NpuReport(
            requested=settings.npu_force_enable,
            available=bool(npu_usable),
            backend=npu_usable[0] if npu_usable else None,
            detail=npu_detail,
        ),
    )
