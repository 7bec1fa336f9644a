"""Settings that resolve per execution provider."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from service.config import (
    CHEAP_TOKEN_S,
    CPU_BATCH_TOKENS,
    CPU_MAX_WAIT_MS,
    CPU_MIN_PADDING_EFFICIENCY,
    CUDA_MAX_WAIT_MS,
    CUDA_MIN_PADDING_EFFICIENCY,
    GPU_BATCH_TOKENS,
    Settings,
    unknown_settings,
    usable_cpus,
)


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


def test_max_wait_defaults_short_on_cuda_and_explicit_wins(monkeypatch):
    """A GPU batch takes about a millisecond: the CPU's 5 ms wait would idle the GPU."""
    monkeypatch.delenv("NLPSERVE_MAX_WAIT_MS", raising=False)
    s = Settings()
    assert s.batch_policy("CPUExecutionProvider").max_wait_s == CPU_MAX_WAIT_MS / 1000
    assert s.batch_policy("CUDAExecutionProvider").max_wait_s == CUDA_MAX_WAIT_MS / 1000
    assert CUDA_MAX_WAIT_MS < CPU_MAX_WAIT_MS
    monkeypatch.setenv("NLPSERVE_MAX_WAIT_MS", "0")
    for provider in ("CPUExecutionProvider", "CUDAExecutionProvider", None):
        assert Settings().batch_policy(provider).max_wait_s == 0.0
    monkeypatch.setenv("NLPSERVE_MAX_WAIT_MS", "-1")
    with pytest.raises(ValueError):
        Settings()


def test_padding_floor_defaults_high_on_cpu_off_on_cuda_and_explicit_wins(monkeypatch):
    """On CPU a padded token costs like a real one; on CUDA batch size is what pays."""
    monkeypatch.delenv("NLPSERVE_MIN_PADDING_EFFICIENCY", raising=False)
    s = Settings()
    assert s.batch_policy("CPUExecutionProvider").min_padding_efficiency == (
        CPU_MIN_PADDING_EFFICIENCY
    )
    assert s.batch_policy("CUDAExecutionProvider").min_padding_efficiency == (
        CUDA_MIN_PADDING_EFFICIENCY
    )
    assert CUDA_MIN_PADDING_EFFICIENCY < CPU_MIN_PADDING_EFFICIENCY
    monkeypatch.setenv("NLPSERVE_MIN_PADDING_EFFICIENCY", "0.5")
    for provider in ("CPUExecutionProvider", "CUDAExecutionProvider", None):
        assert Settings().batch_policy(provider).min_padding_efficiency == 0.5
    for bad in ("1.5", "-0.1"):
        monkeypatch.setenv("NLPSERVE_MIN_PADDING_EFFICIENCY", bad)
        with pytest.raises(ValueError):
            Settings()


def test_padding_floor_is_off_on_cpu_for_models_whose_tokens_are_cheap(monkeypatch):
    """A model measured (at warm-up) under CHEAP_TOKEN_S per padded token gets no floor by
    default: its batches' fixed cost outweighs their padding. An explicit floor still wins."""
    monkeypatch.delenv("NLPSERVE_MIN_PADDING_EFFICIENCY", raising=False)
    cpu = "CPUExecutionProvider"
    s = Settings()
    assert s.batch_policy(cpu, CHEAP_TOKEN_S / 10).min_padding_efficiency == 0.0
    assert s.batch_policy(cpu, CHEAP_TOKEN_S * 3).min_padding_efficiency == (
        CPU_MIN_PADDING_EFFICIENCY
    )
    assert s.batch_policy(cpu, None).min_padding_efficiency == CPU_MIN_PADDING_EFFICIENCY
    monkeypatch.setenv("NLPSERVE_MIN_PADDING_EFFICIENCY", "0.9")
    assert Settings().batch_policy(cpu, CHEAP_TOKEN_S / 10).min_padding_efficiency == 0.9


