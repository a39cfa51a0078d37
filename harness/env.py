"""What machine and software a record comes from."""
from __future__ import annotations

import functools
import os
import platform
import shlex
import sys


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


@functools.cache
def nvml_info() -> dict:
    """Driver and GPU from NVML; {} without a GPU (NVMLError_LibraryNotFound is the normal
    state)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return {}
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        return {"driver": pynvml.nvmlSystemGetDriverVersion(),
                "gpu": pynvml.nvmlDeviceGetName(h),
                "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                "mem_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)}
    except Exception as e:
        return {"nvml_error": str(e)}


def gpu_count() -> int:
    """GPUs NVML sees, without initialising CUDA; 0 without a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except Exception:
        return 0


@functools.cache
def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {cpu}"


@functools.cache
def versions() -> dict:
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "triton": _version("triton"), "jax": _version("jax"), "jaxlib": _version("jaxlib"),
            "numpy": _version("numpy"), "cuda": torch.version.cuda,
            "driver": nvml_info().get("driver")}


def command(argv: list[str]) -> str:
    """The pytest command as a user would re-run it: `python -m pytest ...` where the process
    saw pytest's own __main__.py path, quoted as the shell needs (a --shapes list, say)."""
    head, *args = argv
    if os.path.basename(head) == "__main__.py" and "pytest" in head:
        return shlex.join([sys.executable, "-m", "pytest", *args])
    return shlex.join([head, *args])


def jax_device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}: {getattr(d, 'device_kind', d)}"
