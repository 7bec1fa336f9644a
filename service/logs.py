"""The service's log lines: one format for the API, the worker and uvicorn's own lines.

``text`` (the default) is for people reading a terminal; ``json`` is one JSON object per line
for a log collector (Loki, Elasticsearch, CloudWatch...), so nothing has to parse the message:
the request and work item a line is about are fields of their own (``request_id``,
``item_id``, ``model``, passed as ``extra=``), and a traceback is one ``exc_info`` string
instead of continuation lines a collector would take for separate records. ``trace_id`` and
``span_id`` (W3C Trace Context, service/tracecontext.py) are those a call site passes (a
worker's, of the item's request) or else the request being served when the line is logged.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any, Literal

from service import tracecontext

LogFormat = Literal["text", "json"]
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What call sites may attach with ``extra=``; other attributes of a record are logging's own.
CONTEXT_FIELDS = ("request_id", "item_id", "model", "worker", "client", "trace_id", "span_id")
# The authenticated client of the request being handled (service/api/auth.py sets it): every
# line logged while handling it carries the field without each call site passing it.
CLIENT: ContextVar[str | None] = ContextVar("nlpserve_client", default=None)


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: ``ts`` (UTC, ISO 8601, milliseconds), ``level``,
    ``logger``, ``message``, the context fields a call site gave, then ``exc_info``."""

    def format(self, record: logging.LogRecord) -> str:
        secs = int(record.created)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        doc: dict[str, Any] = {
            "ts": f"{ts}.{int((record.created - secs) * 1000):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is None and name == "client":
                value = CLIENT.get()
            if value is not None:
                doc[name] = value
        if "trace_id" not in doc and (trace := tracecontext.current()) is not None:
            doc.update(trace.log_fields())  # a line logged while serving a request
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc_info"] = record.exc_text
        if record.stack_info:
            doc["stack_info"] = record.stack_info
        return json.dumps(doc, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: LogFormat = "text") -> None:
    """Send every logger's records (uvicorn's too: it is started with ``log_config=None``) to
    stderr in ``fmt``, at ``level`` and above. Replaces handlers set up before, so a second
    call (tests, a command run twice in one process) does not duplicate lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
