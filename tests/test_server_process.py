"""The real entry points in child processes: `nlpserve serve` and the torch-free import."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis

from tests.builders import FILLER
from tests.faketime_support import release, require_libfaketime, stepping_env
from tests.redis_support import free_port, redis_url, unique_prefix  # noqa: F401
from tests.service_support import (
    DETECT_MODEL,
    POLARITY_MODEL,
    QA_MODEL,
    metric_value,
    require_model,
)

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NLPSERVE_")}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def test_service_never_imports_torch_or_transformers(model_repo):
    code = f"""
import importlib, pkgutil, sys, asyncio
import service
for m in pkgutil.walk_packages(service.__path__, "service."):
    importlib.import_module(m.name)
from service.api.app import create_app, startup
from service.config import Settings
app = create_app(Settings(model_dir={str(model_repo)!r}, intra_op_threads=1))
asyncio.run(startup(app.state.service))  # loads every model, tokenizers included
bad = sorted(m for m in ("torch", "transformers") if m in sys.modules)
assert not bad, bad
print("ok", sorted(app.state.service.tasks))
"""
    r = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")


def _serve(model_repo: Path, **env: str) -> tuple[subprocess.Popen[str], str]:
    """``nlpserve serve`` in a child process, once it answers /readyz: (process, url)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--models", str(model_repo)],
        env=_env(NLPSERVE_PORT=str(port), NLPSERVE_INTRA_OP_THREADS="1", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[0])
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server never became ready: {proc.communicate()[0]}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    """SIGTERM, wait for the exit, return the server's log (a clean exit asserted)."""
    try:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # uvicorn re-raises the signal after its graceful shutdown: -SIGTERM is a clean exit too.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
    return out


# ONNX Runtime's native libraries, as /proc/<pid>/maps names them once `import onnxruntime`
# has loaded them: seen from outside the process, whatever imported it.
ORT_LIBRARIES = ("onnxruntime_pybind11_state", "libonnxruntime")


