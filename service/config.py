"""Typed settings for the service, read from ``NLPSERVE_*`` environment variables."""

from __future__ import annotations

import difflib
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.batching.types import BatchPolicy
from service.logs import LEVELS, LogFormat
from service.repository.discovery import parse_selection

# Default token budgets (NLPSERVE_MAX_BATCH_TOKENS unset). On the 2-core CPU, 512 gave 44%
# more throughput than 8192 (bench/results/detector-en-cpu-2core*.md); GPUs want big batches.
CPU_BATCH_TOKENS = 512
GPU_BATCH_TOKENS = 8192
CUDA_SHAPE_MULTIPLE = 16
CPU_PROVIDER = "CPUExecutionProvider"  # service/runtime/session.py's CPU (no ORT import here)
# Default max wait (NLPSERVE_MAX_WAIT_MS unset): how long a batch formed while every
# inference thread is busy stays open for company before it is queued behind them (an idle
# thread never waits: it takes pending work at once). A CPU batch takes tens of ms, so that
# batch fills long before a thread frees. A GPU batch takes ~1 ms: when the wait applied to
# an idle model too, 5 ms capped an H200 replica near 640 req/s (bench/results/*-cuda-h200*,
# mean batch 2.8); a short wait keeps the GPU fed.
CPU_MAX_WAIT_MS = 5.0
CUDA_MAX_WAIT_MS = 1.0
# Default padding floor (NLPSERVE_MIN_PADDING_EFFICIENCY unset). On CPU a padded token costs
# as much as a real one and batch size buys almost nothing (raw ORT int8 on 2 cores: 529
# seq/s in batches of 1, 478-535 in batches of 4-32), so a sequence too unlike a batch waits
# for its own; on CUDA a bigger batch is what pays, so any padding is accepted.
CPU_MIN_PADDING_EFFICIENCY = 0.95
CUDA_MIN_PADDING_EFFICIENCY = 0.0
# ...except for a model whose padded token costs less than this on the CPU (measured at
# warm-up): there a batch's fixed cost (event loop, session call) outweighs its padding, and
# the floor cost the LSTM polarity model 10% (~2,200 -> ~1,980 req/s). Measured on the 2-core
# machine: polarity-en 1.3 us per token, pos-en 7.4, qa-zh (4 layers x 128) 10, the MiniLM
# detector 53; a BERT-base is ~6x the MiniLM. Hosts differ: a Zen 3 EPYC without AVX-512
# measures pos-en 17.9, the detector 188 and today's qa-zh/1 211 (docs/service.md).
CHEAP_TOKEN_S = 20e-6
# The most items any list of a request body may hold (batch `inputs`, POS `tokens`), bounded
# in the schema so validation stops there: an unbounded list of 330,000 wrong items held the
# event loop for ~1.3 s while each item was validated and its error listed.
MAX_LIST_ITEMS = 10_000
# Shortest NLPSERVE_REDIS_CLAIM_IDLE_MS: a worker's maintenance pass, which refreshes the
# entries it holds, runs every quarter of it but at most every 50 ms (service/worker.py). At
# 20 ms a live worker's entries sat idle past it between two passes: another worker took
# them over, ran them again and, with NLPSERVE_REDIS_MAX_ATTEMPTS=1, dead-lettered them (the
# clients got 422 for healthy requests).
MIN_CLAIM_IDLE_MS = 200
# NLPSERVE_REDIS_URL query options redis-py reads that change the shape of its replies: with
# RESP3 or redis-py's unified shapes a worker's first read failed and the worker exited; with
# decoded text (any value: redis-py takes the string as given) every entry was unreadable.
REPLY_SHAPE_OPTIONS = frozenset({"protocol", "legacy_responses", "decode_responses"})
# Most threads any thread-count setting may ask for (ORT intra- and inter-op threads,
# inference threads, explanation threads). NLPSERVE_INTRA_OP_THREADS=100000 had ORT create
# 100,000 threads per session and the process grow to 16 GB; 1,024 (~64 KiB of RSS each, 0.1 s
# to start per session) is above any host's core count today.
MAX_THREADS = 1024


