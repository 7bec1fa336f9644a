"""Fixtures of the Redis backend tests: a real Redis server and a client of it, tiny real
models, a worker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from service.config import Settings
from service.repository import discover_models
from service.runtime.runner import ModelRunner, load_runners
from tests.redis_support import own_redis, redis_prefix, redis_url  # noqa: F401

MODELS = ("pos-en", "polarity-en")


@pytest.fixture(scope="session")
def tiny_repo(model_repo: Path) -> Path:
    """The shared cached tiny repository (tests/conftest.py)."""
    return model_repo


@pytest.fixture(scope="session")
def tiny_runners(tiny_repo: Path) -> dict[str, ModelRunner]:
    entries = [e for e in discover_models(tiny_repo) if e.name in MODELS]
    settings = Settings(model_dir=tiny_repo, intra_op_threads=1, warmup=False)
    return load_runners(settings, entries=entries)


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(redis_url: str, redis_prefix: str, tiny_repo: Path) -> SettingsFactory:  # noqa: F811
    def make(**kw: Any) -> Settings:
        base: dict[str, Any] = {
            "redis_url": redis_url,
            "redis_prefix": redis_prefix,
            "model_dir": tiny_repo,
            "queue": "redis",
            "intra_op_threads": 1,
            "warmup": False,
            "max_wait_ms": 2.0,
            "min_padding_efficiency": 0.0,
            "redis_block_ms": 100,
            "redis_claim_idle_ms": 2000,
            "metrics_port": 0,
            "metrics_host": "127.0.0.1",
            "port": 0,  # a replica started from these (live_server) binds a free port, not 8000
        }
        base.update(kw)
        return Settings(**base)

    return make


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:  # noqa: F811
    """A client of the test's Redis, to look at (or break) what the service keeps there."""
    client = aioredis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()