@pytest.mark.parametrize("cores", [1, 2, 8])
def test_cpu_runs_a_batch_per_core_and_cuda_one_batch_on_ort_threads(monkeypatch, cores):
    monkeypatch.delenv("NLPSERVE_INFERENCE_THREADS", raising=False)
    monkeypatch.delenv("NLPSERVE_INTRA_OP_THREADS", raising=False)
    monkeypatch.setattr("service.config.usable_cpus", lambda: cores)
    s = Settings()
    assert s.inference_threads_for("CPUExecutionProvider") == cores
    assert s.intra_op_threads_for("CPUExecutionProvider") == 1
    assert s.inference_threads_for("CUDAExecutionProvider") == 1
    assert s.intra_op_threads_for("CUDAExecutionProvider") == 0  # ORT's default


def test_explicit_threads_win_and_share_the_cores(monkeypatch):
    monkeypatch.setattr("service.config.usable_cpus", lambda: 8)
    monkeypatch.setenv("NLPSERVE_INFERENCE_THREADS", "2")
    monkeypatch.delenv("NLPSERVE_INTRA_OP_THREADS", raising=False)
    s = Settings()
    # two batches at once, each on half the cores
    assert s.inference_threads_for("CPUExecutionProvider") == 2
    assert s.intra_op_threads_for("CPUExecutionProvider") == 4
    assert s.inference_threads_for("CUDAExecutionProvider") == 2
    monkeypatch.setenv("NLPSERVE_INTRA_OP_THREADS", "0")
    assert Settings().intra_op_threads_for("CPUExecutionProvider") == 0
    monkeypatch.setenv("NLPSERVE_INFERENCE_THREADS", "0")
    with pytest.raises(ValueError):
        Settings()


@pytest.mark.parametrize(
    ("files", "cap"),
    [
        ({"cpu.max": "200000 100000\n"}, 2),  # cgroup v2, --cpus 2
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: two threads, each often idle
        ({"cpu.max": "max 100000\n"}, None),  # no limit
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),
    ],
)
def test_usable_cpus_respects_a_container_cpu_quota(tmp_path, files, cap):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    expected = affinity if cap is None else min(affinity, cap)
    assert usable_cpus(tmp_path) == expected


def test_stream_maxlen_below_the_queue_depth_is_refused(monkeypatch):
    """A stream trimmed below what admission lets in would drop admitted work."""
    monkeypatch.setenv("NLPSERVE_MAX_QUEUE_DEPTH", "1024")
    monkeypatch.setenv("NLPSERVE_REDIS_STREAM_MAXLEN", "100")
    with pytest.raises(ValueError, match="NLPSERVE_REDIS_STREAM_MAXLEN .100. must be at least"):
        Settings()
    monkeypatch.setenv("NLPSERVE_REDIS_STREAM_MAXLEN", "1024")
    assert Settings().redis_stream_maxlen == 1024


def test_explain_default_over_its_limit_is_refused(monkeypatch):
    """Was accepted; then every request without max_evals got a 422 blaming the client."""
    monkeypatch.setenv("NLPSERVE_EXPLAIN_MAX_EVALS_DEFAULT", "3000")
    monkeypatch.setenv("NLPSERVE_EXPLAIN_MAX_EVALS_LIMIT", "1000")
    with pytest.raises(ValueError, match="EXPLAIN_MAX_EVALS_DEFAULT .3000. must not exceed"):
        Settings()
    monkeypatch.setenv("NLPSERVE_EXPLAIN_MAX_EVALS_LIMIT", "3000")
    assert Settings().explain_max_evals_default == 3000


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_cli_reports_a_bad_setting_in_one_line_not_a_traceback(command):
    import os
    import subprocess
    import sys

    env = os.environ | {"NLPSERVE_MAX_WAIT_MS": "-1", "NLPSERVE_REDIS_STREAM_MAXLEN": "10"}
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", command],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "invalid setting: NLPSERVE_MAX_WAIT_MS: Input should be greater" in proc.stderr


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_setting_that_is_not_json_is_one_line_not_a_traceback(monkeypatch, command):
    """NLPSERVE_BUCKETS is JSON: a malformed value ended the command with pydantic-settings'
    SettingsError traceback ("error parsing value for field "buckets"")."""
    from typer.testing import CliRunner

    from service import cli

    monkeypatch.setenv("NLPSERVE_BUCKETS", '{"pos-en": [16, 32')
    result = CliRunner().invoke(cli.app, [command])
    assert result.exit_code == 2, result.exception
    assert "nlpserve: invalid setting: NLPSERVE_BUCKETS: not valid JSON (" in result.output


