"""The node's log: one line per event to stdout (journald takes it from there),
key=value ("text") or one JSON object per line ("json"), chosen by `[log] format`.

`event()` logs one SMTP transaction or delivery attempt with its fields; the JSON
formatter carries them as fields, the text one as key=value pairs. Callers pass only
envelope facts: no message body and no password is ever a field.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")


_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def _quote(value: object) -> str:
    text = str(value)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def _pairs(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


def event(logger: logging.Logger, what: str, level: int = logging.INFO, **fields: Any) -> None:
    """One event: `what` and its fields, e.g. event(log, "smtp", id=..., size=...)."""
    if logger.isEnabledFor(level):
        pairs = _pairs(fields)  # once, on the serving path: the text formatter reuses it
        extra = {"event": what, "fields": fields, "pairs": pairs}
        logger.log(level, "%s %s", what, pairs, extra=extra)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        head = f"ts={when}.{int(record.msecs):03d}Z level={record.levelname.lower()}"
        if hasattr(record, "event"):
            pairs = getattr(record, "pairs", "")
            line = f"{head} logger={record.name} event={record.event} {pairs}"
        else:
            line = f"{head} logger={record.name} msg={_quote(record.getMessage())}"
        if record.exc_info:
            line += " exc=" + _quote(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if hasattr(record, "event"):
            out["event"] = record.event
            out.update(getattr(record, "fields", {}))
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(level: str, fmt: str) -> None:
    """Log to stdout at `level` in `fmt`; called at start and again on reload."""
    root = logging.getLogger()
    if not any(getattr(h, "smtpcluster", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.smtpcluster = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for ours in root.handlers:
        if getattr(ours, "smtpcluster", False):
            ours.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.setLevel(level.upper())
    # aiosmtpd logs every command line at INFO, AUTH credentials included: never that.
    mail_log = logging.getLogger("mail.log")
    mail_log.setLevel(logging.WARNING)
    if not any(isinstance(f, _AiosmtpdNoise) for f in mail_log.filters):
        mail_log.addFilter(_AiosmtpdNoise())


class _AiosmtpdNoise(logging.Filter):
    """aiosmtpd 1.4.6 itself sets its deprecated Session.login_data on every successful
    AUTH and warns about it: a WARNING per authenticated session that nobody can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Session.login_data is deprecated")
