import os

import pytest

# The suite trains the tiny random model unless a test names another (fast; the tests' numbers are about it): the
# package's own default, the toy world, is tested by name in tests/test_toy_world.py. Set before anything reads it,
# and inherited by the runs the tests start as subprocesses.
os.environ["LOWMEM_ALIGNPROP_MODEL"] = "tiny"
# plan --fastest and --auto-fit search in this process unless a test asks for workers: xdist's workers already use
# every core
os.environ["LOWMEM_ALIGNPROP_PLAN_JOBS"] = "1"
# every estimate is made, none read from the disk cache (a test may patch what an estimate depends on); the cache's
# own tests (tests/test_estimate_cache.py) turn it on
os.environ["LOWMEM_ALIGNPROP_PLAN_CACHE"] = "off"


def _cores() -> int:
    """The cores this process may run on (the affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (the default, see pyproject.toml): one worker per core, at most one per 3 GiB of memory
    (a worker that trains the mid-size model holds about 2 GiB) and at most 8: a 64-core machine gains little
    past that and a 4 GiB one must not swap."""
    import psutil

    cores = _cores()
    by_memory = int(psutil.virtual_memory().total / 3 / 2**30)
    return max(1, min(cores, by_memory, 8))


def pytest_configure(config):
    """Under xdist, each worker computes with its share of the cores (and so do the processes it starts): N
    workers each using every core would oversubscribe the machine N times over."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        cores = _cores()
        threads = max(1, cores // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Built-in artefacts (the tiny model) go to a per-session cache, never the user's; nothing is downloaded."""
    os.environ["LOWMEM_ALIGNPROP_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    yield


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """A test leaves SIGINT's and SIGTERM's handlers as it found them: a handler left behind changes what a later
    test's Ctrl-C does in the same worker (one such left the wait of test_distributed's Ctrl-C test unended)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    left = {s: h for s, h in ((s, signal.getsignal(s)) for s in before) if h is not before[s]}
    for s in left:
        signal.signal(s, before[s])
    still = signal.pthread_sigmask(signal.SIG_SETMASK, blocked) ^ blocked  # (a mask left: the signals stay pending)
    assert not left and not still, f"the test left signal handlers set: {left}, signals blocked: {still}"


@pytest.fixture(scope="session")
def tiny_dir(_isolated_cache):
    from lowmem_alignprop.models.tiny import tiny_model_dir
    return tiny_model_dir()


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator: a test that trains with another
    mixed precision than the earlier tests' starts and ends with it cleared."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def online_by_setting(monkeypatch):
    """No offline variable set, huggingface_hub in online mode (the hub tests' requests are fakes); the probe's cache
    is cleared before and after. Yields the list a test's stand-in connection appends its probes to."""
    from huggingface_hub import constants

    from lowmem_alignprop.settings import hub_access

    for var in hub_access.OFFLINE_VARS + hub_access.PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub_access.unreachable.cache_clear()
    probes: list[tuple] = []
    yield probes
    hub_access.unreachable.cache_clear()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache of this test's own (huggingface_hub's HF_HUB_CACHE pointed at it)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def fresh_log_handlers():
    """main() calls logging.basicConfig, which binds to the stderr of the first test that ran it: a test that reads
    its own stderr starts with no root handlers, and the earlier ones come back after it."""
    import logging

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    yield
    root.handlers[:] = saved


@pytest.fixture
def cpu_quant(monkeypatch):
    """bitsandbytes on the CPU (tests only): the override of quant.check_device. tests/test_quant.py and
    tests/test_half_precision.py have their own, which also bypass diffusers' GPU check for its loader."""
    from lowmem_alignprop.memory import quant

    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv(quant.CPU_OVERRIDE_ENV, "1")


# Files whose single tests run longest (10-50 s each: the toy world's 20-step runs, full-size planner estimates),
# scheduled first: xdist hands out the groups (largest first) and then single tests in collection order, so long
# ones left to the end would keep one worker busy while the other idles.
LONG_FIRST = ("test_toy_world.py", "test_speed_plan.py", "test_planner.py", "test_alignment_controls.py",
              "test_auto_fit.py", "test_memory_features.py", "test_faults.py", "test_window_keep.py", "test_hub.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: each file's order kept
