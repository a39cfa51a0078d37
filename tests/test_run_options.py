"""The test suite's own options (tests/conftest.py), for time-limited runs such as the GPU test
stage: --skip-ran finishes a run cut short by leaving out what the first one's JUnit XML holds;
--first runs the named test files before the rest."""
import inspect
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tests import test_bench_run, test_profile_run
from tests.conftest import SUBPROCESS_FIXTURES, junit_key, ran_in

ROOT = Path(__file__).resolve().parent.parent
# ids with the characters that pytest's JUnit XML writer treats specially: dots, slashes and
# "::" inside parameters, brackets, spaces, '>' (escaped in XML), and a test in a class
SAMPLE = '''
import pytest

@pytest.mark.parametrize("x", ["a>b", "c d", "[e]", "f::g", "h.i/j"])
def test_param(x):
    pass

class TestGroup:
    def test_method(self):
        pass

def test_plain():
    pass
'''


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "tests.conftest", str(tmp_path / "sub" / "test_sample.py"),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _names(xml: Path) -> set[str]:
    return {f"{c.get('classname')}.{c.get('name')}"
            for c in ET.parse(xml).getroot().iter("testcase")}


def _sample(tmp_path: Path) -> None:
    """The sample test file in a directory of its own, which a pytest.ini makes the rootdir
    (the repository's pyproject.toml does that for the suite): without one, pytest takes the
    common ancestor of every path on the command line, XML files included, and the test ids
    would change with where those files are."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "sub" / "test_sample.py").write_text(SAMPLE)


def test_a_second_run_runs_exactly_the_tests_the_first_did_not(tmp_path):
    _sample(tmp_path)
    first = _pytest(tmp_path, "-k", "param", f"--junitxml={tmp_path / 'first.xml'}")
    assert "5 passed" in first.stdout, first.stdout + first.stderr
    second = _pytest(tmp_path, "--skip-ran", str(tmp_path / "first.xml"),
                     f"--junitxml={tmp_path / 'second.xml'}")
    assert "2 passed, 5 deselected" in second.stdout, second.stdout + second.stderr
    first_names, second_names = _names(tmp_path / "first.xml"), _names(tmp_path / "second.xml")
    assert not first_names & second_names and len(first_names | second_names) == 7
    # both files given: nothing is left to run
    third = _pytest(tmp_path, "--skip-ran", str(tmp_path / "first.xml"),
                    "--skip-ran", str(tmp_path / "second.xml"))
    assert "7 deselected" in third.stdout, third.stdout + third.stderr


def test_junit_key_is_the_name_pytest_writes():
    assert junit_key("tests/test_x.py::TestA::test_b[p::q/r.s]") == \
        "tests.test_x.TestA.test_b[p::q/r.s]"


def test_a_test_cut_off_by_the_time_limit_did_not_run(tmp_path):
    """pytest interrupted (SIGINT from `timeout`) writes the tests it was running as testcases
    without a name; they run again in the second run."""
    xml = tmp_path / "cut.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="1">'
                   '<testcase classname="tests.test_x" name="test_a[p&gt;q]" time="0.1" />'
                   '<testcase time="0.001" /></testsuite></testsuites>')
    assert ran_in(str(xml)) == {"tests.test_x.test_a[p>q]"}


def test_an_unreadable_file_is_a_usage_error(tmp_path):
    _sample(tmp_path)
    (tmp_path / "bad.xml").write_text("not xml")
    proc = _pytest(tmp_path, "--skip-ran", str(tmp_path / "bad.xml"))
    assert proc.returncode == 4, proc.stdout + proc.stderr  # pytest's usage error
    assert "--skip-ran" in proc.stderr and "bad.xml" in proc.stderr


def _collected_files(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--collect-only", "tests/test_harness.py", "tests/test_trace.py",
                           "tests/test_targets.py", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_first_runs_the_named_files_before_the_rest_in_the_order_given():
    proc = _collected_files("--first", "test_trace.py", "--first=test_targets.py")
    files = [line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line]
    order = list(dict.fromkeys(files))
    assert order == ["tests/test_trace.py", "tests/test_targets.py", "tests/test_harness.py"], \
        proc.stdout[-2000:] + proc.stderr[-2000:]
    # within a file, collection order is kept
    plain = _collected_files()
    trace = [line for line in plain.stdout.splitlines() if line.startswith("tests/test_trace.py")]
    assert [line for line in proc.stdout.splitlines() if line.startswith("tests/test_trace.py")] \
        == trace


def test_first_names_a_file_that_is_not_there():
    proc = _collected_files("--first", "test_nope.py")
    assert proc.returncode == 4 and "--first: no test file test_nope.py" in proc.stderr


def test_tests_sharing_a_benchmark_subprocess_go_to_one_worker():
    """Under --dist loadgroup the tests of a module-scoped fixture that runs benchmarks in a
    subprocess share an xdist group, so the fixture runs once, not once per worker; the rest
    carry no group and spread as before."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--collect-only", "-m", "xdist_group", "tests/test_bench_run.py",
                           "tests/test_profile_run.py", "tests/test_run_options.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    grouped = {line for line in proc.stdout.splitlines() if "::" in line}
    using = {f"tests/{module.__name__.split('.')[-1]}.py::{name}"
             for module in (test_bench_run, test_profile_run)
             for name, fn in vars(module).items() if name.startswith("test_")
             and SUBPROCESS_FIXTURES & set(inspect.signature(fn).parameters)}
    assert len(using) >= 2 and grouped == using, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_make_summary_reads_the_latest_run_or_the_one_named():
    """RUN always holds a value (a fresh timestamp when not given): make summary tested it, and
    without RUN looked for a run named by the time of the call instead of reports/latest."""
    root = Path(__file__).resolve().parent.parent

    def command(*args):
        done = subprocess.run(["make", "-n", "--no-print-directory", "summary",
                               f"PYTHON={sys.executable}", *args], cwd=root,
                              capture_output=True, text=True, check=True)
        return done.stdout.strip().splitlines()[-1]

    assert command().endswith("-m harness.summary reports/latest")
    assert command("RUN=abc").endswith("-m harness.summary abc")  # a run id or a directory
