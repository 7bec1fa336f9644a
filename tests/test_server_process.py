"""The real entry points in child processes: `nlpserve serve` and the torch-free import."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.redis_support import free_port

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


def test_nlpserve_serve_answers_then_exits_cleanly_on_sigterm(model_repo):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--models", str(model_repo)],
        env=_env(NLPSERVE_PORT=str(port), NLPSERVE_INTRA_OP_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/polarity", json={"text": "a superb film"}, timeout=10)
        assert r.status_code == 200 and r.json()["label"] == "positive"
        # The serving process never maps libtorch.
        maps = Path(f"/proc/{proc.pid}/maps")
        if maps.exists():
            assert "libtorch" not in maps.read_text()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # uvicorn re-raises the signal after its graceful shutdown: -SIGTERM is a clean exit too.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
    assert "Traceback" not in out


def test_server_runs_on_uvloop_and_httptools(model_repo):
    """The C event loop and HTTP parser (dependencies; uvicorn's "auto" picks them): the
    API process is what limits throughput once inference is fast (bench/README.md)."""
    import asyncio

    from service.config import Settings
    from service.server import uvicorn_config

    cfg = uvicorn_config(Settings(model_dir=model_repo, warmup=False))
    cfg.load()
    assert cfg.http_protocol_class.__name__ == "HttpToolsProtocol"
    loop = cfg.get_loop_factory()()
    try:
        assert type(loop).__module__.startswith("uvloop")
        assert isinstance(loop, asyncio.AbstractEventLoop)
    finally:
        loop.close()