def parse_origins(value: str) -> list[str]:
    """``NLPSERVE_CORS_ALLOW_ORIGINS`` as a list. A browser sends its page's origin as
    ``scheme://host[:port]`` and CORS compares it as a string: a path, a trailing slash or
    another case would never match, so they are refused here rather than silently ignored."""
    origins = [o.strip() for o in value.split(",") if o.strip()]
    if origins == ["*"]:
        return origins
    for origin in origins:
        if origin == "*":
            raise ValueError("'*' allows every origin: give it alone, not in a list")
        parts = urlsplit(origin)
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{origin!r}: the port is not a number from 0 to 65535") from None
        exact = f"{parts.scheme}://{parts.netloc}"
        if parts.scheme not in ("http", "https") or not parts.hostname or origin != exact:
            raise ValueError(
                f"{origin!r} is not an origin: scheme://host[:port], http or https, with no "
                "path, query or trailing slash (e.g. https://app.example.com)"
            )
        if origin != origin.lower():
            raise ValueError(f"{origin!r}: browsers send origins in lower case")
        # How a browser serializes it: no user info, the scheme's default port left out, the
        # port as a plain number ("https://a.example.com:443" would never match).
        host = parts.hostname
        host = f"[{host}]" if ":" in host else host
        default = {"http": 80, "https": 443}[parts.scheme]
        sent = f"{parts.scheme}://{host}" + ("" if port in (None, default) else f":{port}")
        if origin != sent:
            raise ValueError(f"{origin!r}: a browser sends this origin as {sent!r}")
    return origins