@pytest.mark.parametrize(
    ("name", "value", "bound"),
    [
        # each was accepted; what it did then:
        ("DEFAULT_DEADLINE_MS", "0", "greater than or equal to 1"),  # every request 504
        ("WORKER_PREFETCH", "0", "greater than or equal to 1"),  # never read: 504s
        ("REDIS_READ_COUNT", "0", "greater than or equal to 1"),  # "Redis unreachable": 504s
        ("REDIS_MAX_ATTEMPTS", "0", "greater than or equal to 1"),  # every request 422
        ("REDIS_CLAIM_IDLE_MS", "20", "greater than or equal to 200"),  # live work stolen
        ("REDIS_MAX_CONNECTIONS", "2", "greater than or equal to 3"),  # worker: 504s
        ("REDIS_CONNECT_TIMEOUT_S", "0", "greater than 0"),  # non-blocking sockets
        ("REDIS_SOCKET_TIMEOUT_S", "0", "greater than 0"),
        ("SHUTDOWN_TIMEOUT_S", "-1", "greater than or equal to 0"),
        ("WORKER_DRAIN_TIMEOUT_S", "-1", "greater than or equal to 0"),
        ("INTER_OP_THREADS", "-1", "greater than or equal to 0"),
        ("RESPONSE_CACHE_MB", "inf", "a finite number"),  # the API's OverflowError traceback
        ("REDIS_SOCKET_TIMEOUT_S", "inf", "a finite number"),  # OverflowError (timeval)
        ("BODY_TIMEOUT_S", "inf", "a finite number"),
        ("SHUTDOWN_TIMEOUT_S", "inf", "a finite number"),  # a stop that never ends
    ],
)
def test_a_value_that_cannot_work_is_refused_at_start(monkeypatch, name, value, bound):
    """Values accepted before, with which the service could not work (the comments say how
    each failed), stop the command in one line naming the variable."""
    from typer.testing import CliRunner

    from service import cli

    monkeypatch.setenv(f"NLPSERVE_{name}", value)
    result = CliRunner().invoke(cli.app, ["worker"])
    assert result.exit_code == 2, result.exception
    assert f"nlpserve: invalid setting: NLPSERVE_{name}: Input should be {bound}" in (result.output)


@pytest.mark.parametrize(
    ("argv", "field", "target"),
    [
        (["serve", "--port", "0"], "port", "service.server.run_server"),
        (["worker", "--metrics-port", "0"], "metrics_port", "service.worker.run_worker"),
    ],
)
def test_a_zero_option_overrides_its_setting(monkeypatch, argv, field, target):
    """`serve --port 0` (any free port, as NLPSERVE_PORT=0) served on 8000: a 0 option was
    dropped as if it were not given."""
    from typer.testing import CliRunner

    from service import cli

    seen: list[Settings] = []
    monkeypatch.delenv(f"NLPSERVE_{field.upper()}", raising=False)
    monkeypatch.setattr(cli, "_repository", lambda *a, **k: [])
    monkeypatch.setattr(target, seen.append)
    result = CliRunner().invoke(cli.app, argv)
    assert result.exit_code == 0, result.output
    assert getattr(seen[0], field) == 0


