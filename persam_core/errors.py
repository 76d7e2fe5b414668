"""How an error reads on one line: "Type: first line of its message".

One owner for the fallback notes of the fast paths (a compiled encoder or decoder that
failed), the job's error rows ("decode failed: ...") and the CLI's last word, which
scrubs secrets from it on top.
"""

from __future__ import annotations

ONE_LINE_LIMIT = 500  # characters: an error row or a log line, not a traceback


def message_line(error: BaseException) -> str:
    """The first line of an error's message, "" if it has none. A KeyError's str() is a
    repr (quotes, escaped newlines): its message itself is taken where there is one."""
    single = len(error.args) == 1 and isinstance(error.args[0], str)
    text = (error.args[0] if single else str(error)).strip()
    return text.splitlines()[0] if text else ""


def describe(error: BaseException, limit: int = ONE_LINE_LIMIT) -> str:
    """-> "Type: first line" (just "Type" without a message), at most `limit` characters."""
    line = message_line(error)
    return f"{type(error).__name__}: {line}"[:limit] if line else type(error).__name__
