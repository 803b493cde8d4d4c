"""Event lines: key=value with quoting where needed, or JSON with the fields."""

from __future__ import annotations

import json
import logging
from typing import Any

from smtpcluster.logs import JsonFormatter, TextFormatter, event


class _Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _record(what: str, **fields: Any) -> logging.LogRecord:
    records: list[logging.LogRecord] = []
    logger = logging.getLogger(f"test.logs.{what}")
    logger.setLevel(logging.INFO)
    handler = _Collect(records)
    logger.addHandler(handler)
    try:
        event(logger, what, **fields)
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1
    return records[0]


def test_text_lines_are_key_value_with_quotes_only_where_needed() -> None:
    line = TextFormatter().format(_record("smtp", id="m1", reply="250 2.0.0 Ok", auth=""))
    assert line.endswith('event=smtp id=m1 reply="250 2.0.0 Ok" auth=""'), line
    assert line.startswith("ts=") and " level=info " in line


def test_json_lines_carry_the_fields() -> None:
    out = json.loads(JsonFormatter().format(_record("delivery", id="m2", attempt=3)))
    assert (out["event"], out["id"], out["attempt"], out["level"]) == ("delivery", "m2", 3, "info")


def test_plain_messages_keep_their_text() -> None:
    rec = logging.LogRecord("x", logging.WARNING, __file__, 1, "a %s b", ('q"',), None)
    assert TextFormatter().format(rec).endswith('msg="a q\\" b"')
    assert json.loads(JsonFormatter().format(rec))["msg"] == 'a q" b'