def _mapped(pid: int, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` the process has mapped (a shared library it loaded)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [n for n in names if n in maps]


def test_nlpserve_serve_answers_then_exits_cleanly_on_sigterm(model_repo):
    # a misspelt setting is said at start-up (it was ignored without a word)
    proc, url = _serve(model_repo, NLPSERVE_MAX_BATCH_SIZ="8")
    try:
        r = httpx.post(f"{url}/v1/polarity", json={"text": "a superb film"}, timeout=10)
        assert r.status_code == 200 and r.json()["label"] == "positive"
        # The serving process never maps libtorch; in-process it runs the models on ORT.
        assert not _mapped(proc.pid, ("libtorch",))
        assert _mapped(proc.pid, ORT_LIBRARIES) == list(ORT_LIBRARIES)
    finally:
        out = _stop(proc)
    assert "Traceback" not in out
    # One log format, uvicorn's own lines included (a log pipeline parses one shape).
    assert "Started server process" in out
    line = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")
    odd = [ln for ln in out.splitlines() if not line.match(ln)]
    assert not odd, odd
    assert (
        "WARNING service.config: NLPSERVE_MAX_BATCH_SIZ is not a setting and is ignored "
        "(did you mean NLPSERVE_MAX_BATCH_SIZE?)" in out
    )


def test_with_api_keys_sighup_reloads_and_sigterm_still_shuts_down_cleanly(model_repo, tmp_path):
    """The app's SIGHUP handler (the keys file read again) lives beside uvicorn's own signal
    handling: SIGHUP neither ends the server (its default action) nor takes SIGTERM's
    graceful shutdown away."""
    keys = tmp_path / "api-keys"
    keys.write_text("alice alice-key-0123456789-abcdefghij\n")
    proc, url = _serve(
        model_repo, NLPSERVE_API_KEYS_FILE=str(keys), NLPSERVE_LOAD_MODELS=POLARITY_MODEL
    )
    try:
        body = {"text": "a superb film"}
        assert httpx.post(f"{url}/v1/polarity", json=body, timeout=10).status_code == 401
        alice = {"X-API-Key": "alice-key-0123456789-abcdefghij"}
        r = httpx.post(f"{url}/v1/polarity", json=body, headers=alice, timeout=10)
        assert r.status_code == 200, r.text
        keys.write_text("bob bob-key-0123456789-abcdefghijk\n")
        proc.send_signal(signal.SIGHUP)
        bob = {"X-API-Key": "bob-key-0123456789-abcdefghijk"}
        _until(lambda: httpx.get(f"{url}/v1/models", headers=bob).status_code == 200, 10)
        assert proc.poll() is None
        assert httpx.get(f"{url}/v1/models", headers=alice).status_code == 401
    finally:
        out = _stop(proc)
    assert "Traceback" not in out
    assert "added: bob; removed: alice" in out


def test_json_log_format_is_one_object_per_line_uvicorns_lines_included(model_repo):
    """NLPSERVE_LOG_FORMAT=json: a log collector reads every line as one record, uvicorn's
    start-up and its warning about a request it cannot parse (logged with a traceback in
    text mode's continuation lines) included."""
    proc, url = _serve(model_repo, NLPSERVE_LOG_FORMAT="json")
    port = int(url.rsplit(":", 1)[1])
    try:
        r = httpx.post(f"{url}/v1/polarity", json={"text": "a superb film"}, timeout=10)
        assert r.status_code == 200
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n")
            _read_until_closed(sock)
    finally:
        out = _stop(proc)
    docs = [json.loads(line) for line in out.splitlines()]  # every line: JSON
    messages = [d["message"] for d in docs]
    assert any(m.startswith("Started server process") for m in messages), messages
    assert any(m.startswith("ready: ") for m in messages), messages
    assert "Invalid HTTP request received." in messages
    assert all({"ts", "level", "logger", "message"} <= d.keys() for d in docs)


def test_a_request_that_is_not_valid_http_gets_the_json_error_shape(model_repo):
    """uvicorn answers what its parser cannot read (a control character or a space in the
    URL, a doubled Content-Length) before the app sees it: that 400 was plain text, and is
    now the service's ``{"error": {...}}`` like every other error."""
    proc, url = _serve(model_repo)
    port = int(url.rsplit(":", 1)[1])
    try:
        for raw in (
            b"GET /v1/models/a\x01b HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v1/models/a b HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /v1/pos HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(raw)
                head, _, body = _read_until_closed(sock).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 "), (raw, head)
            assert b"content-type: application/json" in head.lower(), head
            length = re.search(rb"content-length: (\d+)", head.lower())
            assert length and int(length[1]) == len(body), head
            err = json.loads(body)["error"]
            assert err["code"] == "bad_request" and "not valid HTTP" in err["message"], err
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200  # still serving
    finally:
        out = _stop(proc)
    assert "Traceback" not in out
    assert "Invalid HTTP request received." in out  # uvicorn still logs it


def _qa_body(contexts: int, seed: int) -> dict:
    """A QA batch of ``contexts`` 20,000-character contexts: ~110 windows each, real CPU
    work (about 0.25 s per context for the tiny model on a 2-core machine)."""
    rng = random.Random(seed)
    items = [
        {
            "question": "长城有多长？",
            "context": "".join(rng.choices("长城是中国古代的军事工程", k=20_000)),
        }
        for _ in range(contexts)
    ]
    return {"inputs": items}


def _queued(url: str, model: str) -> float:
    return metric_value(
        httpx.get(f"{url}/metrics", timeout=5).text, "nlpserve_queue_depth", model=model
    )


def _assert_shutting_down_503(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "backend_unavailable", r.text
    assert int(r.headers["retry-after"]) >= 1


def _assert_clean_log(out: str, cancelled: int = 0) -> None:
    """No error logged; uvicorn cancelled only ``cancelled`` requests at its timeout."""
    assert "Traceback" not in out, out[-3000:]
    assert "Exception in ASGI application" not in out, out[-3000:]
    assert "500 Internal Server Error" not in out, out[-3000:]
    if cancelled:
        assert f"Cancel {cancelled} running task(s)" in out, out[-3000:]
    else:
        assert "running task(s), timeout graceful shutdown exceeded" not in out, out[-3000:]


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a response's head and
    body may come in separate segments)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_sigterm_answers_work_that_cannot_finish_in_time_with_503(model_repo):
    """SIGTERM with more queued work than NLPSERVE_SHUTDOWN_TIMEOUT_S allows: what finishes in
    time is answered 200, the rest 503 with Retry-After before uvicorn cancels anything
    (it used to answer a plain-text 500), and a request still sending its body gets 503 too."""
    require_model(model_repo, QA_MODEL)
    require_model(model_repo, DETECT_MODEL)
    proc, url = _serve(
        model_repo,
        NLPSERVE_SHUTDOWN_TIMEOUT_S="4",  # the queue drains for 3 s of it
        NLPSERVE_INFERENCE_THREADS="1",
        NLPSERVE_MAX_QUEUE_DEPTH="100000",
        NLPSERVE_MAX_REQUEST_SEQUENCES="100000",
        NLPSERVE_MAX_BODY_BYTES="20000000",
        NLPSERVE_MAX_BATCH_ITEMS="1000",
    )
    big = _qa_body(60, seed=2)  # ~15 s of inference: cannot finish
    # One 64-token sequence each: ~1 s of inference, its batches taking turns with the QA
    # model's on the one inference thread; finishes well within the drain.
    rng = random.Random(3)
    words = [rng.choice(FILLER) for _ in range(60)]
    small = {"inputs": [{"text": " ".join(rng.sample(words, 60))} for _ in range(300)]}
    stalled = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    try:
        with ThreadPoolExecutor(2) as pool:
            # Headers and a bit of the body: still reading it when the shutdown ends.
            stalled.sendall(
                b"POST /v1/polarity HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
            )
            r_big = pool.submit(httpx.post, f"{url}/v1/qa", json=big, timeout=60)
            _until(lambda: _queued(url, QA_MODEL) > 1000)
            r_small = pool.submit(httpx.post, f"{url}/v1/detect", json=small, timeout=60)
            _until(lambda: _queued(url, DETECT_MODEL) > 0)
            assert not r_small.done()
            proc.send_signal(signal.SIGTERM)
            small_reply, big_reply = r_small.result(), r_big.result()
            stalled.settimeout(10)
            stalled_reply = _read_until_closed(stalled)
    finally:
        stalled.close()
        out = _stop(proc)
    assert small_reply.status_code == 200, small_reply.text
    assert len(small_reply.json()["outputs"]) == 300
    # answered by the drain, before uvicorn's timeout: the queue's 503 (uvicorn's cancel
    # would have answered a plain-text 500), and uvicorn cancelled only the stalled one below
    _assert_shutting_down_503(big_reply)
    assert big_reply.json()["error"]["message"] == "the service is shutting down", big_reply.text
    head, _, body = stalled_reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), stalled_reply
    assert b"retry-after: 1" in head.lower()
    assert b'"backend_unavailable"' in body
    _assert_clean_log(out, cancelled=1)  # only the stalled one: the queue answered the rest


def test_sigterm_in_redis_mode_answers_unserved_requests_with_503(model_repo, redis_url):  # noqa: F811
    """NLPSERVE_QUEUE=redis and no worker: nothing queued can finish, so on SIGTERM each
    waiting request gets 503 from the drain, before uvicorn's graceful timeout; and their
    entries are deleted, so a worker that starts later does not run work nobody awaits."""
    prefix = unique_prefix()
    proc, url = _serve(
        model_repo,
        NLPSERVE_QUEUE="redis",
        NLPSERVE_REDIS_URL=redis_url,
        NLPSERVE_REDIS_PREFIX=prefix,
        NLPSERVE_SHUTDOWN_TIMEOUT_S="1",
    )
    try:
        with ThreadPoolExecutor(2) as pool:
            posts = [
                pool.submit(httpx.post, f"{url}/v1/polarity", json={"text": t}, timeout=30)
                for t in ("a superb film", "a dull plot")
            ]
            _until(lambda: _queued(url, "polarity-en") >= 2)
            proc.send_signal(signal.SIGTERM)
            replies = [p.result() for p in posts]
    finally:
        out = _stop(proc)
    for r in replies:
        _assert_shutting_down_503(r)
    _assert_clean_log(out)
    with redis.Redis.from_url(redis_url) as r:
        streams = [k for k in r.scan_iter(f"{prefix}:*") if r.type(k) == b"stream"]
        assert streams and sum(r.xlen(k) for k in streams) == 0


def _wait_ready(proc: subprocess.Popen[str], url: str, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[0])
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < end, f"{url} never became ready"
        time.sleep(0.2)


ROLE_REQUESTS = {
    "pos": {"text": "The cat sat on the mat ."},
    "polarity": {"text": "a superb film"},
    "detect": {"text": "The results show a clear improvement over the baseline."},
    "qa": {"question": "长城有多长？", "context": "长城全长两万一千公里。"},
}


def test_redis_mode_api_never_loads_onnxruntime_the_worker_does(model_repo, redis_url):  # noqa: F811
    """In Redis mode the API only tokenizes and enqueues: it must not load ONNX Runtime (20
    MiB of RSS, and its import time), neither at start nor on the request path. The worker,
    which runs the models, does. Observed from outside, in /proc/<pid>/maps."""
    redis_env = {
        "NLPSERVE_QUEUE": "redis",
        "NLPSERVE_REDIS_URL": redis_url,
        "NLPSERVE_REDIS_PREFIX": unique_prefix(),
    }
    mport = free_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker", "--models", str(model_repo)],
        env=_env(
            NLPSERVE_METRICS_PORT=str(mport),
            NLPSERVE_METRICS_HOST="127.0.0.1",
            NLPSERVE_INTRA_OP_THREADS="1",
            **redis_env,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        proc, url = _serve(model_repo, **redis_env)
        try:
            _wait_ready(worker, f"http://127.0.0.1:{mport}/readyz")
            assert _mapped(proc.pid, ORT_LIBRARIES) == []  # started without it
            models = httpx.get(f"{url}/v1/models", timeout=10).json()["models"]
            tasks = {m["task"] for m in models}
            for task in sorted(tasks):  # every loaded model, through the worker
                r = httpx.post(f"{url}/v1/{task}", json=ROLE_REQUESTS[task], timeout=30)
                assert r.status_code == 200, (task, r.text)
            assert _mapped(proc.pid, ORT_LIBRARIES) == []  # and served without it
            assert _mapped(worker.pid, ORT_LIBRARIES) == list(ORT_LIBRARIES)
        finally:
            _stop(proc)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.communicate(timeout=30)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def _until(cond, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


def test_a_fractional_shutdown_timeout_is_kept(model_repo):
    """NLPSERVE_SHUTDOWN_TIMEOUT_S went to uvicorn through int(): 2.5 s became 2, and 0.5 s
    became 0, so on SIGTERM the queue drained for no time at all and every queued request
    got 503 (Server.shutdown drains for drain_deadline_s of uvicorn's timeout)."""
    from service.api.app import create_app
    from service.config import Settings
    from service.server import drain_deadline_s, uvicorn_config

    for seconds in (0.5, 2.5):
        settings = Settings(model_dir=model_repo, warmup=False, shutdown_timeout_s=seconds)
        cfg = uvicorn_config(settings, create_app(settings))
        assert cfg.timeout_graceful_shutdown == seconds
        assert drain_deadline_s(cfg.timeout_graceful_shutdown) > 0


def test_server_runs_on_uvloop_and_httptools(model_repo):
    """The C event loop and HTTP parser (dependencies; uvicorn's "auto" picks them), and no
    layer nothing needs: the API process is what limits throughput once inference is fast
    (bench/README.md)."""
    import asyncio

    from service.api.app import create_app
    from service.config import Settings
    from service.server import uvicorn_config

    settings = Settings(model_dir=model_repo, warmup=False)
    cfg = uvicorn_config(settings, create_app(settings))
    cfg.load()
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert issubclass(cfg.http_protocol_class, HttpToolsProtocol)
    # no X-Forwarded-* rewriting layer: nothing reads the client's address
    assert type(cfg.loaded_app).__name__ != "ProxyHeadersMiddleware"
    loop_factory = cfg.get_loop_factory()
    assert loop_factory is not None
    loop = loop_factory()
    try:
        assert type(loop).__module__.startswith("uvloop")
        assert isinstance(loop, asyncio.AbstractEventLoop)
    finally:
        loop.close()


def test_wall_clock_steps_neither_expire_nor_strand_queued_requests(model_repo, tmp_path):
    """An NTP step (or ``date -s``) moves the wall clock of a running server, here through
    libfaketime, while a request waits in its batch for company (NLPSERVE_WAIT_WHEN_IDLE,
    4 s). Deadlines and enqueue times used to be wall-clock: an hour forward and its deadline
    had passed (504 at once); back again and its wait looked an hour short (504 at the
    deadline)."""
    lib = require_libfaketime()
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    proc, url = _serve(
        model_repo,
        NLPSERVE_WAIT_WHEN_IDLE="1",
        NLPSERVE_MAX_WAIT_MS="4000",
        **stepping_env(offset, lib=lib),
    )
    try:
        for step in ("+3600", "+0"):
            with ThreadPoolExecutor(1) as pool:
                asked = pool.submit(
                    httpx.post,
                    f"{url}/v1/polarity",
                    json={"text": "a superb film"},
                    headers={"X-Deadline-Ms": "15000"},
                    timeout=60,
                )
                _until(lambda: _queued(url, "polarity-en") == 1)
                offset.write_text(f"{step}\n")  # read within a second (FAKETIME_CACHE_DURATION)
                r = asked.result()
            assert r.status_code == 200, (step, r.text)
            assert r.json()["label"] == "positive"
    finally:
        _stop(proc)
        release(proc)
