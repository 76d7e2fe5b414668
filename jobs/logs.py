"""What a run prints and how: standard `logging`, text or JSON lines, known Ray and torch noise removed.

Every module logs through `logging.getLogger(__name__)` (the `jobs.*` loggers); the CLI calls
`configure` once per command. Lines go to the *current* `sys.stdout` (the run's report, as
the commands always printed it); the CLI's final error line goes to stderr. With
`--log-format json` each line is one JSON object (`time`, `level`, `logger`, `message`) for
cluster log collectors, and so is every line on stderr, whoever writes it: Python warnings go
through logging, everything else is wrapped line by line on file descriptor 2 (`json_stderr`;
docs/guarantees-process.md). `--quiet` keeps warnings and errors only.

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
from typing import Callable, Iterator

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
    """Writes to whatever sys.stdout (or sys.stderr) is at the time (tests and callers may swap it)."""

    def __init__(self, name: str = "stdout") -> None:
        self.name_of_stream = name
        super().__init__(getattr(sys, name))

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self.name_of_stream)

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
        for key in ("command", "exit_code", "source", "pid"):
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
    _capture_warnings(log_format == "json")
    return _settings


def _capture_warnings(as_json: bool) -> None:
    """JSON lines: Python warnings (PIL's, torch's, any library's) become log records, one
    JSON object each on stderr where warnings always went, instead of the two raw lines
    `warnings` prints (the message, then the source line)."""
    logging.captureWarnings(as_json)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers[:] = []
    warnings_logger.propagate = not as_json
    if as_json:
        handler = _CurrentStdout("stderr")
        handler.setFormatter(JsonFormatter())
        warnings_logger.addHandler(handler)


def ray_logging_level() -> int:
    """The level Ray's own Python loggers run at: ours, but never chattier than warning unless debugging."""
    return logging.DEBUG if _settings.debug else max(logging.WARNING, getattr(logging, _settings.level.upper()))


class _Fd2Pump:
    """File descriptor 2 through a line filter: fd 2 becomes a pipe that a daemon thread
    copies, line by line and through `transform` (None drops the line), to the real stderr.

    Everything that writes to stderr passes: Python's sys.stderr, native code (Ray's C++ core,
    glog), and any child process started meanwhile that inherits fd 2. `stop` puts the real
    stderr back and returns once every line this process wrote before it went out; the thread
    keeps copying for children that still hold the pipe (so they never block on a full pipe),
    and ends when the last of them closes it."""

    _DRAINED = b"\x00persam-stderr-drained\n"

    def __init__(self, transform: Callable[[bytes], bytes | None]) -> None:
        self.transform = transform
        self.drained = threading.Event()

    def start(self) -> bool:
        try:
            self.saved = os.dup(2)
        except OSError:  # no fd 2 (a daemonised process): nothing to pass through
            return False
        read_end, self.write_end = os.pipe()
        threading.Thread(target=self._copy, args=(read_end,), name="stderr-lines", daemon=True).start()
        os.dup2(self.write_end, 2)
        return True

    def _copy(self, read_end: int) -> None:
        with os.fdopen(read_end, "rb") as source:
            for line in source:
                drained = line.endswith(self._DRAINED)
                line = line[: -len(self._DRAINED)] if drained else line
                if line:
                    self._write(line if line.endswith(b"\n") else line + b"\n")
                if drained:
                    self.drained.set()
        self.drained.set()
        os.close(self.saved)

    def _write(self, line: bytes) -> None:
        try:
            out = self.transform(line)
        except Exception:  # a filter's bug must not stop the copying (writers would block)
            out = line
        if out:
            try:
                os.write(self.saved, out)
            except OSError:  # the real stderr went away: nothing left to show it on
                pass

    def stop(self) -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.saved, 2)  # our own writes go straight to the real stderr again
        try:
            os.write(self.write_end, self._DRAINED)
        except OSError:
            pass
        os.close(self.write_end)
        self.drained.wait(timeout=10)


@contextmanager
def _pumped(transform: Callable[[bytes], bytes | None]) -> Iterator[None]:
    pump = _Fd2Pump(transform)
    started = pump.start()
    try:
        yield
    finally:
        if started:
            pump.stop()


@contextmanager
def native_stderr_filter(pattern: re.Pattern = NATIVE_NOISE) -> Iterator[None]:
    """Drop lines matching `pattern` that native code writes to file descriptor 2 (Python's
    sys.stderr passes through unchanged); not at debug level."""
    if _settings.debug:
        yield
        return
    with _pumped(lambda line: None if pattern.search(line.decode("utf-8", "replace")) else line):
        yield


# Ray's log_to_driver prefix on a worker's line, e.g. "(Map(prepare_chunk) pid=4242, ip=10.0.0.2) "
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_RAY_PREFIX = re.compile(r"^\((?P<source>.+?) pid=(?P<pid>\d+)(?:, ip=[^)]*)?\)\s?")
_GLOG = re.compile(r"^\[[^\]]*? (?P<severity>[DIWEF]) \d+ \d+\]")
_GLOG_LEVELS = {"D": "debug", "I": "info", "W": "warning", "E": "error", "F": "critical"}
_PY_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
_ERROR_WORDS = re.compile(r"Traceback|\w*Error\b|\w*Exception\b")


def _level_of(text: str) -> str:
    """A foreign stderr line's level, as far as its own format says (else warning: stderr
    carries diagnostics)."""
    glog = _GLOG.match(text)
    if glog:
        return _GLOG_LEVELS[glog.group("severity")]
    named = _PY_LEVEL.search(text[:80])
    if named:
        return named.group(1).lower()
    if _ERROR_WORDS.search(text) and "Warning" not in text:
        return "error"
    return "warning"


def json_stderr_line(line: bytes) -> bytes | None:
    """One line written to stderr -> one JSON object line: JSON objects pass unchanged; any
    other line (a library's print, a raw warning, Ray's coloured worker lines, native glog
    lines) is wrapped with a level guessed from its format; blank lines are dropped."""
    text = _ANSI.sub("", line.decode("utf-8", "replace")).rstrip("\r\n")
    if not text.strip():
        return None
    if text.startswith("{"):
        try:
            if isinstance(json.loads(text), dict):
                return text.encode() + b"\n"
        except ValueError:
            pass
    fields, logger_name = {}, "stderr"
    prefix = _RAY_PREFIX.match(text)
    if prefix:
        fields = {"source": prefix.group("source"), "pid": int(prefix.group("pid"))}
        text, logger_name = text[prefix.end():], "ray.worker"
    record = logging.LogRecord(logger_name, getattr(logging, _level_of(text).upper()), "", 0, text, None, None)
    record.__dict__.update(fields)
    return (JsonFormatter().format(record) + "\n").encode()


@contextmanager
def json_stderr() -> Iterator[None]:
    """`--log-format json`: every line on stderr, whoever writes it, is one JSON object
    (docs/guarantees-process.md says what cannot be caught)."""
    with _pumped(json_stderr_line):
        yield
