"""Settings that resolve per execution provider."""

from __future__ import annotations

from service.config import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS, Settings


def test_token_budget_defaults_to_small_batches_on_cpu_and_big_ones_on_cuda(monkeypatch):
    monkeypatch.delenv("NLPSERVE_MAX_BATCH_TOKENS", raising=False)
    s = Settings()
    assert s.batch_policy("CPUExecutionProvider").max_batch_tokens == CPU_BATCH_TOKENS
    assert s.batch_policy("CUDAExecutionProvider").max_batch_tokens == GPU_BATCH_TOKENS
    assert CPU_BATCH_TOKENS < GPU_BATCH_TOKENS


def test_explicit_token_budget_wins_on_every_provider(monkeypatch):
    monkeypatch.setenv("NLPSERVE_MAX_BATCH_TOKENS", "2048")
    s = Settings()
    for provider in ("CPUExecutionProvider", "CUDAExecutionProvider", None):
        assert s.batch_policy(provider).max_batch_tokens == 2048
