"""The run timeline: what each benchmark did when, beside the machine's state, as one native
Perfetto trace.

Sampler reads telemetry on a background thread every ~50 ms: on a GPU from NVML (clocks, power,
temperature, memory, throttling); without one (nvmlInit raises NVMLError_LibraryNotFound, the
normal CPU state) the process's RSS and CPU utilisation (percent of one core, so up to 100 x the
threads busy), and those of the benchmark worker processes while there are any. Samples are
(time.time_ns(), counter, value).

write_run_trace() lays the records of a run out on that clock: one track per implementation
("<op>/<impl>", and the pytest-xdist worker under WORKERS=N), on it one slice per benchmark
("<case> <dtype>", and the mode but for fwd; its results as arguments) holding its phases (setup,
compiler_start_up, cold_compile, warm_compile, warmup, timed, memory, retime, trace), and one
counter track per sampled counter, with its unit. Open the file in ui.perfetto.dev. It needs the
`perfetto` package (and protobuf), imported only here and only when a trace is written or read.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

Sample = tuple[int, str, float]

SAMPLE_INTERVAL_S = 0.05
# a counter's unit, by the last part of its name (sm_clock_mhz, power_w, rss_bytes, ...)
_UNITS = {"bytes": "bytes", "mhz": "MHz", "w": "W", "c": "C", "percent": "%"}
SEQUENCE_ID = 1  # every packet is written by this one producer
# Clock-event reasons that mean the clocks were held down by power, heat or a hardware slowdown
# (idle, application clocks and sync boost are not throttling).
_SLOWDOWN = ("clocksEventReasonHwSlowdown",)
# Record fields shown as arguments of a benchmark's slice, when present.
SLICE_ARGS = ("op", "impl", "case", "dims", "dtype", "mode", "median_s", "tflops", "rel_err",
              "status", "reason", "flags", "trace_path")


# ---------------------------------------------------------------- telemetry
class _NvmlReader:
    source = "nvml"

    def __init__(self):
        from harness.guards import (POWER_REASONS, THERMAL_REASONS, clock_event_reasons,
                                    nvml_handle, reason_mask)

        nvml, h = nvml_handle()  # raises without a GPU or without pynvml
        throttle_mask = reason_mask(nvml, POWER_REASONS + THERMAL_REASONS + _SLOWDOWN)
        reasons = clock_event_reasons(nvml)
        self.nvml_error = nvml.NVMLError
        self.counters: dict[str, Callable[[], float]] = {
            "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM),
            "power_w": lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1e3,
            "temperature_c": lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
            "memory_used_bytes": lambda: nvml.nvmlDeviceGetMemoryInfo(h).used,
            "throttled": lambda: float(bool(reasons(h) & throttle_mask)),
        }

    def __call__(self) -> dict[str, float]:
        out = {}
        for name, read in list(self.counters.items()):
            try:
                out[name] = float(read())
            except self.nvml_error:  # not supported on this GPU (or under MIG): stop asking
                del self.counters[name]
        return out


def _rss_bytes() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) * 1024  # the value is in kB
    except OSError:
        pass
    return None


def _worker_cpu_rss(pid: int) -> tuple[float, float] | None:
    """(CPU seconds, RSS bytes) of another process, from /proc/<pid>/stat (utime + stime in
    clock ticks, resident pages); None once it has exited."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    return (int(fields[11]) + int(fields[12])) / ticks, float(int(fields[21]) * page)


class _ProcessReader:
    """This process's RSS and CPU use and, while benchmarks run in worker processes (isolation:
    harness.worker, listed in guards.own_processes), theirs: workers_rss_bytes and
    workers_cpu_percent (clock ticks of 10 ms, so coarse over 50 ms intervals)."""
    source = "process"

    def __init__(self):
        self.last: tuple[float, float] | None = None
        self.last_workers: dict[int, float] = {}  # pid -> CPU seconds at the last sample

    def __call__(self) -> dict[str, float]:
        # process_time is user + system time of all threads (what os.times() reports) with
        # nanosecond resolution; os.times() ticks in 10 ms, too coarse for 50 ms intervals.
        cpu, now = time.process_time(), time.monotonic()
        rss = _rss_bytes()
        out = {} if rss is None else {"rss_bytes": rss}
        # utilisation needs an interval: none at the first sample
        interval = None if self.last is None else max(now - self.last[1], 1e-9)
        if interval is not None:
            out["cpu_percent"] = 100.0 * (cpu - self.last[0]) / interval
        out.update(self._workers(interval))
        self.last = (cpu, now)
        return out

    def _workers(self, interval: float | None) -> dict[str, float]:
        from harness.guards import own_processes

        seen = {pid: got for pid in list(own_processes)
                if (got := _worker_cpu_rss(pid)) is not None}
        busy = sum(cpu - self.last_workers[pid] for pid, (cpu, _) in seen.items()
                   if pid in self.last_workers)  # a worker's first sample has no interval
        self.last_workers = {pid: cpu for pid, (cpu, _) in seen.items()}
        if not seen:
            return {}
        out = {"workers_rss_bytes": sum(rss for _, rss in seen.values())}
        if interval is not None:
            out["workers_cpu_percent"] = 100.0 * busy / interval
        return out


