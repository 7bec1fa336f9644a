"""The Python client as a package (service/client/): importable without the server, a method
for every /v1 operation of the contract, its retry policy's decisions. Its behaviour against
a real server: tests/api/test_python_client.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import service.client
from service.client import (
    AsyncClient,
    AuthenticationError,
    Client,
    ClientError,
    IncompleteBatch,
    NlpserveError,
    RetriesExhausted,
    RetryPolicy,
)

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_client_loads_none_of_the_server():
    """What `pip install nlpserve[client]` promises: httpx is all it needs."""
    code = "import json, sys, service.client; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    loaded = {m.split(".")[0] for m in json.loads(out)}
    server = {"fastapi", "starlette", "uvicorn", "onnxruntime", "numpy", "tokenizers"}
    server |= {"pydantic", "pydantic_settings", "redis", "prometheus_client"}
    assert loaded & server == set()
    assert "httpx" in loaded


# Each /v1 operation (docs/openapi.json, the contract) and the probes: the client's method.
METHODS = {
    "tag_parts_of_speech": ("pos", "pos_batch"),
    "classify_polarity": ("polarity", "polarity_batch"),
    "detect": ("detect", "detect_batch"),
    "answer_question": ("qa", "qa_batch"),
    "explain_detect": ("explain_detect",),
    "explain_polarity": ("explain_polarity",),
    "list_models": ("models",),
    "get_model": ("model",),
    "check_liveness": ("healthz",),
    "check_readiness": ("readyz",),
}


def test_every_v1_operation_has_a_method_in_both_clients():
    spec = json.loads((ROOT / "docs/openapi.json").read_text())
    ops = {
        op["operationId"]
        for path, item in spec["paths"].items()
        if path.startswith("/v1/") or path in ("/healthz", "/readyz")
        for op in item.values()
    }
    assert ops == set(METHODS), "a new endpoint: give the client a method (and METHODS)"
    for names in METHODS.values():
        for name in names:
            assert callable(getattr(Client, name)) and callable(getattr(AsyncClient, name))
            assert asyncio.iscoroutinefunction(getattr(AsyncClient, name)), name


def test_the_retry_policy_decides_alone():
    """next_delay: what is retried, how often, how long; the jitter within its bounds."""
    p = RetryPolicy(retries=2, backoff_s=0.1, max_backoff_s=1.0, max_total_s=10)
    assert p.next_delay(0, 200, None, 0) is None and p.next_delay(0, 422, None, 0) is None
    assert p.next_delay(0, 504, None, 0) is None  # the deadline passed: the caller's call
    assert p.next_delay(0, 503, "2", 0) == 2.0 and p.next_delay(0, 429, "0", 0) == 0.0
    assert 0.05 <= (p.next_delay(0, None, None, 0) or 0) <= 0.15
    assert p.next_delay(2, 503, None, 0) is None  # the retries spent
    assert p.next_delay(0, 503, "2", 8.5) is None  # past max_total_s
    assert p.next_delay(0, 503, "2", 0, budget_s=1.5) is None  # past the call's deadline
    assert p.next_delay(0, 503, "garbage", 0) is not None  # an unreadable Retry-After: backoff
    assert p.delay(10, None) <= 1.5  # the backoff capped
    assert p.delay(0, "3600") == 3600 and p.next_delay(0, 503, "3600", 0) is None  # honoured
    assert p.delay(0, "inf") <= 0.15 and p.delay(0, "-3") == 0
    assert RetryPolicy(retry_statuses=frozenset({504})).next_delay(0, 504, None, 0) is not None


def test_every_error_the_client_exports_derives_from_one_base():
    """``except NlpserveError`` catches whatever the package raises of its own, IncompleteBatch
    included; ClientError keeps its one meaning, a 4xx the request is at fault for (a 429 and
    a stopped *_many are not)."""
    errors = [
        v for v in vars(service.client).values() if isinstance(v, type) and issubclass(v, Exception)
    ]
    assert {e.__name__ for e in errors} == {
        "NlpserveError", "ClientError", "AuthenticationError", "DeadlineExceeded",
        "RetriesExhausted", "ServerError", "TransportError", "IncompleteBatch",
    }  # fmt: skip
    assert all(issubclass(e, NlpserveError) for e in errors)
    assert issubclass(AuthenticationError, ClientError)
    assert not issubclass(RetriesExhausted, ClientError)
    assert not issubclass(IncompleteBatch, ClientError)
