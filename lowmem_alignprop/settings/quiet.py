"""The libraries' console chatter: set once per process, by the command line and by plan --fastest's workers."""

from __future__ import annotations

import logging
import os


def quiet_libraries() -> None:
    """Keep the console to our own progress: the libraries' info chatter and download bars go."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import importlib.util
    if "DS_ACCELERATOR" not in os.environ and importlib.util.find_spec("deepspeed") is not None:
        import torch
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # else DeepSpeed warns on every rank that it found no GPU
    for name in ("bitsandbytes", "kernels", "transformers", "diffusers", "accelerate", "peft", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # libraries' Python warnings (deprecations, peft's adapter notes) go to the log at ERROR level only:
    # our own messages are log lines and one-line errors, never warnings
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        from transformers.utils import logging as tlog
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass
