"""The log formats (service/logs.py) and the log settings."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from service.config import Settings
from service.logs import JsonFormatter, configure_logging


def _record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            exc_info = sys.exc_info()
    record = logging.getLogger("service.test").makeRecord(
        "service.test", logging.WARNING, __file__, 1, msg, args, exc_info, extra=extra
    )
    return record


def test_json_line_carries_context_fields_and_the_traceback():
    line = JsonFormatter().format(
        _record("request %s: failed ✗ 失败", "r-1", exc=True, request_id="r-1", item_id="ab" * 16)
    )
    assert "\n" not in line  # a collector takes each line for one record
    doc = json.loads(line)
    assert doc["level"] == "WARNING" and doc["logger"] == "service.test"
    assert doc["message"] == "request r-1: failed ✗ 失败"  # arguments applied, text kept
    assert doc["request_id"] == "r-1" and doc["item_id"] == "ab" * 16
    assert "model" not in doc  # fields a call site did not give are left out, not null
    assert doc["exc_info"].startswith("Traceback") and "RuntimeError: boom" in doc["exc_info"]
    assert doc["ts"].endswith("Z") and len(doc["ts"]) == len("2026-12-07T01:02:03.456Z")


def test_json_line_of_an_unserializable_context_value_is_still_json():
    doc = json.loads(JsonFormatter().format(_record("x", model=object())))
    assert doc["model"].startswith("<object object")


def test_configure_logging_replaces_handlers(capsys):
    root = logging.getLogger()
    before = (root.level, root.handlers[:])
    try:
        configure_logging("info", "json")
        configure_logging("INFO", "json")  # twice: still one line per record
        # (uvicorn's own loggers have levels of their own that tests' servers set)
        logging.getLogger("service.test_logs").info("loaded %d models", 7)
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1, lines
        assert json.loads(lines[0])["message"] == "loaded 7 models"
    finally:
        root.handlers[:] = before[1]
        root.setLevel(before[0])


@pytest.mark.parametrize(("given", "kept"), [("debug", "DEBUG"), ("Warning", "WARNING")])
def test_log_level_any_case(monkeypatch, given, kept):
    monkeypatch.setenv("NLPSERVE_LOG_LEVEL", given)
    assert Settings().log_level == kept


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_bad_log_setting_is_one_line_not_a_traceback(command):
    """NLPSERVE_LOG_LEVEL=verbose ended `nlpserve serve` with logging's ValueError traceback."""
    for name, value, says in (
        ("NLPSERVE_LOG_LEVEL", "verbose", "'verbose' is not a log level: one of DEBUG, INFO"),
        ("NLPSERVE_LOG_FORMAT", "logfmt", "Input should be 'text' or 'json'"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "service.cli", command],
            env=os.environ | {name: value},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert f"invalid setting: {name}: {says}" in proc.stderr, proc.stderr
