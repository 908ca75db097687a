"""Can the Hugging Face hub be reached, and the few hundred bytes that say what a hub id is.

Without network (a laptop on a train, a cluster node) huggingface_hub retries every file for about 25 s
before giving up. One TCP connection to the hub's endpoint (about 5 ms when DNS already fails, at most
``TIMEOUT`` s) decides instead; behind a proxy a direct connection says nothing, so no probe is made and the
real request decides. run/hub.offline acts on the answer (huggingface_hub to offline mode, one log line);
here is the question, low enough for the settings to ask it (``--profile auto`` reads a hub id's
model_index.json before the profile is chosen).
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

TIMEOUT = 5.0  # seconds for the DNS lookup + TCP connect to the endpoint, in all (a working link answers within 1 s)
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def offline_by_setting() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set (or huggingface_hub is already in offline mode)."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=1)
def unreachable() -> str | None:
    """Why the hub's endpoint cannot be reached, or None (reachable, or a proxy is set: only a request can tell)."""
    if any(os.environ.get(v) for v in PROXY_VARS):
        return None
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    outcome: list[OSError | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=TIMEOUT):
                outcome.append(None)
        except OSError as e:
            outcome.append(e)

    # create_connection's timeout bounds the connect, not the DNS lookup before it (a resolver that does not answer
    # held the start for its own retries): the probe waits TIMEOUT in all, its thread left to end on its own
    probe = threading.Thread(target=connect, name="hub-probe", daemon=True)
    probe.start()
    probe.join(TIMEOUT)
    if not outcome:
        return f"{host} gave no answer within {TIMEOUT:g} s (its name lookup and connection)"
    if (e := outcome[0]) is None:
        return None
    if isinstance(e, socket.gaierror):
        return f"{host} cannot be resolved ({e.strerror or e})"
    return f"{host}:{port} cannot be reached ({e.strerror or type(e).__name__})"  # refused, no route, timeout


def hub_file(repo: str, filename: str, *, download: bool = False, revision: str = "") -> Path | None:
    """A small file of hub repository ``repo`` (model_index.json, a config.json) at ``revision`` (a branch, tag or
    commit; "": main): from the local hub cache, or with ``download`` fetched when the hub can be reached; None when
    neither gives it (not a repository id, not cached and offline, gated, missing). Never raises: the model's
    loading says what is wrong with the id."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(cached, str):
            return Path(cached)
        if not download or offline_by_setting() or unreachable():
            return None
        return Path(hf_hub_download(repo, filename, revision=revision or None))
    except Exception:  # noqa: BLE001 - an invalid id, a gated or missing repository, a failed request: unknown
        return None