def _reader():
    try:
        return _NvmlReader()
    except Exception:  # no GPU (NVMLError_LibraryNotFound) or no pynvml: sample the process
        return _ProcessReader()


class Sampler:
    """Telemetry on a background thread, every `interval_s`, from start() until stop().

        with Sampler() as s:
            run()
        s.samples, s.summary()
    """

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._read = _reader()
        self.source = self._read.source
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.samples

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _sample(self) -> None:
        now = time.time_ns()
        self.samples += [(now, name, value) for name, value in self._read().items()]

    def _loop(self) -> None:
        self._sample()
        while not self._stop.wait(self.interval_s):
            self._sample()
        self._sample()  # the state at stop

    def during(self, windows: list[tuple[int, int]]) -> dict[str, list[float]]:
        """Each counter's values sampled inside any of the (start_ns, end_ns) windows. The
        samples are in time order: each window is found by bisection, not by a scan of the
        whole run's (the thread may append meanwhile: `taken` bounds the search)."""
        samples, taken = self.samples, len(self.samples)
        values = defaultdict(list)
        for start, end in windows:
            first = bisect.bisect_left(samples, start, hi=taken, key=lambda s: s[0])
            last = bisect.bisect_right(samples, end, lo=first, hi=taken, key=lambda s: s[0])
            for _, name, value in samples[first:last]:
                values[name].append(value)
        return dict(values)

    def summary(self) -> dict:
        """min/max per counter and whether throttling was ever seen."""
        values = defaultdict(list)
        for _, name, value in self.samples:
            values[name].append(value)
        return {"source": self.source, "samples": len(self.samples),
                "counters": {n: {"min": min(v), "max": max(v)} for n, v in values.items()},
                "throttled": any(values.get("throttled", []))}


# ---------------------------------------------------------------- the run trace
def _perfetto():
    try:
        from perfetto.protos.perfetto.trace import perfetto_trace_pb2
        from perfetto.trace_builder.proto_builder import TraceProtoBuilder
    except ImportError as e:
        raise ImportError(
            "the run timeline needs the `perfetto` package (and protobuf): `pip install "
            "perfetto`, or on a machine without network install the wheels `make gpu-wheels` "
            f"put in wheels/ ({e})") from e
    return TraceProtoBuilder, perfetto_trace_pb2


def track_name(record: dict) -> str:
    """One track per implementation and worker (WORKERS=N): a worker's benchmarks never overlap,
    while two workers' may, and overlapping slices on one track would nest wrongly."""
    worker = record.get("worker")
    return f"{record['op']}/{record['impl']}" + (f" {worker}" if worker else "")


def bench_name(record: dict) -> str:
    mode = record.get("mode")
    return f"{record['case']} {record['dtype']}" + (f" {mode}" if mode not in (None, "fwd") else "")


def _slice_args(record: dict) -> dict:
    return {k: record[k] for k in SLICE_ARGS if record.get(k) not in (None, "", [], {})}


def _record_events(record: dict, track: int, pb) -> list[tuple]:
    """(ts, track, type, name, args) for one benchmark: its slice, the phases nested inside."""
    begin, end = pb.TrackEvent.TYPE_SLICE_BEGIN, pb.TrackEvent.TYPE_SLICE_END
    phases = sorted(record["phases"], key=lambda p: p["start_ns"])
    stop = max(p["end_ns"] for p in phases)
    out = [(phases[0]["start_ns"], track, begin, bench_name(record), _slice_args(record))]
    for p in phases:
        out += [(p["start_ns"], track, begin, p["name"], {}), (p["end_ns"], track, end, "", {})]
    return out + [(stop, track, end, "", {})]


