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
