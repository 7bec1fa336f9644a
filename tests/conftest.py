"""Shared fixtures: a tiny REAL model repository, and live servers over it.

* ``model_repo`` (session): pos-en, polarity-en (tests/builders.py) and, once their builders
  exist, detector-en and qa-zh (tests/builders_bert.py), trained and exported by the real
  training code. Cached under ``.pytest_cache`` keyed by the builder/training sources, so
  only the first run pays for training (``NLPSERVE_TEST_REBUILD=1`` forces a rebuild).
* ``queue_backend`` (session, parametrized over ``QUEUE_BACKENDS``) and ``service`` (a live
  uvicorn over real HTTP on a free port, in the session event loop): the behaviour tests
  take ``service``/``client`` and therefore run once per backend.
* ``inprocess_service``: the same, always in-process, for tests that use the in-process
  queue's hooks (``pause``/``resume``, ``batch_log``).

Tests marked ``train`` need the train extra (torch, transformers, onnx) and skip, saying so,
where it is missing; ``-m "not train"`` is the service side. It runs on an interpreter without
torch once ``model_repo``'s cache holds the tiny models, built by one with torch in the same
checkout (``make test-newest`` does both).

Under pytest-xdist (``make test``: ``-n 2 --dist loadscope``) each worker has its own session:
its own servers and Redis; what is built from files (``model_repo``, ``lstm_rebuild``) is built
once, under a lock, by the first worker that needs it.

Async tests that use these fixtures run in the session loop: put
``pytestmark = pytest.mark.asyncio(loop_scope="session")`` in the module.

Adding a backend: ``QUEUE_BACKENDS["redis"] = redis_backend``, an async context manager
``(Settings) -> Settings`` that starts what the backend needs (server, workers) and yields
the settings the API should run with.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from hypothesis import settings

from service.config import Settings
from tests.redis_support import redis_backend
from tests.service_support import BUILD_ERRORS, LiveServer, live_server, make_settings

ROOT = Path(__file__).resolve().parents[1]

# Property tests (tests/test_properties_*.py): CI runs the same examples every time
# (derandomized, no example database), few enough that all of them take seconds; set
# HYPOTHESIS_PROFILE=explore locally to search many more random examples.
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, max_examples=60, print_blob=True
)
settings.register_profile("explore", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# --------------------------------------------------------------------------- train extra
# What the `train` marker stands for: the modules of the train extra that its tests import.
TRAIN_MODULES = ("torch", "transformers", "onnx")


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not (missing := _missing(TRAIN_MODULES)):
        return
    skip = pytest.mark.skip(reason=f"needs the train extra: {', '.join(missing)} not installed")
    for item in items:
        if item.get_closest_marker("train"):
            item.add_marker(skip)


# --------------------------------------------------------------------------- model repo
# Sources whose change must rebuild the cached tiny models.
_MODEL_SOURCES = ("tests/builders.py", "tests/builders_bert.py", "training", "service/preprocess")


def _sources_digest() -> str:
    h = hashlib.sha256()
    for rel in _MODEL_SOURCES:
        p = ROOT / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.exists() else []
        for f in files:
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _builders() -> dict[str, Callable[[Path], Path]]:
    from tests.builders import build_tiny_polarity, build_tiny_pos

    out: dict[str, Callable[[Path], Path]] = {
        "pos-en": build_tiny_pos,
        "polarity-en": build_tiny_polarity,
    }
    try:
        from tests.builders_bert import build_tiny_detector, build_tiny_qa
    except ImportError as e:  # transformer builders not there yet: those tests skip
        logging.getLogger(__name__).warning("no BERT test models: %s", e)
    else:
        out["detector-en"] = build_tiny_detector
        out["qa-zh"] = build_tiny_qa
    return out


@pytest.fixture(scope="module")
def cli():
    """``nlpserve`` run in-process (typer's CliRunner), training commands included:
    ``cli("train", "pos", "--data", path)`` -> the runner's Result."""
    from typer.testing import CliRunner

    from service.cli import app
    from training.cli import register

    if not any(g.name == "train" for g in app.registered_groups):
        register(app)
    runner = CliRunner()
    return lambda *args, **kw: runner.invoke(app, list(map(str, args)), **kw)


# Loggers whose level the commands set (training's setup_logging: INFO for these).
_PROJECT_LOGGERS = ("nlpserve", "training", "service")


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """CLI commands run in-process (typer's CliRunner) set up the root logger with a handler
    on the runner's captured stderr, closed once the command returns; later tests that log
    then print "--- Logging error ---" into their output. They also set the project's
    loggers' levels, which later tests would inherit. Each test gets all of it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in _PROJECT_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, was in levels.items():
        logging.getLogger(name).setLevel(was)


@pytest.fixture(scope="session")
def model_repo(request: pytest.FixtureRequest) -> Path:
    # Several engineers' test sessions share this cache: builds go to a private folder and
    # are renamed into place atomically, and only stale builds of other digests are pruned.
    cache_root = Path(request.config.cache.mkdir("nlpserve-tiny-models"))
    target = cache_root / _sources_digest()
    # `make test`'s workers (pytest-xdist) and other sessions wait for a build in progress
    # instead of training the same models beside it on the same cores.
    with _exclusive(cache_root / f".{target.name}.lock"):
        rebuild = os.environ.get("NLPSERVE_TEST_REBUILD") and not _rebuilt_this_run(target)
        if rebuild and target.exists():
            os.rename(target, cache_root / f".old-{uuid.uuid4().hex}")
        _build_models(target, cache_root)
    _prune(cache_root, keep=target)
    return target


def _rebuilt_this_run(target: Path) -> bool:
    """NLPSERVE_TEST_REBUILD: only the first of this run's workers (pytest-xdist) rebuilds;
    the others find its build, marked with the run's id."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    done = target / ".complete"
    return run is not None and done.exists() and done.read_text() == run


def _build_models(target: Path, cache_root: Path) -> None:
    if not (target / ".complete").exists():
        if missing := _missing(("torch", "onnx")):
            # What the LSTM builders need (the BERT ones' failures only skip their models'
            # tests); every test over the models would fail on their imports instead.
            pytest.fail(
                f"the tiny test models are trained with the train extra ({', '.join(missing)} "
                f"not installed here): build them once in this checkout with an interpreter "
                f"that has it (`.venv/bin/python -m pytest -q tests/test_runtime.py`); any "
                f"interpreter then finds them in {cache_root}",
                pytrace=False,
            )
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_root))
        errors: dict[str, str] = {}
        for name, build in _builders().items():
            try:
                build(tmp)
            except Exception as e:  # a broken builder skips its model's tests, with the reason
                if name in ("pos-en", "polarity-en"):
                    raise
                logging.getLogger(__name__).exception("building %s failed", name)
                errors[name] = f"{type(e).__name__}: {e}"
                shutil.rmtree(tmp / name, ignore_errors=True)
        (tmp / BUILD_ERRORS).write_text(json.dumps(errors))
        (tmp / ".complete").write_text(os.environ.get("PYTEST_XDIST_TESTRUNUID", "ok"))
        try:
            os.rename(tmp, target)
        except OSError:  # another session finished the same build first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Held by one process at a time (an flock: released when the process dies too)."""
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this test run that all its pytest-xdist workers share (each worker's
    basetemp is a folder in it); without xdist, the session's basetemp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def lstm_rebuild(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m tests.builders DIR`` once per session, in a fresh interpreter with another
    PYTHONHASHSEED than this one (set and dict-of-str orders differ): the tiny LSTMs trained
    again, for the reproducibility test and the builders' own command-line test. Under
    pytest-xdist, once per run: the first worker to need it trains, the other uses that."""
    shared = _run_tmp(tmp_path_factory)
    out = shared / "lstm-rebuild"
    with _exclusive(shared / "lstm-rebuild.lock"):
        if not (out / ".complete").exists():
            _rebuild_lstms(out)
    return out


def _rebuild_lstms(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)  # a failed worker's half: the builders skip models there
    hash_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.builders", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    (out / ".complete").write_text("ok")


def _prune(cache_root: Path, keep: Path, older_than_s: float = 3600.0) -> None:
    now = time.time()
    for old in cache_root.iterdir():
        if old == keep or old.name == f".{keep.name}.lock":
            continue
        try:
            stale = now - old.stat().st_mtime > older_than_s
        except FileNotFoundError:
            continue
        if stale or old.name.startswith(".old-"):
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- backends
@asynccontextmanager
async def inprocess_backend(settings: Settings) -> AsyncIterator[Settings]:
    yield settings.model_copy(update={"queue": "inprocess"})


QUEUE_BACKENDS: dict[str, Callable[[Settings], AbstractAsyncContextManager[Settings]]] = {
    "inprocess": inprocess_backend,
    "redis": redis_backend,  # real redis-server + a worker (tests/redis_support.py)
}


@pytest.fixture(scope="session", params=sorted(QUEUE_BACKENDS))
def queue_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def service(model_repo: Path, queue_backend: str) -> AsyncIterator[LiveServer]:
    """The shared server for behaviour tests, once per queue backend."""
    async with (
        QUEUE_BACKENDS[queue_backend](make_settings(model_repo)) as settings,
        live_server(settings) as srv,
    ):
        yield srv


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def client(service: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with service.client() as c:
        yield c


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def inprocess_service(model_repo: Path) -> AsyncIterator[LiveServer]:
    """A shared in-process server whose queue hooks tests may use (and must undo)."""
    async with live_server(make_settings(model_repo)) as srv:
        yield srv