def _annotate(annotation, name: str | None, value) -> None:
    """Fills a DebugAnnotation; dicts and lists nest, so the UI shows dims.M, dims.N, ..."""
    if name is not None:
        annotation.name = name
    if isinstance(value, bool):
        annotation.bool_value = value
    elif isinstance(value, int):
        annotation.int_value = value
    elif isinstance(value, float):
        annotation.double_value = value
    elif isinstance(value, dict):
        for k, v in value.items():
            _annotate(annotation.dict_entries.add(), str(k), v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _annotate(annotation.array_values.add(), None, v)
    else:
        annotation.string_value = str(value)


class _Writer:
    def __init__(self):
        builder_cls, self.pb = _perfetto()
        self.builder = builder_cls()
        self.uuids: dict[str, int] = {}
        self.started = False

    def packet(self, ts: int | None = None):
        p = self.builder.add_packet()
        p.trusted_packet_sequence_id = SEQUENCE_ID
        if not self.started:  # a sequence starts from a clean state
            p.sequence_flags = self.pb.TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
            self.started = True
        if ts is not None:
            p.timestamp = ts
        return p

    def track(self, name: str, counter: bool = False) -> int:
        """Declares a track (before any event on it, as the trace processor expects)."""
        uuid = self.uuids[name] = len(self.uuids) + 1
        descriptor = self.packet().track_descriptor
        descriptor.uuid, descriptor.name = uuid, name
        if counter:
            descriptor.counter.SetInParent()
            unit = _UNITS.get(name.rsplit("_", 1)[-1])
            if unit == "bytes":
                descriptor.counter.unit = self.pb.CounterDescriptor.UNIT_SIZE_BYTES
            elif unit:
                descriptor.counter.unit_name = unit
        return uuid

    def event(self, ts: int, track: int, kind: int, name: str = "", args: dict | None = None,
              value: float | None = None) -> None:
        ev = self.packet(ts).track_event
        ev.track_uuid, ev.type = track, kind
        if name:
            ev.name = name
        for k, v in (args or {}).items():
            _annotate(ev.debug_annotations.add(), k, v)
        if value is not None:
            ev.double_counter_value = value


def write_run_trace(path: Path | str, records: list[dict], samples: list[Sample]) -> None:
    """A native Perfetto trace of the run: benchmark slices and their phases on one track per
    implementation, one counter track per telemetry counter. Records without phases (skipped, or
    failed before they ran) have no place in time and are left out."""
    w = _Writer()
    placed = [r for r in records if r.get("phases")]
    tracks = {name: w.track(name) for name in sorted({track_name(r) for r in placed})}
    counters = {name: w.track(name, counter=True) for name in sorted({s[1] for s in samples})}
    events = [e for r in placed for e in _record_events(r, tracks[track_name(r)], w.pb)]
    counter = w.pb.TrackEvent.TYPE_COUNTER
    events += [(ts, counters[name], counter, "", {}, float(v)) for ts, name, v in samples]
    # Stable: equal times keep their order, so a slice that ends as the next begins closes first.
    for e in sorted(events, key=lambda e: e[0]):
        w.event(*e)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(w.builder.serialize())


# ---------------------------------------------------------------- reading it back
def _annotation_value(a):
    if a.dict_entries:
        return {e.name: _annotation_value(e) for e in a.dict_entries}
    if a.array_values:
        return [_annotation_value(v) for v in a.array_values]
    kind = a.WhichOneof("value")
    return getattr(a, kind) if kind else None


def read_run_trace(path: Path | str) -> dict:
    """{"tracks": {name: [slices]}, "counters": {name: [values]}} from a trace written by
    write_run_trace; a slice is {name, start_ns, end_ns, depth, args} (depth 0: a benchmark)."""
    _, pb = _perfetto()
    trace = pb.Trace()
    trace.ParseFromString(Path(path).read_bytes())
    names, counter_uuids = {}, set()
    for p in trace.packet:
        if p.HasField("track_descriptor"):
            names[p.track_descriptor.uuid] = p.track_descriptor.name
            if p.track_descriptor.HasField("counter"):
                counter_uuids.add(p.track_descriptor.uuid)
    tracks = {names[u]: [] for u in names if u not in counter_uuids}
    counters = {names[u]: [] for u in counter_uuids}
    open_slices = defaultdict(list)
    for p in trace.packet:
        if not p.HasField("track_event"):
            continue
        ev, name = p.track_event, names[p.track_event.track_uuid]
        if ev.type == pb.TrackEvent.TYPE_SLICE_BEGIN:
            open_slices[name].append({"name": ev.name, "start_ns": p.timestamp,
                                      "depth": len(open_slices[name]),
                                      "args": {a.name: _annotation_value(a)
                                               for a in ev.debug_annotations}})
        elif ev.type == pb.TrackEvent.TYPE_SLICE_END:
            tracks[name].append(open_slices[name].pop() | {"end_ns": p.timestamp})
        elif ev.type == pb.TrackEvent.TYPE_COUNTER:
            counters[name].append(ev.double_counter_value)
    for slices in tracks.values():
        slices.sort(key=lambda s: (s["start_ns"], s["depth"]))
    return {"tracks": tracks, "counters": counters}
