"""The one exception type for bad user input: the CLI prints its message and exits 2."""

import argparse
import contextlib
import reprlib


class UserError(Exception):
    """Bad input the user can fix. The message must name the fix; no traceback is shown."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with its usage errors as UserErrors: one line naming ``--help`` and exit 2, not the whole
    usage text above argparse's line."""

    def error(self, message: str):
        raise UserError(f"{message}: see {self.prog} --help")

    def parse_known_args(self, args=None, namespace=None):
        """An option given an empty value is refused: a script's ``--resume "$CKPT"`` with CKPT unset started the
        run over, ``--init-lora "$LORA"`` trained a fresh LoRA, in silence."""
        parsed, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(parsed, action.dest, None)
            if action.option_strings and isinstance(value, str) and not value.strip() and value != action.default:
                self.error(f"{action.option_strings[-1]} {value!r} is empty (an unset shell variable?): give a value, "
                           "or drop the option")
        return parsed, extras


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of a library's error message (or its type), short enough for a one-line error."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


def error_words(error: BaseException, limit: int = 300, when: str = "") -> str:
    """``Type when: first line`` of an error (:func:`first_line`) for a one-line message; its type (and ``when``)
    alone where it says nothing of its own (a bare KeyboardInterrupt read "KeyboardInterrupt: KeyboardInterrupt")."""
    head = f"{type(error).__name__} {when}" if when else type(error).__name__
    return f"{head}: {first_line(error, limit)}" if str(error).strip() else head


def nearest(word: str, choices, fold=str.lower) -> str | None:
    """The choice a mistyped ``word`` most likely meant (difflib's closest, compared after ``fold``: case, and for
    names written with - or _ both), else None: the one rule for every "did you mean"."""
    import difflib

    folded = {fold(str(c)): c for c in choices}
    near = difflib.get_close_matches(fold(word), list(folded), n=1)
    return str(folded[near[0]]) if near else None


def did_you_mean(word: str, choices, fold=str.lower) -> str:
    """" (did you mean X?)" for a message, or "" where nothing is near."""
    near = nearest(word, choices, fold)
    return f" (did you mean {near}?)" if near else ""


_QUOTE = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother = 2, 60, 60
_QUOTE.maxlist = _QUOTE.maxdict = _QUOTE.maxtuple = _QUOTE.maxset = 4


def quote(value, limit: int = 80) -> str:
    """``repr(value)`` for a message, bounded: a value from a user's file (a YAML alias bomb is a few hundred
    bytes that expand to gigabytes) is never expanded in full."""
    text = _QUOTE.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quote_name(name: str, limit: int = 200) -> str:
    """A name from a user's file (a LoRA's key, a layer's path) for a message, in full where it is no longer than
    ``limit`` (:func:`quote` shortens anything past 60 characters in the middle: a key the file does not hold)."""
    return repr(name) if len(name) <= limit else quote(name, limit)


@contextlib.contextmanager
def same_on_every_rank():
    """UserErrors raised inside depend on the inputs alone, so every process of an ``accelerate launch`` finds the
    same one: rank 0 alone prints it (not once per GPU)."""
    try:
        yield
    except UserError as e:
        e.same_on_every_rank = True
        raise
