"""Fixtures of the Redis backend tests: a real Redis server, tiny real models, a worker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from service.runtime.runner import ModelRunner, load_runners
from tests.redis_support import own_redis, redis_prefix, redis_url  # noqa: F401


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.builders import build_tiny_polarity, build_tiny_pos

    root = tmp_path_factory.mktemp("redis-models")
    build_tiny_pos(root)
    build_tiny_polarity(root)
    return root


@pytest.fixture(scope="session")
def tiny_runners(tiny_repo: Path) -> dict[str, ModelRunner]:
    return load_runners(Settings(model_dir=tiny_repo, intra_op_threads=1, warmup=False))


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
            "redis_block_ms": 100,
            "redis_claim_idle_ms": 2000,
            "metrics_port": 0,
            "metrics_host": "127.0.0.1",
        }
        base.update(kw)
        return Settings(**base)

    return make