class Settings(BaseSettings):
    # hide_input_in_errors: a bad value is never echoed back (NLPSERVE_REDIS_URL holds a
    # password); the errors name the variable and say what is wrong with it.
    # protected_namespaces: pydantic-settings < 2.7 reserves the whole `model_` prefix
    # (`model_dir`: pydantic warned at every start); later ones reserve only their own names.
    model_config = SettingsConfigDict(
        env_prefix="NLPSERVE_",
        env_file=None,
        extra="ignore",
        hide_input_in_errors=True,
        protected_namespaces=("settings_",),
        # "inf" passed every lower bound: a timeout of inf was an OverflowError traceback
        # (a socket's timeval, a timer) or a wait without end; no setting means it
        allow_inf_nan=False,
    )

    # --- where things live
    model_dir: Path = Field(Path("models"), description="Model repository root.")
    load_models: str | None = Field(
        None,
        description="Which models this process loads, comma-separated: `name` (its highest "
        "version) or `name=version` (that version), e.g. `detector-en,qa-zh=1`; `*` adds every "
        "other model (`*,detector-en=1`). Unset or empty: every model of the repository at its "
        "highest version. Uses: workers split by hardware (BERT models on a GPU worker, LSTMs "
        "on CPU ones), a version held back in a rollout.",
    )
    data_dir: Path = Field(
        Path("data"), description="Training/evaluation data root (training only)."
    )

    # --- HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0: any free port).")
    grpc_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Also serve the Open Inference Protocol over gRPC on this port, beside "
        "HTTP, at NLPSERVE_HOST (the grpc extra: `pip install 'nlpserve[grpc]'`). 0: no gRPC.",
    )
    grpc_stream_max_in_flight: int = Field(
        16,
        ge=1,
        le=1024,
        description="Most requests of one gRPC ModelStreamInfer stream run at once (they may "
        "batch together); past it the server reads the stream no further until one is "
        "answered, so the client's sends wait (HTTP/2 flow control).",
    )
    cors_allow_origins: str | None = Field(
        None,
        description="Origins whose web pages may call the API from a browser, comma-separated "
        "(`https://app.example.com,http://localhost:3000`), or `*` for any origin. Unset: no "
        "CORS headers, so browsers let only pages served by this API (the demo page) read its "
        "answers.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="Require an API key on every endpoint but the probes, /metrics, the docs "
        "and the demo page's files: a file of lines `<client-name> sha256:<hex>` (or "
        "`<client-name> <key>`), each optionally with the client's own `max_in_flight=N`, "
        "from `nlpserve keys new NAME`, re-read when it changes "
        "(docs/deploy.md, Authentication). Unset or empty: no authentication.",
    )
    client_max_in_flight: int | None = Field(
        None,
        ge=1,
        description="Most items (a batch of N counts N, an explanation 1) one client may have "
        "admitted and not yet answered, across every model and (in Redis mode) every API "
        "replica; over it: 429 `client_quota`, so one client's flood cannot fill the queues "
        "every client shares. Needs NLPSERVE_API_KEYS_FILE (clients are its names); a client "
        "whose lines there say max_in_flight=N has N instead. Unset or empty: no limit but the "
        "clients' own max_in_flight.",
    )
    client_rate: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Items a second (a batch of N counts N, an explanation 1; answers of the "
        "response cache none) one client may send, sustained, across every model and (in "
        "Redis mode) every API replica: a token bucket per client; over it: 429 `client_rate` "
        "with the Retry-After that has room for the request. Needs NLPSERVE_API_KEYS_FILE "
        "(clients are its names); a client whose lines there say rate=R has R (and its "
        "burst=B) instead. Unset or empty: no rate limit but the clients' own rate.",
    )
    client_burst: int | None = Field(
        None,
        ge=1,
        description="The most items a client under NLPSERVE_CLIENT_RATE may send at once "
        "(the bucket's size: one request of more is 422 `too_many_items`). Needs "
        "NLPSERVE_CLIENT_RATE. Unset or empty: the rate rounded up, at least 1 (one second's "
        "items).",
    )
    client_quota_scope: Literal["global", "replica"] = Field(
        "global",
        description="Where a client's in-flight limit (NLPSERVE_CLIENT_MAX_IN_FLIGHT, "
        "max_in_flight) and rate limit (NLPSERVE_CLIENT_RATE, rate) count in Redis mode: "
        "`global`, across every API replica (counted in Redis: a round trip more at the start "
        "and at the end of each request of a client with an in-flight limit, one more at the "
        "start with a rate limit); `replica`, in each API replica alone (behind R replicas a "
        "client may hold R times its limit and send R times its rate; no Redis call). "
        "In-process mode: the one process is the whole service either way.",
    )
    max_body_bytes: int = Field(
        1_000_000, ge=1, description="Request bodies larger than this get 413."
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A request's whole body must arrive within this long of its headers; "
        "else 408 and the connection is closed (a client that stalls mid-body).",
    )
    max_text_chars: int = Field(
        20_000, ge=1, description="Longest accepted text field, in characters."
    )
    max_batch_items: int = Field(
        64, ge=1, le=MAX_LIST_ITEMS, description="Most items in one {'inputs': [...]} request."
    )
    default_deadline_ms: int = Field(
        30_000,
        ge=1,  # 0 or less: every request 504s before it is queued
        description="Per-request deadline unless the X-Deadline-Ms header says less.",
    )
    fast_path: bool = Field(
        True,
        description="Answer well-formed POST /v1/<task> requests below FastAPI's router "
        "(service/api/fast_path.py): the same validation, task code and error handlers, less "
        "event-loop CPU per request. false = every request through FastAPI.",
    )
    response_cache_mb: float = Field(
        0,
        ge=0,
        description="Megabytes of per-item prediction results this API process keeps in an "
        "LRU cache (service/api/response_cache.py), keyed by the model as served, the input "
        "and how it is answered: a repeated item is answered without queueing or inference. "
        "0 = off.",
    )

    # --- runtime
    providers: str | None = Field(
        None,
        description="Comma-separated ONNX Runtime providers, e.g. 'CUDAExecutionProvider,"
        "CPUExecutionProvider'. Default: CUDA when available, else CPU.",
    )
    require_gpu: bool = Field(False, description="Fail instead of falling back from CUDA to CPU.")
    intra_op_threads: int | None = Field(
        None,
        ge=0,
        description="ORT intra-op threads of one batch (0 = ORT default: all cores). Default: "
        "on CPU, the usable cores divided among the inference threads (1 with the default "
        "threads); on CUDA, 0. At most 1,024; more threads than usable cores on CPU is "
        "warned about at load (oversubscribed, ORT runs slower).",
    )
    inter_op_threads: int = Field(
        1,
        ge=0,
        description="ORT inter-op threads: independent branches of the graph run on this many "
        "threads at once (0 = ORT default). 1 = sequential execution, one node at a time. "
        "At most 1,024.",
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    variant: str | None = Field(
        None, description="Force a model variant (fp32, int8, fp16); default picks per provider."
    )
    ort_allow_spinning: bool = Field(
        False,
        description="Let idle ORT threads spin-wait. Off by default: spinning threads steal "
        "CPU from the event loop and tokenization on small machines.",
    )
    warmup: bool = Field(
        True,
        description="Run one batch per bucket of each model at startup (every shape of the "
        "shape grid where it is on). On CPU it also times the cost per padded token that "
        "sets the default padding floor: false leaves every CPU model at the "
        f"{CPU_MIN_PADDING_EFFICIENCY:g} floor.",
    )

    # --- batching
    max_batch_size: int = Field(32, ge=1, description="Most sequences in one inference batch.")
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Token budget: batch size x padded length never exceeds this (before the "
        "CUDA shape grid rounds the shape up, see shape_multiple). Default per "
        f"provider: {CPU_BATCH_TOKENS} on CPU (padding and big batches cost more than they give; "
        f"measured in bench/results), {GPU_BATCH_TOKENS} on CUDA (batch size is what pays).",
    )
    max_wait_ms: float | None = Field(
        None,
        ge=0,
        description="How long the oldest sequence of a batch that is not full may wait for "
        "company while every inference thread is busy (the batch formed ahead, to queue "
        "behind them). A thread that is idle takes pending work at once, without waiting; "
        "no sequence waits past half the time it had left to its deadline when queued. Less "
        "than NLPSERVE_DEFAULT_DEADLINE_MS. "
        f"Default per provider: {CPU_MAX_WAIT_MS:g} on CPU, {CUDA_MAX_WAIT_MS:g} on CUDA (a GPU "
        "batch takes about a millisecond: a longer wait idles the GPU).",
    )
    wait_when_idle: bool = Field(
        False,
        description="Hold a batch that is not full for the max wait even while an inference "
        "thread is idle: fewer, fuller batches at low load, at the cost of every lone "
        "request's latency (the max wait added to it). Worth trying where several processes "
        "share one GPU and each one's small batches contend for it.",
    )
    min_padding_efficiency: float | None = Field(
        None,
        ge=0,
        le=1,
        description="A sequence joins a batch only if the batch's padding efficiency (real / "
        "padded tokens) stays at or above this; otherwise it waits for a batch nearer its "
        f"length. Default per provider: {CPU_MIN_PADDING_EFFICIENCY:g} on CPU (a padded token "
        "costs as much as a real one; batch size buys little), except for models whose "
        f"padded token costs under {CHEAP_TOKEN_S * 1e6:g} us at warm-up (0: a batch's fixed "
        f"cost outweighs their padding); {CUDA_MIN_PADDING_EFFICIENCY:g} on CUDA (batch size "
        "is what pays). Rounding to the shape grid is not counted.",
    )
    shape_multiple: int | None = Field(
        None,
        ge=1,
        description="Round each batch's padded length up to a multiple of this and its row "
        "count up to a power of two (extra rows repeat a sequence and are dropped), so a "
        "session sees a small fixed set of shapes, all run once at warm-up. Default: "
        f"{CUDA_SHAPE_MULTIPLE} on CUDA, where the first run of a new shape is slow (bench/"
        "results/*-cuda-*: fp16 batches took ~29 ms in the service against ~1 ms in the raw "
        "loop that repeats its shapes); 1 (off) on CPU, where padding is what costs.",
    )
    max_queue_depth: int = Field(
        1024, ge=1, description="Per-model queued requests before new ones get 429."
    )
    max_request_sequences: int = Field(
        512,
        ge=1,
        description="Most model sequences one request may need (QA windows of all its "
        "items, ~100 for a 20,000-character Chinese context; one per item elsewhere); more is "
        "a 422. Requests run oldest first, so one request of 1,016 QA windows (8 such "
        "contexts) held qa-zh for ~13 s on 2 cores while every later request waited. At "
        "least NLPSERVE_MAX_BATCH_ITEMS.",
    )
    inference_threads: int | None = Field(
        None,
        ge=1,
        description="Threads running ORT batches, per model (each model has its own: none "
        "waits for another's batches); each model may run this many batches at once. "
        "Default: on CPU, one per usable core, each batch on one core (on 2 cores 8-10% "
        "more throughput than one batch at a time on both cores, raw and served, fp32 and "
        "int8, at the cost of a slower lone request); on CUDA, 1. At most 1,024.",
    )
    prefetch_batches: int = Field(
        1,
        ge=0,
        description="Batches formed ahead, per model (per worker in Redis mode), queued "
        "behind the running ones: when a batch ends the next starts at once on its thread, "
        "not after a round trip through the event loop. 0 = form a batch only when a thread "
        "is free.",
    )
    buckets: dict[str, list[int]] = Field(
        default_factory=dict,
        description='Per-model bucket edges overriding the manifest, as JSON: {"pos-en": [16, 32, '
        "64]}. Edges past the model's max_length are dropped; max_length is always the last. "
        "Edges are token counts (at least 1), and a model the repository does not hold stops "
        "the command.",
    )
    shutdown_timeout_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight requests get to finish."
    )

    # --- queue backend
    queue: Literal["inprocess", "redis"] = "inprocess"
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        repr=False,  # may hold the password
        description="The Redis server: `redis://[user[:password]@]host[:port][/db]`, "
        "`rediss://` for TLS (with `?ssl_ca_certs=<CA file>`); user and password "
        "percent-encoded (docs/deploy.md, Production Redis).",
    )
    redis_password_file: Path | None = Field(
        None,
        description="A file holding the Redis password (a Docker or Kubernetes secret), "
        "instead of one in NLPSERVE_REDIS_URL: read at each new connection, so a rotated "
        "password is used without a restart. The user name stays in the URL.",
    )
    metrics_port: int = Field(
        9100, ge=0, le=65535, description="Prometheus port of `nlpserve worker`."
    )
    metrics_host: str = Field(
        "0.0.0.0",
        description="Bind address of the worker's /metrics, /healthz, /readyz (scraped from "
        "other hosts, like prometheus_client's default).",
    )
    # Redis backend details (docs/scale-out.md)
    redis_prefix: str = Field("nlpserve", description="Namespace of every Redis key and channel.")
    redis_connect_timeout_s: float = Field(
        1.0,
        gt=0,  # a socket timeout of 0 is a non-blocking socket: no command could complete
        description="Redis connect timeout: an unreachable Redis must fail requests fast.",
    )
    redis_socket_timeout_s: float = Field(2.0, gt=0, description="Redis command timeout.")
    redis_max_connections: int = Field(
        64,
        # A worker's cancel subscription holds one for good and its XREADGROUP one for up to
        # the block time: with 1 the worker never read (its stop hung too), with 2 its replies
        # waited behind the reads and every request timed out (504). The read beside the
        # blocked one (worker.py, _read_beside) never blocks: it waits its turn with the
        # replies for the third. (0: redis-py's 100.)
        ge=3,
        description="Redis connection pool size per process (at least 3).",
    )
    redis_stream_maxlen: int = Field(
        100_000,
        description="Approximate MAXLEN of each stream; a safety net, since answered entries "
        "are deleted right away. At least NLPSERVE_MAX_QUEUE_DEPTH (checked at start).",
    )
    redis_read_count: int = Field(
        64,
        ge=1,  # redis-py refuses COUNT 0 before sending it: the worker would never read
        description="Entries a worker reads per stream per XREADGROUP (a few batches: "
        "more lets one worker hoard work that another idle worker could run).",
    )
    redis_block_ms: int = Field(
        # 0 would be Redis's BLOCK 0: wait forever (a stop or a new stream never seen)
        500,
        ge=1,
        description="XREADGROUP BLOCK time of a worker.",
    )
    redis_claim_idle_ms: int = Field(
        15_000,
        ge=MIN_CLAIM_IDLE_MS,
        description="A pending entry idle this long (its worker died) is reclaimed by another "
        f"worker (XPENDING IDLE, then XCLAIM). At least {MIN_CLAIM_IDLE_MS}: a worker refreshes "
        "the entries it holds every third of this time, at most every 50 ms.",
    )
    redis_no_worker_fail_s: float | None = Field(
        None,
        ge=0,
        description="Redis mode, API replicas: once no inference worker has been alive this "
        "many seconds, answer new requests 503 no_workers at once (and /readyz 503) instead "
        "of queueing them until their deadline; likewise a model's requests while no live "
        "worker serves the model version this replica loaded. Unset: queue them (replicas "
        "and workers start in any order; a worker that comes serves the backlog).",
    )
    redis_max_attempts: int = Field(
        3,
        ge=1,  # 0: every entry dead-lettered unrun ("delivered 1 times without an answer")
        description="Deliveries of an entry before it goes to the dead-letter stream and its "
        "client gets an error.",
    )
    worker_prefetch: int = Field(
        128,
        ge=1,  # 0: no model has room, and the worker never reads
        description="Entries of one model one worker holds (read but not yet answered) "
        "before it stops reading that model's batch and explain streams; its interactive "
        "entries have a room of their own, as many (a batch flood never keeps them in "
        "Redis). The other models' are still read; one read may overshoot by up to "
        "redis_read_count per stream.",
    )
    worker_drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long a worker may finish the work in hand."
    )
    worker_name: str | None = Field(
        None, description="Consumer name of a worker in its group (default: host-pid-random)."
    )

    # --- explanations (docs/explain.md)
    explain_max_evals_default: int = Field(
        300, ge=4, description="SHAP model evaluations per explanation unless the request says."
    )
    explain_max_evals_limit: int = Field(
        # 1,000 evaluations of a 126-token text took ~19 s on a 2-core CPU (int8 detector):
        # within the default 30 s deadline. A GPU affords more.
        1000,
        ge=4,
        description="Most SHAP evaluations a request may ask for (more: 422).",
    )
    explain_warmup: bool = Field(
        False,
        description="Import shap and JIT its code at startup, in a thread (~5-25 s of CPU), "
        "instead of on the first explanation or the first visit of the demo page.",
    )
    explain_cache_size: int = Field(
        256, ge=0, description="Explanations kept, keyed by (model, version, text, max_evals)."
    )
    explain_concurrency: int = Field(
        2,
        ge=1,
        description="Explanations computed at once (a thread each, at most 1,024); more wait "
        "for a free slot.",
    )

    log_level: str = Field(
        "INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)."
    )
    log_format: LogFormat = Field(
        "text",
        description="`text`: one line per record for people; `json`: one JSON object per line "
        "for a log collector, with `request_id`, `item_id`, `trace_id`, `span_id`, `client` "
        "and tracebacks as fields.",
    )

    @field_validator(
        "intra_op_threads", "inter_op_threads", "inference_threads", "explain_concurrency"
    )
    @classmethod
    def _threads_bounded(cls, value: int | None) -> int | None:
        if value is not None and value > MAX_THREADS:
            raise ValueError(
                f"{value} threads is more than the limit of {MAX_THREADS} (this host has "
                f"{usable_cpus()} usable CPUs)"
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in LEVELS:
            raise ValueError(f"{value!r} is not a log level: one of {', '.join(LEVELS)}")
        return value.upper()

    @model_validator(mode="after")
    def _explain_default_within_limit(self) -> Settings:
        # Otherwise every request that leaves max_evals out is refused, blaming the client.
        if self.explain_max_evals_default > self.explain_max_evals_limit:
            raise ValueError(
                f"NLPSERVE_EXPLAIN_MAX_EVALS_DEFAULT ({self.explain_max_evals_default}) must "
                f"not exceed NLPSERVE_EXPLAIN_MAX_EVALS_LIMIT ({self.explain_max_evals_limit})"
            )
        return self

    @field_validator("redis_url")
    @classmethod
    def _redis_url_parses(cls, value: str) -> str:
        # redis-py's errors about a malformed URL quote pieces of it, and a password holding
        # an unencoded '#', '/' or '?' ends the host part early: its first characters then
        # read as the port ("Port could not be cast to integer value as '<password start>'"),
        # or, all digits, as a port to connect to. Checked here in words that quote nothing.
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        encode = (
            "percent-encode the user name and password in the URL (Python: "
            "urllib.parse.quote(password, safe='')), or give the password in "
            "NLPSERVE_REDIS_PASSWORD_FILE"
        )
        split_early = "@" in parts.path or "@" in parts.query.partition("=")[0]
        if "#" in value or split_early:
            raise ValueError(f"malformed: a '#', '/' or '?' in the password? {encode}")
        try:
            parts.port  # noqa: B018 -- raises on a port that is no number
        except ValueError:
            raise ValueError(f"the port is not a number: {encode}") from None
        reshaping = sorted(
            {name for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
            & REPLY_SHAPE_OPTIONS
        )
        if reshaping:
            raise ValueError(
                f"the option {', '.join(reshaping)} is not supported: the service reads "
                "Redis replies as bytes, in redis-py's RESP2 shapes; remove it"
            )
        return value

    @model_validator(mode="after")
    def _one_redis_password(self) -> Settings:
        if self.redis_password_file is not None and urlsplit(self.redis_url).password:
            raise ValueError(
                "NLPSERVE_REDIS_URL holds a password and NLPSERVE_REDIS_PASSWORD_FILE is set: "
                "give it in one place"
            )
        return self

    @field_validator(
        "api_keys_file", "client_max_in_flight", "client_rate", "client_burst", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # NLPSERVE_API_KEYS_FILE= (compose's ${VAR:-}) is no file, not the current directory
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins_parse(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # NLPSERVE_CORS_ALLOW_ORIGINS= (compose's ${VAR:-}): no CORS
        parse_origins(value)  # ValueError: reported as a bad NLPSERVE_CORS_ALLOW_ORIGINS
        return value

    def cors_origins(self) -> list[str]:
        """``cors_allow_origins`` parsed ([]: no CORS headers)."""
        return [] if self.cors_allow_origins is None else parse_origins(self.cors_allow_origins)

    @field_validator("buckets")
    @classmethod
    def _edges_are_lengths(cls, value: dict[str, list[int]]) -> dict[str, list[int]]:
        # an edge of 0 or less was dropped without a word: a typo, never a bucket
        for name, edges in value.items():
            if bad := [e for e in edges if e < 1]:
                raise ValueError(
                    f"{name}: bucket edges are sequence lengths in tokens, at least 1 "
                    f"(got {', '.join(map(str, bad))})"
                )
        return value

    @field_validator("load_models")
    @classmethod
    def _selection_parses(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # NLPSERVE_LOAD_MODELS= (e.g. compose's ${VAR:-}): every model
        parse_selection(value)  # ValueError: reported as a bad NLPSERVE_LOAD_MODELS
        return value

    def model_selection(self) -> dict[str, str | None] | None:
        """``load_models`` parsed (None: every model, highest versions)."""
        return None if self.load_models is None else parse_selection(self.load_models)

    @model_validator(mode="after")
    def _a_full_batch_fits_a_request(self) -> Settings:
        if self.max_request_sequences < self.max_batch_items:
            raise ValueError(
                f"NLPSERVE_MAX_REQUEST_SEQUENCES ({self.max_request_sequences}) must be at "
                f"least NLPSERVE_MAX_BATCH_ITEMS ({self.max_batch_items}): a full batch of "
                "one-sequence items would be refused"
            )
        return self

    @model_validator(mode="after")
    def _max_wait_within_the_deadline(self) -> Settings:
        # A max wait as long as the deadline can never be waited out: the batcher cuts each
        # sequence's wait to half its time left, so such a value only misleads.
        if self.max_wait_ms is not None and self.max_wait_ms >= self.default_deadline_ms:
            raise ValueError(
                f"NLPSERVE_MAX_WAIT_MS ({self.max_wait_ms:g}) must be less than "
                f"NLPSERVE_DEFAULT_DEADLINE_MS ({self.default_deadline_ms}): requests would "
                "wait for batch mates past their deadline"
            )
        return self

    def cpu_oversubscription(self) -> str | None:
        """Why this process's CPU models would run more ORT threads at once than there are
        usable cores (ORT runs slower oversubscribed), or None."""
        cpus = usable_cpus()
        batches = self.inference_threads_for(CPU_PROVIDER)
        intra = self.intra_op_threads_for(CPU_PROVIDER) or cpus  # 0: ORT's, one per core
        if batches * intra <= cpus:
            return None
        return (
            f"{batches} inference thread(s) x {intra} ORT intra-op threads = {batches * intra} "
            f"threads per CPU model on {cpus} usable CPUs: oversubscribed, ORT runs slower "
            "(NLPSERVE_INFERENCE_THREADS, NLPSERVE_INTRA_OP_THREADS)"
        )

    @model_validator(mode="after")
    def _streams_hold_what_is_admitted(self) -> Settings:
        # Admission lets a model's streams hold max_queue_depth entries; a MAXLEN below that
        # would trim admitted work out of the stream, and its clients would wait to their
        # deadline for answers that never come.
        if self.redis_stream_maxlen < self.max_queue_depth:
            raise ValueError(
                f"NLPSERVE_REDIS_STREAM_MAXLEN ({self.redis_stream_maxlen}) must be at least "
                f"NLPSERVE_MAX_QUEUE_DEPTH ({self.max_queue_depth}): the stream would drop "
                "admitted work"
            )
        return self

    def inference_threads_for(self, provider: str | None = None) -> int:
        """Threads running batches for models on ``provider`` (see ``inference_threads``)."""
        if self.inference_threads is not None:
            return self.inference_threads
        return 1 if provider == "CUDAExecutionProvider" else usable_cpus()

    def intra_op_threads_for(self, provider: str | None = None) -> int:
        """ORT intra-op threads of a session on ``provider`` (see ``intra_op_threads``)."""
        if self.intra_op_threads is not None:
            return self.intra_op_threads
        if provider == "CUDAExecutionProvider":
            return 0
        return max(1, usable_cpus() // self.inference_threads_for(provider))

    def batch_policy(
        self, provider: str | None = None, token_cost_s: float | None = None
    ) -> BatchPolicy:
        """The batching rules for a model running on ``provider`` (its ORT provider) whose
        padded token costs ``token_cost_s`` seconds (measured at warm-up; None: unknown)."""
        cuda = provider == "CUDAExecutionProvider"
        tokens = self.max_batch_tokens
        if tokens is None:
            tokens = GPU_BATCH_TOKENS if cuda else CPU_BATCH_TOKENS
        wait_ms = self.max_wait_ms
        if wait_ms is None:
            wait_ms = CUDA_MAX_WAIT_MS if cuda else CPU_MAX_WAIT_MS
        floor = self.min_padding_efficiency
        if floor is None:
            floor = CUDA_MIN_PADDING_EFFICIENCY if cuda else CPU_MIN_PADDING_EFFICIENCY
            if token_cost_s is not None and token_cost_s < CHEAP_TOKEN_S:
                floor = 0.0
        return BatchPolicy(
            max_batch_size=self.max_batch_size,
            max_batch_tokens=tokens,
            max_wait_s=wait_ms / 1000.0,
            min_padding_efficiency=floor,
        )


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its affinity mask (a container's cpuset), capped by a CPU
    quota (``docker run --cpus 2``, a Kubernetes CPU limit), which leaves the affinity at
    every core of the host: a thread per host core would then fight over two cores' time."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def _cgroup_cpu_quota(root: Path) -> float | None:
    """CPUs' worth of time per period allowed by cgroup v2 ``cpu.max`` or v1 CFS files."""
    try:
        if (root / "cpu.max").is_file():  # v2: "<quota> <period>" or "max <period>"
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu"
        if (v1 / "cpu.cfs_quota_us").is_file():
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


# NLPSERVE_* names that are not settings but are read elsewhere: the container HEALTHCHECK
# (service/healthcheck.py), the CLI's traceback switch, the gateway's template
# (deploy/nginx/gateway.conf.template) and docker-compose.yml's own knobs. A compose file or
# shell that sets them for every container must not draw a warning.
NOT_SETTINGS = frozenset(
    {
        "NLPSERVE_HEALTH_URL",
        "NLPSERVE_TRACEBACK",
        "NLPSERVE_UPSTREAMS",
        "NLPSERVE_GRPC_UPSTREAMS",
        "NLPSERVE_GATEWAY_PORT",
        "NLPSERVE_GATEWAY_GRPC_PORT",
        "NLPSERVE_GATEWAY_PUBLISH",
        "NLPSERVE_GATEWAY_GRPC_PUBLISH",
        "NLPSERVE_RATE_LIMIT",
        "NLPSERVE_MAX_BODY",
        "NLPSERVE_CPU_WORKERS",
        "NLPSERVE_CPU_WORKER_MODELS",
        "NLPSERVE_GPU_WORKER_MODELS",
    }
)


def unknown_settings(environ: dict[str, str] | os._Environ[str]) -> list[str]:
    """A line for each ``NLPSERVE_*`` variable that no setting reads (a misspelt name is
    otherwise ignored without a word: ``NLPSERVE_MAX_BATCH_SIZ=8`` would serve with the
    default), naming the closest setting where one is close."""
    known = sorted(name.upper() for name in Settings.model_fields)
    lines = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings reads the variables case-insensitively
        if not upper.startswith("NLPSERVE_") or upper in NOT_SETTINGS:
            continue
        if (rest := upper.removeprefix("NLPSERVE_")) in known:
            continue
        # compared without the prefix every name shares (it made any name look close)
        close = difflib.get_close_matches(rest, known, n=1, cutoff=0.75)
        hint = f" (did you mean NLPSERVE_{close[0]}?)" if close else ""
        lines.append(f"{name} is not a setting and is ignored{hint}")
    return lines


@lru_cache
def get_settings() -> Settings:
    return Settings()
