"""The benchmarks: one test per (op, case, dtype, mode, implementation), from the registry and the
case list. Run through `make bench`; see harness/plugin.py for the options."""
import pytest


def _feed_device_time(benchmark, samples):
    """pytest-benchmark times the host; hand it the measured device time instead. Pedantic mode
    with a clock that advances by one measured sample per round, so its statistics (and
    --benchmark-compare) are the device-time statistics."""
    clock = [0.0]
    it = iter(samples)

    def replay():  # --benchmark-cprofile calls it once more, after the rounds: no sample left
        clock[0] += next(it, 0.0)

    benchmark._timer = lambda: clock[0]
    benchmark.pedantic(replay, rounds=len(samples), iterations=1, warmup_rounds=0)


# A benchmark that failed or was skipped hands pytest-benchmark no device time (pyproject.toml
# silences its "fixture was not used" warning): a wrong result's time stays in its record only,
# so pytest-benchmark's comparisons (--benchmark-compare-fail) see no figure for it.
def test_bench(bench_item, bench_run, benchmark):
    not_run = bench_run.runner.cannot_run(bench_item)
    if not_run:
        pytest.skip(not_run)  # no record: the resumed run measures it
    record, timing = bench_run.runner.run(bench_item)
    bench_run.add(record)
    benchmark.group = bench_item.group
    benchmark.extra_info.update({k: record.get(k) for k in (
        "op", "impl", "case", "dtype", "mode", "status", "reason", "tflops", "gbps", "rel_err",
        "peak_bytes", "compile_cold_s", "compile_warm_s", "spread", "timing_method", "host_s",
        "autotuned")})
    if timing is not None and record["status"] == "ok":
        _feed_device_time(benchmark, timing.samples)
    if record["status"] == "skipped":
        pytest.skip(record["reason"])
    if record["status"] == "failed":
        pytest.fail(f"{bench_item.id}: {record['reason']}", pytrace=False)
