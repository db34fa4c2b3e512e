"""Logging set-up shared by the service entrypoints.

Every record carries the request id of the request being handled (a context variable set
by the Generate handler once the id is validated; "-" elsewhere). ``ALISE_LOG_FORMAT=json``
switches to one JSON object per line for log shippers.

What callers send ends up in log lines (request ids, error details), so a text line never
carries a raw control character (a newline would forge a line of its own: it is written
``\\n``), and a message is cut at ``MAX_MESSAGE_CHARS``. Lines that a flood of bad calls can
cause (refusals) go through a ``LogLimiter``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

#: A longer message is cut here (its length is said), so no call can write a huge line.
MAX_MESSAGE_CHARS = 4096


def escape(text: str) -> str:
    """``text`` with every character that is not printable (newlines, escapes, bidi controls)
    written as a Python escape, so it cannot start a line or rewrite a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def preview(text: str, max_chars: int = 40) -> str:
    """A short, escaped, quoted view of caller-supplied ``text`` for a log line."""
    shown = repr(text[:max_chars])
    return shown if len(text) <= max_chars else f"{shown}... ({len(text)} characters)"


def _bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}... (message cut: {len(message)} characters)"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class TextFormatter(logging.Formatter):
    """The plain-text line: message and request id escaped and bounded; a traceback (the
    service's own) is kept as it is."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # logging's name
        safe = logging.makeLogRecord(record.__dict__)
        safe.message = escape(_bounded(record.message))
        safe.request_id = escape(str(getattr(record, "request_id", "-")))
        return super().formatMessage(safe)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "service": self.service, "logger": record.name,
            "request_id": getattr(record, "request_id", "-"), "msg": _bounded(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class LogLimiter:
    """At most ``burst`` lines at once and ``per_s`` a second after that, for one kind of
    line a flood of calls can cause. What it holds back is counted, and the count is said
    on the next line it lets through."""

    def __init__(self, logger: logging.Logger, *, per_s: float = 2.0, burst: int = 20,
                 clock=time.monotonic) -> None:
        self.logger = logger
        self.per_s = per_s
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last_s = clock()
        self.num_suppressed = 0

    def log(self, level: int, msg: str, *args) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last_s) * self.per_s)
        self._last_s = now
        if self._tokens < 1:
            self.num_suppressed += 1
            return
        self._tokens -= 1
        if self.num_suppressed:
            msg += " (and %d more like it, not logged)"
            args = (*args, self.num_suppressed)
            self.num_suppressed = 0
        self.logger.log(level, msg, *args)


class DroppingStreamHandler(logging.StreamHandler):
    """A line the stream cannot take (a full disk, a closed pipe) is dropped and counted: no
    error report written to the same failing stream, and never an exception for the caller."""

    num_dropped_lines = 0

    def handleError(self, record: logging.LogRecord) -> None:  # logging's name
        if isinstance(sys.exc_info()[1], OSError):
            self.num_dropped_lines += 1
            return
        super().handleError(record)


def make_handler(service: str, fmt: str | None = None, stream=None) -> logging.Handler:
    """The services' log handler: text (or JSON lines with ``fmt="json"``) on ``stream``."""
    handler = DroppingStreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    if (fmt or os.environ.get("ALISE_LOG_FORMAT", "text")) == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(TextFormatter(
            f"%(asctime)s %(levelname)s {service} %(name)s [%(request_id)s]: %(message)s"))
    return handler


def configure_logging(service: str, level: str | None = None, fmt: str | None = None) -> None:
    level_name = (level or os.environ.get("ALISE_LOG_LEVEL", "INFO")).upper()
    handler = make_handler(service, fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level_name, logging.INFO))
    # Libraries' progress bars and chatter stay out of service logs.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
