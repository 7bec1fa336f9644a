"""Prometheus metrics of the service and of inference workers.

Every :class:`Metrics` owns its own :class:`CollectorRegistry` (not the global default), so
several apps in one test process, or an API and a worker, never share or clash on series.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.openmetrics import exposition as openmetrics

from service.loop_lag import INTERVAL_S, WINDOW_S

# The *_created series double the exposition size and nothing here reads them.
disable_created_metrics()

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A request may wait up to its deadline (NLPSERVE_DEFAULT_DEADLINE_MS: 30 s): under overload
# its latency is in the tens of seconds, which a histogram ending at 10 s would report as 10.
_REQUEST_BUCKETS = (*_LATENCY_BUCKETS, 20.0, 30.0, 60.0)
# A request's stages: tokenizing a text and an LSTM's batch take tens to hundreds of µs,
# which a first bucket at 1 ms would lump together (every quantile read ~1 ms).
_STAGE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, *_REQUEST_BUCKETS)
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_EFFICIENCY_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)
# An idle loop wakes within about 1 ms; past 5 s the process is hung rather than busy.
_LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Probabilities: a binary classifier's top class is at least 0.5, where drift shows (0.99 ->
# 0.7); a QA span's probability over all candidate spans spreads over the whole range.
_CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# Tokens per item: the models' max lengths are 64 to 512; a QA context may be thousands.
_INPUT_TOKEN_BUCKETS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    """All nlpserve series. Methods are thread-safe (runners record from executor threads)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._workers_alive: Gauge | None = None
        self._model_workers_alive: Gauge | None = None
        self._monitors: dict[str, PredictionMonitor] = {}
        r = self.registry
        # priority: interactive or batch (X-Priority, the client's priority= in the keys
        # file), as the request runs: batch work waits for interactive work by design, and
        # its seconds would blur the interactive latency operators alert on.
        self.requests = Counter(
            "nlpserve_requests_total",
            "HTTP requests by model, endpoint (predict or explain), HTTP status and priority "
            "class (interactive or batch).",
            ["model", "endpoint", "status", "priority"],
            registry=r,
        )
        self.request_duration = Histogram(
            "nlpserve_request_duration_seconds",
            "Request latency (HTTP in to HTTP out); explanations are their own endpoint label "
            "and batch-priority requests their own priority label, so their seconds never "
            "blur interactive prediction latency.",
            ["model", "endpoint", "status", "priority"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "nlpserve_queue_depth",
            "Sequences queued per model and length bucket, what NLPSERVE_MAX_QUEUE_DEPTH "
            "bounds (in-process: waiting, not yet running; Redis mode: in the streams, those "
            "a worker holds until it answers included).",
            ["model", "bucket"],
            registry=r,
        )
        # Per lane, apart (a label on nlpserve_queue_depth would split its existing series):
        # a batch client's backlog (lane=batch) is not interactive clients' (lane=predict).
        self.queue_lane_depth = Gauge(
            "nlpserve_queue_lane_depth",
            "The sequences of nlpserve_queue_depth per model and lane, in priority order: "
            "predict (interactive), batch (X-Priority: batch), explain.",
            ["model", "lane"],
            registry=r,
        )
        self.lanes_seen: set[tuple[str, str]] = set()  # (model, lane) series made
        self.batch_size = Histogram(
            "nlpserve_batch_size",
            "Sequences per inference batch.",
            ["model", "bucket"],
            buckets=_BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.padding_efficiency = Histogram(
            "nlpserve_padding_efficiency",
            "Per batch: real tokens / padded tokens (1.0 = no padding).",
            ["model"],
            buckets=_EFFICIENCY_BUCKETS,
            registry=r,
        )
        # Token counters give the exact traffic-weighted efficiency: real / padded. `longest`
        # leaves out the CUDA shape grid's rounding: real / longest is how well traffic fits
        # the buckets (what an operator tunes), real / padded what the device computed.
        self.batch_tokens = Counter(
            "nlpserve_batch_tokens_total",
            "Tokens run through the model: kind=real (unpadded), padded (rows x padded length "
            "as run, CUDA shape grid included) or longest (batch size x longest sequence).",
            ["model", "kind"],
            registry=r,
        )
        self.inference_duration = Histogram(
            "nlpserve_inference_duration_seconds",
            "ONNX Runtime time per batch (padding and splitting included).",
            ["model", "bucket"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # priority as on the request metrics: a batch request's queue stage is the wait for
        # interactive work (by design), which would blur the interactive one; its series are
        # made only once batch work is answered (at most twice the model x stage series).
        self.request_stage = Histogram(
            "nlpserve_request_stage_seconds",
            "Where each answered prediction's time went in the server, as its Server-Timing "
            "header says: stage=tokenize (in the API process), queue (waiting for a batch and "
            "a free thread; in Redis mode also the trip through Redis and the worker), "
            "inference (the ONNX Runtime run of its batch); priority: interactive or batch.",
            ["model", "stage", "priority"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "nlpserve_rejected_total",
            "Requests answered with an error, by model and reason (the error code).",
            ["model", "reason"],
            registry=r,
        )
        self.provider_fallback = Counter(
            "nlpserve_provider_fallback_total",
            "Models that could not run on the requested provider and fell back (to CPU).",
            ["model", "requested", "actual"],
            registry=r,
        )
        self.model_info = Gauge(
            "nlpserve_model_info",
            "Loaded models (value 1) with the provider and variant they actually run on.",
            ["model", "version", "provider", "variant"],
            registry=r,
        )
        # What the models answer and read (drift), recorded where a prediction is answered:
        # the API process in both queue modes (PredictionMonitor).
        self.predictions = Counter(
            "nlpserve_predictions_total",
            "Prediction items answered, by predicted label (classifiers: the model's labels; "
            "QA: answer or no_answer), response cache hits included.",
            ["model", "label"],
            registry=r,
        )
        self.prediction_confidence = Histogram(
            "nlpserve_prediction_confidence",
            "Per answered item: the predicted label's probability (detect, polarity: two-label "
            "models with a machine, resp. positive label) or the answer span's probability among "
            "all candidate spans (QA; no_answer items not observed).",
            ["model"],
            buckets=_CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.input_tokens = Histogram(
            "nlpserve_input_tokens",
            "Per item the model read (response cache hits are not tokenized): its tokens as "
            "tokenized (QA: question + context, before any cut; detect and polarity: as read, "
            "at most the model's max length).",
            ["model"],
            buckets=_INPUT_TOKEN_BUCKETS,
            registry=r,
        )
        self.input_truncated = Counter(
            "nlpserve_input_truncated_total",
            "Items the model read cut short: detect and polarity texts over the model's max "
            "length (truncated: true), QA questions over max_query_length.",
            ["model"],
            registry=r,
        )
        # Fed by service/loop_lag.py, which the API's lifespan and the worker run.
        self.loop_lag = Histogram(
            "nlpserve_event_loop_lag_seconds",
            f"How late this process's event loop woke from a {INTERVAL_S}-s sleep: what a "
            "request waits for the loop before any handler starts (CPU-bound work in the "
            "process), which no request latency histogram sees.",
            buckets=_LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.loop_lag_max = Gauge(
            "nlpserve_event_loop_lag_max_seconds",
            f"The largest event-loop lag of the last {WINDOW_S:.0f} s (or the current one, "
            "while the loop is late right now).",
            registry=r,
        )

    # ------------------------------------------------------------------ recording helpers
    def workers_alive(self) -> Gauge:
        """Redis mode's count of live workers: created on first use, so a server with the
        in-process queue exports no such series (a 0 there would read as "no workers")."""
        if self._workers_alive is None:
            self._workers_alive = Gauge(
                "nlpserve_workers_alive",
                "Inference workers that beat within the last minute (Redis mode, P:workers).",
                registry=self.registry,
            )
        return self._workers_alive

    def model_workers_alive(self) -> Gauge:
        """Per model: live workers that serve the layout (version, bucket edges) this replica
        enqueues for (Redis mode; created on first use like :meth:`workers_alive`)."""
        if self._model_workers_alive is None:
            self._model_workers_alive = Gauge(
                "nlpserve_model_workers_alive",
                "Inference workers that beat within the last minute and serve the model "
                "version (and bucket edges) this replica loaded (Redis mode; 0: requests wait).",
                ["model", "version"],
                registry=self.registry,
            )
        return self._model_workers_alive

    def clock_offset(self, read: Callable[[], float]) -> None:
        """Redis mode: how far the Redis server's clock is from this host's wall clock, read
        at each scrape (created on first use like :meth:`workers_alive`)."""
        Gauge(
            "nlpserve_clock_offset_seconds",
            "Seconds the Redis server's clock is ahead of this host's wall clock (negative: "
            "behind), from TIME round trips. Times that cross hosts are on Redis' clock, so "
            "serving does not depend on it; far from 0, this host's NTP is broken.",
            registry=self.registry,
        ).set_function(read)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: ``labels()`` validates and takes a lock
        on every call (~2.5 µs per request for the two request series). Every label here is
        bounded (models, endpoints, statuses, buckets, error codes), so the cache is too."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def set_lane_depth(self, model: str, lane: str, n: int) -> None:
        """``nlpserve_queue_lane_depth{model,lane}`` = n, the series made only once the lane
        has had work: a model without explanations (a server without batch clients) shows no
        ``explain`` (``batch``) series."""
        if n or (model, lane) in self.lanes_seen:
            self.lanes_seen.add((model, lane))
            self.child(self.queue_lane_depth, model, lane).set(n)

    def forget(self, metric: Any, *labels: str) -> None:
        """Drop ``metric``'s series of ``labels`` (a client gone from the keys file), from the
        exposition and from :meth:`child`'s cache: a cached child would outlive the removal
        and never reach the exposition again if the labels came back."""
        self._children.pop((id(metric), labels), None)
        with contextlib.suppress(KeyError):  # never recorded
            metric.remove(*labels)

    def observe_batch(
        self,
        model: str,
        bucket: int,
        size: int,
        real_tokens: int,
        padded_tokens: int,
        secs: float,
        longest_tokens: int | None = None,
    ) -> None:
        """``longest_tokens``: size x longest sequence (default ``padded_tokens``: no grid)."""
        b = str(bucket)
        self.child(self.batch_size, model, b).observe(size)
        self.child(self.inference_duration, model, b).observe(secs)
        self.child(self.padding_efficiency, model).observe(real_tokens / max(padded_tokens, 1))
        self.child(self.batch_tokens, model, "real").inc(real_tokens)
        self.child(self.batch_tokens, model, "padded").inc(padded_tokens)
        longest = padded_tokens if longest_tokens is None else longest_tokens
        self.child(self.batch_tokens, model, "longest").inc(longest)

    def observe_request(
        self,
        model: str,
        endpoint: str,
        status: int,
        secs: float,
        trace_id: str | None = None,
        *,
        priority: str,
    ) -> None:
        """``trace_id``: a sampled request's, its latency's exemplar (OpenMetrics exposition:
        a slow bucket links to the trace). Only those: a trace nobody recorded links nowhere,
        and the exemplar costs a few µs (docs/deploy.md, "Tracing"). ``priority``: the
        request's class, ``interactive`` or ``batch`` (service.api.deps.priority_class)."""
        s = str(status)
        self.child(self.requests, model, endpoint, s, priority).inc()
        duration = self.child(self.request_duration, model, endpoint, s, priority)
        if trace_id is None:
            duration.observe(secs)
        else:
            duration.observe(secs, {"trace_id": trace_id})

    def monitor(self, model: str, outcomes: Sequence[str]) -> PredictionMonitor:
        """``model``'s prediction and input series, bound once (``outcomes``: its
        prediction labels; a model's are fixed for the process's life)."""
        m = self._monitors.get(model)
        if m is None:
            m = self._monitors[model] = PredictionMonitor(self, model, outcomes)
        return m

    def observe_stages(self, model: str, timing: dict[str, float], *, priority: str) -> None:
        """A prediction's ``timing`` (run_requests': stage -> seconds); ``priority``: its
        class, as :meth:`observe_request`'s."""
        for stage, secs in timing.items():
            self.child(self.request_stage, model, stage, priority).observe(secs)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """A scrape's body and content type: OpenMetrics (exemplars included) when ``accept``
        (its Accept header) names it, as Prometheus' scrapes do, else the classic text
        format (which has no exemplars)."""
        if accept and wants_openmetrics(accept):
            return openmetrics.generate_latest(self.registry), openmetrics.CONTENT_TYPE_LATEST
        return self.render(), self.content_type


class Answer(Protocol):
    """What :class:`PredictionMonitor` reads of one task (service/tasks)."""

    def outcome(self, result: Any) -> tuple[str, float | None]: ...


class Read(Protocol):
    """What :class:`PredictionMonitor` reads of one prepared item (tasks.base.Prepared)."""

    tokens: int
    truncated: bool


class PredictionMonitor:
    """One model's prediction and input series with their children bound up front: per item
    a dict hit on the label (a bounded set: the model's own) and 2-3 observations, no
    ``labels()`` call (its validation and lock cost ~1 µs each)."""

    def __init__(self, metrics: Metrics, model: str, outcomes: Sequence[str]) -> None:
        self._label = {o: metrics.child(metrics.predictions, model, o) for o in outcomes}
        # a model without predictions to count (pos) exports no empty confidence series
        if outcomes:
            self._confidence = metrics.child(metrics.prediction_confidence, model).observe
        self._tokens = metrics.child(metrics.input_tokens, model).observe
        self._truncated = metrics.child(metrics.input_truncated, model)

    def read(self, prepared: Iterable[Read]) -> None:
        """Items tokenized and answered by the model (not cache hits: never tokenized)."""
        observe = self._tokens
        cut = 0
        for p in prepared:
            observe(p.tokens)
            cut += p.truncated
        if cut:
            self._truncated.inc(cut)

    def answered(self, task: Answer, results: Iterable[Any]) -> None:
        """Every item a client gets an answer for (response cache hits included), once."""
        if not self._label:  # a task without predictions to count (pos)
            return
        outcome = task.outcome
        label = self._label
        confidence = self._confidence
        for r in results:
            name, p = outcome(r)
            label[name].inc()
            if p is not None:
                confidence(p)


def wants_openmetrics(accept: str) -> bool:
    """Whether ``accept`` names OpenMetrics with a weight above 0 (``q=0``: "not this")."""
    for media_range in accept.split(","):
        kind, *params = (p.strip().lower() for p in media_range.split(";"))
        if kind != "application/openmetrics-text":
            continue
        q = next((v for k, _, v in (p.partition("=") for p in params) if k.strip() == "q"), "1")
        try:
            if float(q) > 0:
                return True
        except ValueError:  # a malformed weight: RFC 9110 allows none, read as refused
            continue
    return False


class WorkerMetrics:
    """The series only an inference worker has (Redis mode), in the worker's registry next to
    the batch series of :class:`Metrics`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        in_hand: Callable[[], int],
        connected: Callable[[], bool],
    ) -> None:
        r = registry
        self.reclaimed = Counter(
            "nlpserve_worker_reclaimed_total",
            "Entries this worker took over from dead or stalled workers (XCLAIM).",
            ["model"],
            registry=r,
        )
        self.maintenance_delay = Histogram(
            "nlpserve_worker_maintenance_delay_seconds",
            "How late each keepalive/reclaim pass ran against its schedule (event loop stalls, "
            "CPU starvation, slow Redis). Past about 2/3 of NLPSERVE_REDIS_CLAIM_IDLE_MS, other "
            "workers take this worker's entries over and redo them.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.dead_lettered = Counter(
            "nlpserve_worker_dead_lettered_total",
            "Entries moved to the dead-letter stream; reason=failed|redelivered|malformed.",
            ["model", "reason"],
            registry=r,
        )
        self.expired = Counter(
            "nlpserve_worker_expired_total",
            "Entries skipped because their request deadline had passed.",
            ["model"],
            registry=r,
        )
        self.cancelled = Counter(
            "nlpserve_worker_cancelled_total",
            "Entries dropped before running because their request gave up (client gone).",
            ["model"],
            registry=r,
        )
        self.replies = Counter(
            "nlpserve_worker_replies_total",
            "Replies published, by status (ok, failed).",
            ["model", "status"],
            registry=r,
        )
        self.stream_lag = Gauge(
            "nlpserve_worker_stream_lag_entries",
            "Entries in a work stream not yet read by any worker.",
            ["model", "version", "bucket", "lane"],
            registry=r,
        )
        self.stream_pending = Gauge(
            "nlpserve_worker_stream_pending_entries",
            "Entries read by some worker but not yet acknowledged.",
            ["model", "version", "bucket", "lane"],
            registry=r,
        )
        in_hand_gauge = Gauge(
            "nlpserve_worker_in_hand_entries",
            "Entries this worker holds (read, not yet answered).",
            registry=r,
        )
        in_hand_gauge.set_function(lambda: float(in_hand()))
        connected_gauge = Gauge(
            "nlpserve_worker_redis_connected", "1 while Redis answers this worker.", registry=r
        )
        connected_gauge.set_function(lambda: 1.0 if connected() else 0.0)
