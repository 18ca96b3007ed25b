import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402
from common import TINY  # noqa: E402

# Every process the tests start inherits this id (procs.py), also torchrun's workers after a kill.
SESSION_ID = os.environ[procs.SESSION] = procs.new_id()
TEST_GRACE_S = 10  # for a test's processes to exit after it ends, before SIGKILL
SESSION_GRACE_S = 15


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call":
        item.call_failed = outcome.get_result().failed


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
def tiny_components(tmp_path_factory) -> Path:
    """Frozen parts (tokenizer, text encoder, first-stage VAE) built once and copied into runs."""
    import torch

    from colodiffusion.config import load_config
    from colodiffusion.data import build_dataset
    from colodiffusion.train.first_stage import frozen_components

    torch.set_num_threads(2)
    folder = tmp_path_factory.mktemp("components")
    cfg = load_config(None, TINY)
    frozen_components(cfg, build_dataset(cfg), folder, torch.device("cpu"), show_progress=False)
    return folder


@pytest.fixture
def run_dir(tmp_path, tiny_components) -> Path:
    """A run folder that already holds the shared frozen components."""
    d = tmp_path / "run"
    shutil.copytree(tiny_components, d / "components")
    return d
