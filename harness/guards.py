"""Measurement guards: reasons not to trust a GPU timing, read from NVML right after it, and
from the run's telemetry samples (harness.timeline, every 50 ms) taken while it was timed.

Each flag is a short string stored in the record's `flags` and shown in tables and reports:
  throttled:power / throttled:thermal  the clocks were being held down (at the reading after)
  throttled:while_timed                a sample during the timing saw them held down (power,
                                       thermal or another slowdown), the reading after did not
  gpu_shared:N                         N other processes have a context on this GPU
  low_clock:S/M                        SM clock S MHz, under 80% of its maximum M
  guards_unavailable:E                 a GPU is here but NVML could not be read (error E)
Without a GPU (NVML absent) there is nothing to guard and the list is empty.

After a benchmark fails, cuda_context_error says whether this process can still run GPU work.
"""
from __future__ import annotations

import os
import warnings

POWER_REASONS = ("clocksEventReasonSwPowerCap", "clocksEventReasonHwPowerBrakeSlowdown")
THERMAL_REASONS = ("clocksEventReasonSwThermalSlowdown", "clocksEventReasonHwThermalSlowdown")
LOW_CLOCK = 0.8
# This run's own processes beside this one and its parent: the benchmark workers (harness.worker),
# whose idle CUDA contexts are not another user of the GPU.
own_processes: set[int] = set()
# The process that runs this run's benchmarks and starts its workers: this one, or in a worker
# its parent (harness.worker sets it). Its children, the workers (one per framework), are its
# own: a worker's sibling is no other user of the GPU either.
run_process: int | None = None


def _parent(pid: int) -> int | None:
    """A process's parent, from /proc/<pid>/stat; None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def ours(pid: int) -> bool:
    """Whether a process on the GPU is this run's: this one, its parent, its workers, and a
    worker's siblings."""
    root = run_process or os.getpid()
    return pid in {os.getpid(), os.getppid(), root, *own_processes} or _parent(pid) == root


def nvml_handle():
    """NVML and the handle of this process's first visible GPU: CUDA_VISIBLE_DEVICES names it by
    index or by UUID ("GPU-..." or, for a MIG instance, "MIG-...")."""
    import pynvml

    pynvml.nvmlInit()
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    if first.isdigit():
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(int(first))
    return pynvml, pynvml.nvmlDeviceGetHandleByUUID(first)


def reason_mask(pynvml, names) -> int:
    return sum(getattr(pynvml, "nvml" + n[0].upper() + n[1:], 0) for n in names)


def clock_event_reasons(pynvml):
    """The reasons-bitmask reader; nvmlDeviceGetCurrentClocksThrottleReasons is its pre-12.5
    name."""
    return (getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
            or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons)


def flags() -> list[str]:
    from kernels import ON_CUDA

    if not ON_CUDA:
        return []  # no GPU: nothing to guard (NVML absent is the normal state)
    # A GPU whose NVML cannot be read, or refuses a reading, is flagged, not taken for a clean
    # one; the benchmark's figures stand.
    try:
        out = _readings(*nvml_handle())
    except Exception as e:
        return [f"guards_unavailable:{type(e).__name__}"]
    if out:
        warnings.warn(f"measurement guard: {', '.join(out)}", RuntimeWarning, stacklevel=2)
    return out


def flagged(record: dict) -> bool:
    """Whether a guard flagged the record: its figures were measured under other conditions
    than a clean record's (or ones NVML could not tell)."""
    return bool(record.get("flags"))


def with_samples(flags: list[str], sampled: dict[str, list[float]]) -> list[str]:
    """`flags` (the reading after the timing) with what the telemetry sampled during it adds: a
    throttle that had ended by the time of that one reading. (Not a low clock: a sample taken
    while the GPU sat idle, as it does while a JAX profile is read, shows the idle clock.)"""
    if any(sampled.get("throttled", [])) and not any(f.startswith("throttled:") for f in flags):
        return [*flags, "throttled:while_timed"]
    return list(flags)


def _readings(pynvml, h) -> list[str]:
    """Throttling, other processes on the GPU and a low SM clock, as flags."""
    out = []
    reasons = clock_event_reasons(pynvml)(h)
    if reasons & reason_mask(pynvml, POWER_REASONS):
        out.append("throttled:power")
    if reasons & reason_mask(pynvml, THERMAL_REASONS):
        out.append("throttled:thermal")
    others = [p for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h) if not ours(p.pid)]
    if others:
        out.append(f"gpu_shared:{len(others)}")
    sm = pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
    sm_max = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
    if sm_max and sm < LOW_CLOCK * sm_max:
        out.append(f"low_clock:{sm}/{sm_max}")
    return out


def cuda_context_error() -> str | None:
    """None while this process can still run CUDA work (or has no GPU); otherwise the error that
    says it cannot. An illegal memory access, like any sticky CUDA error, poisons the context of
    the whole process: every later call fails with it, whatever it launches. torch and XLA both
    run in the device's primary context, so a JAX kernel's fault ends torch's work too."""
    import torch

    from kernels import ON_CUDA

    if not ON_CUDA:
        return None
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
    except Exception as e:  # RuntimeError, torch.AcceleratorError: the sticky error again
        lines = str(e).strip().splitlines()
        return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
    return None
