"""The one exception type for bad user input: the CLI prints its message and exits 2."""


class UserError(Exception):
    """Bad input the user can fix. The message must name the fix; no traceback is shown."""
