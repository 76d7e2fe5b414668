"""What a run prints and how: standard `logging`, text or JSON lines, known Ray and torch noise removed.

Every module logs through `logging.getLogger(__name__)` (the `jobs.*` loggers); the CLI calls
`configure` once per command. Lines go to the *current* `sys.stdout` (the run's report, as
the commands always printed it); the CLI's final error line goes to stderr. With
`--log-format json` each line is one JSON object (`time`, `level`, `logger`, `message`) for
cluster log collectors. `--quiet` keeps warnings and errors only.

Ray's known noise on a healthy run, and what is done about each:

- "Token authentication is enabled for this Ray cluster": Ray 2.60 turns token auth on for a
  new local cluster when RAY_AUTH_MODE is unset, and says so. The protection is wanted (the
  embedded Ray keeps it); presetting RAY_AUTH_MODE=token instead makes the GCS refuse the
  driver (the token is then never generated), so the line is filtered on its logger.
- "Progress bars disabled": Ray Data warns when its per-operator bars are off; ours replace
  them (pipeline/progress.py). Filtered by message on the logger that emits it.
- `core_worker.cc ... constructor arguments in the object store and max_restarts > 0`: Ray
  Data (2.60) passes every actor-pool worker its transform and data context by ObjectRef
  (ray.put), whatever the UDF's `fn_constructor_kwargs` hold, and Ray Core reports any actor
  created with a by-reference argument and restarts enabled (ray-project/ray#53727). The
  operator holds both refs until the dataset finishes, so restarts during the job work. The
  line comes from Ray's C++ core straight onto file descriptor 2, past Python's logging:
  `native_stderr_filter` drops exactly that line while the pipeline runs (not at debug level).

And torch's: "No CUDA runtime is found, using CUDA_HOME=...", which torch's C++-extension
builder logs when inductor imports it on a machine without a GPU (`--decoder-compile` or
`--compile` on CPU). We build no extension and inductor's CPU code needs no CUDA; filtered on
its logger like Ray's lines.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
OUR_LOGGERS = ("jobs", "persam_core")
# (logger that emits it, what the message holds): known Ray and torch noise on a healthy run.
KNOWN_NOISE = (
    ("ray.data._internal.progress", "Progress bars disabled"),
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled"),
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
)
# Lines Ray's C++ core writes to file descriptor 2 (module docstring).
NATIVE_NOISE = re.compile(r"core_worker\.cc:\d+: .*has constructor arguments in the object store and max_restarts > 0")


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "text"
    interactive: bool = False  # stderr was a terminal when the command started: a live progress bar

    @property
    def debug(self) -> bool:
        return self.level == "debug"


_settings = LogSettings()


def settings() -> LogSettings:
    return _settings


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (tests and callers may swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class TextFormatter(logging.Formatter):
    """The message as the commands always printed it; warnings and errors say so first."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            word = "warning" if record.levelno < logging.ERROR else "error"
            if not message.startswith(f"{word}:"):
                message = f"{word}: {message}"
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return message


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message (+ traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        for key in ("command", "exit_code"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        return json.dumps(entry, ensure_ascii=False)


def json_line(level: str, message: str, **fields) -> str:
    """A line in the JSON log format outside logging (the CLI's final error on stderr)."""
    record = logging.LogRecord("jobs.cli", getattr(logging, level.upper()), "", 0, message, None, None)
    record.__dict__.update(fields)
    return JsonFormatter().format(record)


class _Drop(logging.Filter):
    def __init__(self, phrase: str) -> None:
        super().__init__()
        self.phrase = phrase

    def filter(self, record: logging.LogRecord) -> bool:
        return self.phrase not in record.getMessage()


def configure(level: str = "info", quiet: bool = False, log_format: str = "text") -> LogSettings:
    """Set up the `jobs` / `persam_core` loggers for one command (idempotent); Ray's loggers
    at warning (debug: as Ray sets them) with the known noise filtered."""
    global _settings
    if level not in LOG_LEVELS or log_format not in LOG_FORMATS:
        raise ValueError(f"--log-level {level} / --log-format {log_format}: choose {LOG_LEVELS} / {LOG_FORMATS}")
    level = "warning" if quiet and level in ("debug", "info") else level
    interactive = bool(getattr(sys.stderr, "isatty", lambda: False)())
    _settings = LogSettings(level, log_format, interactive)
    handler = _CurrentStdout()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    for name, phrase in KNOWN_NOISE:
        logger = logging.getLogger(name)
        logger.filters[:] = [] if _settings.debug else [_Drop(phrase)]
    return _settings


def ray_logging_level() -> int:
    """The level Ray's own Python loggers run at: ours, but never chattier than warning unless debugging."""
    return logging.DEBUG if _settings.debug else max(logging.WARNING, getattr(logging, _settings.level.upper()))


@contextmanager
def native_stderr_filter(pattern: re.Pattern = NATIVE_NOISE) -> Iterator[None]:
    """Drop lines matching `pattern` that native code writes to file descriptor 2.

    fd 2 becomes a pipe that a thread copies to the real stderr, line by line, leaving out
    matches. Install it only after Ray started its processes (they inherit fd 2) and leave
    before shutdown. Python's own sys.stderr writes pass through unchanged."""
    if _settings.debug:
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (a daemonised process): nothing to filter
        yield
        return
    read_end, write_end = os.pipe()

    def copy() -> None:
        with os.fdopen(read_end, "rb") as source:
            for line in source:
                if not pattern.search(line.decode("utf-8", "replace")):
                    try:
                        os.write(saved, line)
                    except OSError:  # the real stderr went away: nothing left to show it on
                        return

    thread = threading.Thread(target=copy, name="stderr-filter", daemon=True)
    thread.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # closes our write end: the thread sees EOF unless a child process holds one
        thread.join(timeout=5)
        if not thread.is_alive():  # else keep `saved` open: a reused descriptor number would get its lines
            os.close(saved)