def test_every_setting_is_documented():
    """Each setting is in README.md or docs/*.md, as NLPSERVE_<NAME> or, in the settings
    tables that drop the prefix, as `<NAME>` (a new setting nobody can find is no setting)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    docs = "".join(p.read_text("utf-8") for p in [root / "README.md", *root.glob("docs/*.md")])
    named = set(re.findall(r"NLPSERVE_([A-Z0-9_]+)", docs))
    named |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", docs))
    assert [n.upper() for n in Settings.model_fields if n.upper() not in named] == []


def test_a_full_batch_must_fit_the_request_sequence_limit():
    from pydantic import ValidationError

    from service.config import Settings

    with pytest.raises(ValidationError, match="must be at least NLPSERVE_MAX_BATCH_ITEMS"):
        Settings(max_request_sequences=100, max_batch_items=101)
    with pytest.raises(ValidationError):
        Settings(max_batch_items=10_001, max_request_sequences=20_000)


@pytest.mark.parametrize(
    "url",
    [
        "redis://nlpserve:Xy7#secret@redis-host:6379/0",  # '#': the rest read as a fragment
        "redis://nlpserve:Xy7/secret@redis-host:6379/0",  # '/': the rest read as the path
        "redis://nlpserve:Xy7?secret@redis-host:6379/0",  # '?': the rest read as the query
        "redis://nlpserve:4242#secret@redis-host/0",  # digits: a port, user name the host
        "http://nlpserve:Xy7secret@redis-host:6379/0",
    ],
)
def test_a_malformed_redis_url_is_refused_without_quoting_it(monkeypatch, url):
    """An unencoded '#', '/' or '?' in the password ended the URL's host part early: redis-py
    raised "Port could not be cast to integer value as 'Xy7'" into the log (the password's
    start), or connected to "nlpserve:4242" and named it in every connection error. Refused
    at start, in the CLI's one line too, quoting no part of the URL."""
    from pydantic import ValidationError
    from typer.testing import CliRunner

    from service import cli

    with pytest.raises(ValidationError) as info:
        Settings(redis_url=url)
    for secret in ("Xy7", "secret", "4242"):
        assert secret not in str(info.value)
    monkeypatch.setenv("NLPSERVE_REDIS_URL", url)
    result = CliRunner().invoke(cli.app, ["worker"])
    assert result.exit_code == 2 and "NLPSERVE_REDIS_URL" in result.output
    assert "Xy7" not in result.output and "4242" not in result.output


@pytest.mark.parametrize(
    "query", ["protocol=3", "legacy_responses=false", "decode_responses=false", "decode_responses"]
)
def test_a_redis_url_option_that_reshapes_replies_is_refused(monkeypatch, query):
    """The worker reads replies as bytes in RESP2 shapes: with ``?protocol=3`` (or
    ``legacy_responses=false``) its first XREADGROUP reply was a dict and the worker exited
    ("too many values to unpack"); ``decode_responses`` (any value: redis-py keeps it a
    string) made every entry unreadable. Refused at start, in the CLI's one line."""
    from pydantic import ValidationError
    from typer.testing import CliRunner

    from service import cli

    url = f"redis://redis-host:6379/0?socket_timeout=2&{query}"
    name = query.partition("=")[0]
    with pytest.raises(ValidationError, match=f"the option {name} is not supported"):
        Settings(redis_url=url)
    monkeypatch.setenv("NLPSERVE_REDIS_URL", url)
    result = CliRunner().invoke(cli.app, ["worker"])
    assert result.exit_code == 2, result.output
    assert f"NLPSERVE_REDIS_URL: the option {name} is not supported" in result.output


def test_a_well_formed_redis_url_is_accepted_and_never_in_the_repr(tmp_path):
    from pydantic import ValidationError

    for url in [
        "rediss://nlpserve:p%40ss%2Fw%23rd@redis-host:6380/0?ssl_ca_certs=/etc/ca.pem",
        "redis://:p@ss@redis-host:6379/0",  # an '@' in the password: the last one ends it
        "redis://[::1]:6379/0",
        "unix:///run/redis.sock?db=1",
    ]:
        assert "p%40ss" not in repr(Settings(redis_url=url))
    secret = tmp_path / "password"
    Settings(redis_url="rediss://nlpserve@redis-host:6380/0", redis_password_file=secret)
    with pytest.raises(ValidationError, match="give it in one place"):
        Settings(redis_url="redis://nlpserve:pw@redis-host/0", redis_password_file=secret)


def test_a_zero_redis_block_is_refused(monkeypatch):
    """NLPSERVE_REDIS_BLOCK_MS=0 is XREADGROUP BLOCK 0: a worker's read would never return."""
    monkeypatch.setenv("NLPSERVE_REDIS_BLOCK_MS", "0")
    with pytest.raises(ValueError, match="redis_block_ms"):
        Settings()


