import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Built-in artefacts (the tiny model) go to a per-session cache, never the user's; nothing is downloaded."""
    os.environ["LOWMEM_ALIGNPROP_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    yield


@pytest.fixture(scope="session")
def tiny_dir(_isolated_cache):
    from lowmem_alignprop.tiny import tiny_model_dir
    return tiny_model_dir()


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator: a test that trains with another
    mixed precision than the earlier tests' starts and ends with it cleared."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
