import os
import shutil
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (-n N) every process is one of several on the machine: one compute thread each, for
# the worker and for every process it starts (the CLI keeps an OMP_NUM_THREADS it finds), instead of
# threads that spin waiting for each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402
from common import TINY, built_once  # noqa: E402

# Every process the tests start inherits this id (procs.py), also torchrun's workers after a kill.
SESSION_ID = os.environ[procs.SESSION] = procs.new_id()
TEST_GRACE_S = 10  # for a test's processes to exit after it ends, before SIGKILL
SESSION_GRACE_S = 15


# -- CI policy (CI=true, as .ci/run and CI services set it) ------------------------------------------
# Every test must run there: a skip (a missing engine, extra or tool) is a failure, and a full run
# must run at least CI_MIN_TESTS tests (a directory pytest stops collecting, or a module that fails to
# import, shows up as a drop). Raise the number when you add tests. Tests marked `cuda` are deselected
# where no CUDA GPU is visible, and tests marked `no_cuda` where one is (reported as deselected, never
# as skipped): what a machine cannot run is not a skip.
CI_MIN_TESTS = 719  # what .ci/run collects: a CPU machine, the test extra, both engines (a GPU one runs 718)
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_ran: set[str] = set()


def _skip_fails_ci(report) -> None:
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome, report.longrepr = "failed", f"skipped, and CI=true runs every test: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    _skip_fails_ci(report)
    if call.when == "call":
        item.call_failed = report.failed


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _skip_fails_ci(outcome.get_result())  # a module-level importorskip


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject addopts): one worker per core, at most 4 (the torchrun tests start 2 ranks each)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def _heaviest_files_first(items) -> None:
    """The colour guard (minutes) first, then files with end-to-end `slow` runs, then the rest, file by
    file: `--dist worksteal` (pyproject) gives each worker a contiguous share in this order and lets an idle
    one take the end of another's, so no long test starts last and a file mostly stays on one worker
    (its module fixtures built once). Measured with 2 workers on the idle 2-core machine: 24 min 4 s, and
    24 min 3 s with `--dist loadfile` (which hands out the files with the most tests first, the guard last):
    the whole suite is bound by its CPU-minutes (31.9 measured on 2026-12-05: 17 min 48 s), not by the order;
    a third worker on 2 cores made it slower (20 min 9 s)."""
    heavy = {i.path for i in items if i.get_closest_marker("slow")}
    first = {i.path for i in items if i.path.name == "test_learns.py"}
    rank = {path: (0 if path in first else 1 if path in heavy else 2) for path in {i.path for i in items}}
    items.sort(key=lambda i: rank[i.path])  # stable: collection order within each rank and file


def pytest_collection_modifyitems(config, items):
    import torch

    _heaviest_files_first(items)

    other = "no_cuda" if torch.cuda.is_available() else "cuda"  # the marker that cannot run on this machine
    impossible = [i for i in items if i.get_closest_marker(other)]
    if impossible:
        config.hook.pytest_deselected(items=impossible)
        items[:] = [i for i in items if not i.get_closest_marker(other)]


def pytest_runtest_logreport(report):
    _ran.add(report.nodeid)  # in the controller too under xdist: workers send it every report


def _full_ci_run(config) -> bool:
    """CI=true, the README's whole command (no paths, -k or -m), in the process that sees every report."""
    o = config.option
    return (CI and config.args_source == pytest.Config.ArgsSource.TESTPATHS and not (o.keyword or o.markexpr)
            and not o.collectonly and not hasattr(config, "workerinput"))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    if _full_ci_run(session.config) and len(_ran) < CI_MIN_TESTS and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    if _full_ci_run(config) and len(_ran) < CI_MIN_TESTS:
        terminalreporter.write_line(f"CI: {len(_ran)} tests ran, fewer than the {CI_MIN_TESTS} this repo has "
                                    "(tests/conftest.py CI_MIN_TESTS): some were not collected", red=True)


@pytest.fixture(autouse=True)
def reap_test_processes(request, monkeypatch):
    """Whatever a test started is gone when it ends, even after a failed assertion: stragglers get
    TEST_GRACE_S to exit, then SIGKILL. A test that passed but left processes running fails here."""
    test_id = procs.new_id()
    monkeypatch.setenv(procs.TEST, test_id)
    yield
    left = procs.wait_gone(procs.TEST, test_id, timeout=TEST_GRACE_S)
    procs.kill(procs.TEST, test_id, left)
    if left and not getattr(request.node, "call_failed", True):
        pytest.fail(f"the test left {len(left)} process(es) running (now killed): {procs.describe(left)}")


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite():
    """At the end of the session no process started by the tests (our session id in its environment,
    wherever it was re-parented) may still be alive; any that is gets killed and fails the run."""
    yield
    left = procs.wait_gone(procs.SESSION, SESSION_ID, timeout=SESSION_GRACE_S)
    procs.kill(procs.SESSION, SESSION_ID, left)
    if left:
        pytest.fail(f"{len(left)} process(es) started by the tests were still alive at the end of the "
                    f"session (now killed): {procs.describe(left)}")


@pytest.fixture(scope="session")
def tiny_components(pytestconfig, tmp_path_factory) -> Path:
    """Frozen parts (tokenizer, text encoder, first-stage VAE) built once per session (shared by the
    xdist workers) and copied into runs; tests/faults uses the same ones."""
    def build(folder: Path) -> None:
        import torch

        from colodiffusion.config import load_config
        from colodiffusion.data import build_dataset, dataset_args
        from colodiffusion.train.first_stage import frozen_components

        cfg = load_config(None, TINY)
        frozen_components(cfg, build_dataset(*dataset_args(cfg)), folder, torch.device("cpu"), show_progress=False)

    return built_once(pytestconfig, tmp_path_factory, "components", build)


@pytest.fixture
def run_dir(tmp_path, tiny_components) -> Path:
    """A run folder that already holds the shared frozen components."""
    d = tmp_path / "run"
    shutil.copytree(tiny_components, d / "components")
    return d
