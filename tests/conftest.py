import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

# Before any test module: without a GPU, importing kernels switches Triton to its interpreter. A
# test module that imported triton first, collected before the others, left every interpreted
# kernel after it failing ("Cannot call @triton.jit'd outside of the scope of a kernel").
import kernels  # noqa: F401


SUBPROCESS_FIXTURES = {"two_runs", "profiled"}  # tests/test_bench_run.py, test_profile_run.py


def pytest_addoption(parser):
    parser.addoption(
        "--skip-ran", action="append", default=[], metavar="JUNIT_XML",
        help="deselect the tests that have a result (passed, failed, skipped or error) in this "
             "JUnit XML file of an earlier run; repeatable. A run cut short by a time limit (the "
             "GPU test stage) is finished by a second one: together they run each test once.")
    parser.addoption(
        "--first", action="append", default=[], metavar="TEST_FILE",
        help="run this test file's tests (a name such as test_matmul.py) before the others; "
             "repeatable, in the order given, the rest after them as collected: what a "
             "time-limited run (the GPU test stage) must not miss")


def junit_key(nodeid: str) -> str:
    """A test's id as pytest's JUnit XML writes it: `classname.name`, the file path dotted."""
    path_and_names, bracket, params = nodeid.partition("[")
    path, *names = path_and_names.split("::")
    path = path.removesuffix(".py").replace("/", ".")
    return ".".join([path, *names]) + bracket + params


def ran_in(path: str) -> set[str]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise pytest.UsageError(f"--skip-ran {path}: not a readable JUnit XML file ({e})") from e
    # a test interrupted by the time limit leaves a testcase with no name: it has no result
    return {f"{case.get('classname')}.{case.get('name')}" for case in root.iter("testcase")
            if case.get("name")}


def pytest_collection_modifyitems(config, items):
    ran = set().union(*(ran_in(p) for p in config.getoption("skip_ran")))
    if ran:
        done = [item for item in items if junit_key(item.nodeid) in ran]
        items[:] = [item for item in items if junit_key(item.nodeid) not in ran]
        config.hook.pytest_deselected(items=done)
    first = config.getoption("first")
    unknown = sorted(set(first) - {p.name for p in Path(__file__).parent.glob("test_*.py")})
    if unknown:
        raise pytest.UsageError(f"--first: no test file {', '.join(unknown)} in tests/")
    if first:  # a stable sort: within a file, and after the named ones, collection order
        def rank(item):
            name = item.path.name
            return first.index(name) if name in first else len(first)
        items.sort(key=rank)
    # The tests sharing a module-scoped fixture that runs benchmarks in a subprocess go to one
    # pytest-xdist worker (--dist loadgroup): spread over N workers, each would run it again.
    for item in items:
        shared = SUBPROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if shared:
            item.add_marker(pytest.mark.xdist_group(min(shared)))
    # Tests marked `gpu` need CUDA; without it they are reported as skipped, with the reason.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
