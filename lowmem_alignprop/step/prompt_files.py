"""What every prompt file's reading shares, a text file's (one prompt per line, step/prompts.py) and a table's
(step/prompt_tables.py): its text is UTF-8 (or UTF-16 with its mark), and a prompt holds no control character."""

from __future__ import annotations

from pathlib import Path

from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.paths import NotText, read_user_text


def prompt_file_text(path: Path) -> str:
    """The text of prompt file ``path`` (a regular file: step/prompts checks it first): UTF-8 (a byte-order mark too),
    or UTF-16 as PowerShell's > writes it; else one line naming the fix."""
    try:
        return read_user_text(path)
    except NotText as exc:
        raise UserError(f"prompt file {path} {exc}; save it as UTF-8 (Notepad: Save as, Encoding UTF-8)") from None
    except OSError as exc:
        raise UserError(f"cannot read prompt file {path} ({exc.strerror}); check its permissions") from exc


def control_character(text: str) -> str | None:
    """What ``text`` (a line, a table's cell) holds that no prompt may: 'the control character '\\x00'' or 'the line
    separator '\\u2028'' (valid UTF-8 can still be no text: NUL bytes, escapes); None for text. A tab is text."""
    control = next((c for c in text if ord(c) < 32 and c != "\t" or 127 <= ord(c) < 160 or c in "\u2028\u2029"),
                   None)
    if control is None:
        return None
    what = "line separator" if control in "\u2028\u2029" else "control character"
    return f"the {what} {control!r}"
