"""Log output for the service: plain text for people and journald, one JSON object per line for shippers.

- text, on a terminal or in a file: ``2024-05-01 12:00:00,123 INFO agent.app: ready``.
- text under journald (stderr is the stream named by ``$JOURNAL_STREAM``): no timestamp, since
  journald stamps every line, and a ``<N>`` syslog priority prefix, so ``journalctl -p warning``
  and the journal's colours work (systemd's default ``SyslogLevelPrefix=yes`` strips it).
- json (``log.format: json``): ``{"ts": "...Z", "level": ..., "logger": ..., "msg": ..., "agent": ...}``
  plus any ``extra={...}`` fields and ``exc`` for tracebacks, so a stack trace stays one record.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import IO

# logging level -> syslog priority (sd-daemon(3) prefixes).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
# Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def under_journald(stream: IO | None = None) -> bool:
    """True if ``stream`` (default stderr) is connected to the journal.

    ``$JOURNAL_STREAM`` is inherited by children whose output goes elsewhere, so compare its
    device:inode with the stream's, as systemd.exec(5) recommends.
    """
    env = os.environ.get("JOURNAL_STREAM")
    if not env:
        return False
    try:
        dev, ino = (int(x) for x in env.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JsonFormatter(logging.Formatter):
    def __init__(self, static: dict | None = None):
        super().__init__()
        self.static = static or {}

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        out = {"ts": ts.replace("+00:00", "Z"), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage(), **self.static}
        if record.threadName not in ("MainThread", None):
            out["thread"] = record.threadName
        for k, v in vars(record).items():
            if k not in _STANDARD and k not in out:
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{prio}>{super().format(record)}"


def make_formatter(fmt: str = "text", stream: IO | None = None, static: dict | None = None) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(static)
    if under_journald(stream):
        return JournalFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def setup_logging(fmt: str = "text", level: str = "INFO", stream: IO | None = None, static: dict | None = None) -> None:
    """Route every logger to one handler on stderr (``stream`` for tests)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(make_formatter(fmt, stream, static))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("paho").setLevel(max(logging.INFO, root.level))  # paho's DEBUG logs every packet