@pytest.mark.parametrize(
    "name", ["INTRA_OP_THREADS", "INTER_OP_THREADS", "INFERENCE_THREADS", "EXPLAIN_CONCURRENCY"]
)
def test_a_thread_count_over_the_limit_is_refused_naming_value_and_limit(monkeypatch, name):
    """NLPSERVE_INTRA_OP_THREADS=100000 had ORT create 100,000 threads per session and the
    process grow to 16 GB; each thread-count setting stops at MAX_THREADS."""
    from typer.testing import CliRunner

    from service import cli
    from service.config import MAX_THREADS

    monkeypatch.setenv(f"NLPSERVE_{name}", str(MAX_THREADS))
    assert getattr(Settings(), name.lower()) == MAX_THREADS
    monkeypatch.setenv(f"NLPSERVE_{name}", "100000")
    result = CliRunner().invoke(cli.app, ["serve"])
    assert result.exit_code == 2, result.exception
    assert result.output.startswith(
        f"nlpserve: invalid setting: NLPSERVE_{name}: 100000 threads is more than the limit "
        f"of {MAX_THREADS} (this host has {usable_cpus()} usable CPUs)"
    ), result.output


def test_a_max_wait_as_long_as_the_deadline_is_refused(monkeypatch):
    """With NLPSERVE_WAIT_WHEN_IDLE every request waited the max wait: one past the deadline
    answered every request 504."""
    monkeypatch.setenv("NLPSERVE_WAIT_WHEN_IDLE", "true")
    monkeypatch.setenv("NLPSERVE_DEFAULT_DEADLINE_MS", "1000")
    monkeypatch.setenv("NLPSERVE_MAX_WAIT_MS", "999.5")
    assert Settings().max_wait_ms == 999.5
    for bad in ("1000", "60000"):
        monkeypatch.setenv("NLPSERVE_MAX_WAIT_MS", bad)
        with pytest.raises(ValueError, match=rf"MAX_WAIT_MS \({bad}\) must be less than "):
            Settings()


def test_an_nlpserve_variable_no_setting_reads_is_named_with_the_closest_setting():
    lines = unknown_settings(
        {
            "NLPSERVE_MAX_BATCH_SIZ": "8",  # a typo: served with the default, silently, before
            "nlpserve_response_cache": "16",  # read case-insensitively, as the settings are
            "NLPSERVE_SOMETHING_ELSE": "1",
            "NLPSERVE_PORT": "8001",  # a setting
            "nlpserve_port": "8001",  # the same setting, another case
            "NLPSERVE_HEALTH_URL": "http://x/healthz",  # read by the HEALTHCHECK, not a setting
            "PATH": "/usr/bin",
        }
    )
    assert lines == [
        "NLPSERVE_MAX_BATCH_SIZ is not a setting and is ignored "
        "(did you mean NLPSERVE_MAX_BATCH_SIZE?)",
        "NLPSERVE_SOMETHING_ELSE is not a setting and is ignored",
        "nlpserve_response_cache is not a setting and is ignored "
        "(did you mean NLPSERVE_RESPONSE_CACHE_MB?)",
    ]


def test_the_deploy_files_set_no_variable_that_would_draw_the_unknown_setting_warning():
    """Compose, the Dockerfile and the gateway's template set NLPSERVE_* names that are read
    by the gateway, the HEALTHCHECK or compose itself: every one is a setting or known to be
    read elsewhere, so a container started from them logs no false warning."""
    root = Path(__file__).resolve().parents[1]
    files = [root / "docker-compose.yml", root / "Dockerfile"]
    files += [f for f in (root / "deploy").rglob("*") if f.is_file() and f.suffix != ".txt"]
    names = {n for f in files for n in re.findall(r"NLPSERVE_[A-Z0-9_]*[A-Z0-9]", f.read_text())}
    assert len(names) > 20  # the files were read
    assert unknown_settings(dict.fromkeys(names, "x")) == []
