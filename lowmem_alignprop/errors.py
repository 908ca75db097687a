"""The one exception type for bad user input: the CLI prints its message and exits 2."""

import contextlib


class UserError(Exception):
    """Bad input the user can fix. The message must name the fix; no traceback is shown."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of a library's error message (or its type), short enough for a one-line error."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


@contextlib.contextmanager
def same_on_every_rank():
    """UserErrors raised inside depend on the inputs alone, so every process of an ``accelerate launch`` finds the
    same one: rank 0 alone prints it (not once per GPU)."""
    try:
        yield
    except UserError as e:
        e.same_on_every_rank = True
        raise
