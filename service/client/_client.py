"""The clients: :class:`Client` (blocking, ``httpx.Client``) and :class:`AsyncClient`
(``httpx.AsyncClient``), one method per endpoint of ``/v1`` and the probes. What a call
sends and how it retries is in :mod:`service.client._calls`, shared by both."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TypeVar, Unpack

import httpx

from service.client import _calls as calls
from service.client._calls import (
    API_KEY_HEADER,
    DEADLINE_GRACE_S,
    USER_AGENT,
    Attempts,
    Call,
    CallOptions,
    ClientOptions,
    Learned,
    Retry,
    Split,
)
from service.client.errors import ClientError, NlpserveError, ServerError
from service.client.retry import RetryPolicy
from service.client.types import (
    DetectResult,
    Explanation,
    Health,
    ModelInfo,
    Models,
    PolarityResult,
    PosResult,
    QAResult,
    Ready,
)

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 (an input item)
R = TypeVar("R")

# The service's default deadline (NLPSERVE_DEFAULT_DEADLINE_MS, 30 s) and the grace a call's own
# deadline gets: a request the server ends at its deadline is its 504, not a timeout here
# (which would be a TransportError, and retried).
DEFAULT_TIMEOUT_S = 30.0 + DEADLINE_GRACE_S
# The *_many calls' requests at once (their concurrency).
DEFAULT_CONCURRENCY = 4


class _Options:
    """What both clients are configured with."""

    def __init__(self, base_url: str, **kw: Unpack[ClientOptions]) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = kw.get("timeout", DEFAULT_TIMEOUT_S)
        self.retry = kw.get("retry") or RetryPolicy()
        self.priority = kw.get("priority")
        self.deadline_ms = kw.get("deadline_ms")
        self.headers = {"User-Agent": USER_AGENT, **(kw.get("headers") or {})}
        if (api_key := kw.get("api_key")) is not None:
            self.headers[API_KEY_HEADER] = api_key
        # *_many: the batch limit the server announces (read once), and what refusals taught
        # (a 422 too_many_items of the client's own limits), shared by every call under the
        # client's lock
        self._learned = Learned()

    def _plan(
        self,
        make: Callable[[Sequence[I]], Call[list[R]]],
        items: Sequence[I],
        chunk_size: int | None,
    ) -> Split[R]:
        return Split(len(items), self._learned, make(items[:1]).path, chunk_size)

    def _attempts(self, call: Call[T], opts: CallOptions) -> Attempts[T]:
        return Attempts(
            call,
            self.retry,
            self.timeout,
            opts.get("deadline_ms", self.deadline_ms),
            opts.get("priority", self.priority),
            opts.get("request_id"),
        )


class Client(_Options):
    """A blocking client of the nlpserve REST API, over one ``httpx.Client`` (its connections
    are kept and reused; close it, or use it as a context manager).

    ``api_key`` is sent as ``X-API-Key``; ``timeout`` bounds each attempt (seconds);
    ``retry`` says how failed attempts are repeated (:class:`RetryPolicy`: by default 2
    retries on no answer, 429, 502 and 503, honouring ``Retry-After``); ``priority``
    (``X-Priority``: ``interactive`` or ``batch``) and ``deadline_ms`` (``X-Deadline-Ms``, and
    the whole call's time, retries included) are the defaults of every call, which each
    method's keyword arguments ``request_id``, ``deadline_ms`` and ``priority`` override.
    ``model`` picks one of several models of a task (``?model=``; the server serves one
    version of each). Errors raise :class:`~service.client.NlpserveError` subclasses."""

    def __init__(self, base_url: str, **kw: Unpack[ClientOptions]) -> None:
        super().__init__(base_url, **kw)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers)
        # every *_many call's plan, in any thread, reads and changes what the client learned
        # under this lock; a request's end wakes the threads of every call (the client's
        # in-flight limit counts them all)
        self._room = threading.Condition()
        self._reading = threading.Lock()  # the announced limit: one read, whatever the threads

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call[T], opts: CallOptions) -> T:
        run = self._attempts(call, opts)
        while True:
            try:
                r = self._http.request(**run.request())
            except httpx.TransportError as e:
                wait = run.no_answer(e)
            except httpx.DecodingError as e:
                raise run.unreadable(e) from e
            else:
                if not isinstance(got := run.answered(r), Retry):
                    return got
                wait = got.wait_s
            time.sleep(wait)

    def _read_limits(self) -> None:
        with self._reading:
            if self._learned.announced is None:
                limits: int | dict[str, int] | None = self._announced(calls.batch_limit())
                if limits is None:  # a server older than /v1/models' batch: its document
                    limits = self._announced(calls.openapi()) or {}
                with self._room:
                    self._learned.announced = limits

    def _announced(self, call: Call[T]) -> T | None:
        try:
            return self._send(call, {})
        except (ClientError, ServerError):  # none (or none readable): refusals teach
            return None

    def _many(
        self,
        make: Callable[[Sequence[I]], Call[list[R]]],
        items: Sequence[I],
        chunk_size: int | None,
        concurrency: int,
        opts: CallOptions,
    ) -> list[R]:
        if concurrency < 1:
            raise ValueError(f"concurrency must be 1 or more, not {concurrency}")
        if not items:
            return []
        self._read_limits()
        room = self._room
        with room:
            plan = self._plan(make, items, chunk_size)

        def worker() -> None:
            while True:
                with room:
                    try:
                        room.wait_for(plan.fits)
                    except BaseException:  # an interrupt: its turn goes to the next call
                        plan.leave()
                        room.notify_all()
                        raise
                    if (chunk := plan.begin()) is None:
                        room.notify_all()  # out of the calls waiting: the next one's turn
                        return
                outcome: list[R] | NlpserveError
                try:
                    call = make(items[chunk.start : chunk.stop])
                    outcome = self._send(call, plan.chunk_options(opts, chunk))
                except NlpserveError as e:
                    outcome = e
                except BaseException:  # the others start nothing more; this one raises it
                    with room:
                        plan.stop(chunk)
                        room.notify_all()
                    raise
                with room:
                    plan.end(chunk, outcome)
                    room.notify_all()

        if concurrency == 1:
            worker()
            return plan.result()
        # httpx.Client is thread-safe: the threads share its connections. The calling thread
        # is one of the workers (an interrupt lands there, and stops the others' next start).
        with ThreadPoolExecutor(concurrency - 1, thread_name_prefix="nlpserve-many") as pool:
            others = [pool.submit(worker) for _ in range(concurrency - 1)]
            worker()
            for other in others:
                other.result()
        return plan.result()

    # ------------------------------------------------------------------ predictions
    def pos(
        self,
        text: str | None = None,
        *,
        tokens: Sequence[str] | None = None,
        scores: bool = False,
        model: str | None = None,
        **opts: Unpack[CallOptions],
    ) -> PosResult:
        """Part-of-speech tags of ``text``, or of pre-split ``tokens``; ``scores``: each tag's
        probability too (the result's ``scores``)."""
        return self._send(calls.pos(text, tokens, model, scores), opts)

    def pos_batch(
        self,
        items: Sequence[str | Sequence[str]],
        *,
        scores: bool = False,
        model: str | None = None,
        **opts: Unpack[CallOptions],
    ) -> list[PosResult]:
        """One request of several items (a text, or a list of tokens, each)."""
        return self._send(calls.pos_batch(items, model, scores), opts)

    def polarity(
        self, text: str, *, model: str | None = None, **opts: Unpack[CallOptions]
    ) -> PolarityResult:
        return self._send(calls.polarity(text, model), opts)

    def polarity_batch(
        self, texts: Sequence[str], *, model: str | None = None, **opts: Unpack[CallOptions]
    ) -> list[PolarityResult]:
        return self._send(calls.polarity_batch(texts, model), opts)

    def detect(
        self,
        text: str,
        *,
        windows: bool = False,
        model: str | None = None,
        **opts: Unpack[CallOptions],
    ) -> DetectResult:
        """``windows``: read the whole text, in windows of the model's max length, not its
        head; the result's ``windows`` lists each one's answer."""
        return self._send(calls.detect(text, model, windows), opts)

    def detect_batch(
        self,
        texts: Sequence[str],
        *,
        windows: bool = False,
        model: str | None = None,
        **opts: Unpack[CallOptions],
    ) -> list[DetectResult]:
        return self._send(calls.detect_batch(texts, model, windows), opts)

    def qa(
        self,
        question: str,
        context: str,
        *,
        top_k: int | None = None,
        max_answer_length: int | None = None,
        model: str | None = None,
        **opts: Unpack[CallOptions],
    ) -> QAResult:
        """The best answer; ``top_k``: also ``answers``, the ``top_k`` best distinct spans;
        ``max_answer_length``: longest answer in model tokens (default: the model's)."""
        call = calls.qa(question, context, model, top_k, max_answer_length)
        return self._send(call, opts)

    def qa_batch(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        top_k: int | None = None,
        max_answer_length: int | None = None,
        model: str | None = None,
        **opts: Unpack[CallOptions],
    ) -> list[QAResult]:
        """One request of several ``(question, context)`` pairs (``top_k`` and
        ``max_answer_length`` as :meth:`qa`'s, for each)."""
        call = calls.qa_batch(pairs, model, top_k, max_answer_length)
        return self._send(call, opts)

    # ------------------------------------------------------------------ any number of items
    def pos_many(
        self,
        items: Sequence[str | Sequence[str]],
        *,
        scores: bool = False,
        model: str | None = None,
        chunk_size: int | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        **opts: Unpack[CallOptions],
    ) -> list[PosResult]:
        """``pos_batch`` of any number of items (:meth:`polarity_many` says how)."""
        make = lambda c: calls.pos_batch(c, model, scores)  # noqa: E731
        return self._many(make, items, chunk_size, concurrency, opts)

    def polarity_many(
        self,
        texts: Sequence[str],
        *,
        model: str | None = None,
        chunk_size: int | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        **opts: Unpack[CallOptions],
    ) -> list[PolarityResult]:
        """Any number of texts, in requests of as many as the server accepts (``GET
        /v1/models``' ``batch.max_items``, an older server's OpenAPI ``maxItems``, or
        ``chunk_size`` if less; a request refused 422
        ``too_many_items`` is cut to the limit the answer names, its ``limit`` (an older
        server's message), else halved, as one refused 413 or 422 ``input_too_long`` over
        ``max_request_sequences``, model sequences its texts make), at most ``concurrency`` at
        once (and, once a 422 named the client's in-flight limit, no more items at once than
        it, counting every call of the client's at once: what one learns, all share); the
        results in input order. A request that fails otherwise stops the call (no
        request starts after it; those under way end): :class:`~service.client.IncompleteBatch`,
        with the results so far. ``request_id`` names each request ``<id>.<first>-<last>``
        item. The blocking client sends its requests from a pool of ``concurrency - 1``
        threads and the calling one, over its one ``httpx.Client``."""
        make = lambda c: calls.polarity_batch(c, model)  # noqa: E731
        return self._many(make, texts, chunk_size, concurrency, opts)

    def detect_many(
        self,
        texts: Sequence[str],
        *,
        windows: bool = False,
        model: str | None = None,
        chunk_size: int | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        **opts: Unpack[CallOptions],
    ) -> list[DetectResult]:
        """``detect_batch`` of any number of texts (:meth:`polarity_many` says how)."""
        make = lambda c: calls.detect_batch(c, model, windows)  # noqa: E731
        return self._many(make, texts, chunk_size, concurrency, opts)

    def qa_many(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        top_k: int | None = None,
        max_answer_length: int | None = None,
        model: str | None = None,
        chunk_size: int | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        **opts: Unpack[CallOptions],
    ) -> list[QAResult]:
        """``qa_batch`` of any number of pairs (:meth:`polarity_many` says how)."""
        make = lambda c: calls.qa_batch(c, model, top_k, max_answer_length)  # noqa: E731
        return self._many(make, pairs, chunk_size, concurrency, opts)

    # ------------------------------------------------------------------ explanations
    def explain_detect(
        self,
        text: str,
        *,
        max_evals: int | None = None,
        model: str | None = None,
        **opts: Unpack[CallOptions],
    ) -> Explanation:
        """SHAP values of each token for P(machine) (docs/explain.md)."""
        return self._send(calls.explain("detect", text, max_evals, model), opts)

    def explain_polarity(
        self,
        text: str,
        *,
        max_evals: int | None = None,
        model: str | None = None,
        **opts: Unpack[CallOptions],
    ) -> Explanation:
        """SHAP values of each token for P(positive) (docs/explain.md)."""
        return self._send(calls.explain("polarity", text, max_evals, model), opts)

    # ------------------------------------------------------------------ operations
    def models(self, **opts: Unpack[CallOptions]) -> Models:
        return self._send(calls.models(), opts)

    def model(self, name: str, **opts: Unpack[CallOptions]) -> ModelInfo:
        return self._send(calls.model_info(name), opts)

    def healthz(self, **opts: Unpack[CallOptions]) -> Health:
        """Liveness; one attempt (a probe reports on now)."""
        return self._send(calls.healthz(), opts)

    def readyz(self, **opts: Unpack[CallOptions]) -> Ready:
        """Readiness; one attempt. Not ready is a 503: :class:`RetriesExhausted` whose
        ``code`` says why (``not_ready``, ``no_models``, ``queue_unavailable``...)."""
        return self._send(calls.readyz(), opts)


class AsyncClient(_Options):
    """:class:`Client` for asyncio, over one ``httpx.AsyncClient``: the same arguments and
    methods, awaited; close it with ``await client.aclose()`` or ``async with``."""

    def __init__(self, base_url: str, **kw: Unpack[ClientOptions]) -> None:
        super().__init__(base_url, **kw)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers)
        # as Client's: every call's tasks wait on one condition (the client's in-flight limit
        # counts them all), and the announced limit is read once however many calls start
        self._room = asyncio.Condition()
        self._reading = asyncio.Lock()
        self._waking: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call[T], opts: CallOptions) -> T:
        run = self._attempts(call, opts)
        while True:
            try:
                r = await self._http.request(**run.request())
            except httpx.TransportError as e:
                wait = run.no_answer(e)
            except httpx.DecodingError as e:
                raise run.unreadable(e) from e
            else:
                if not isinstance(got := run.answered(r), Retry):
                    return got
                wait = got.wait_s
            await asyncio.sleep(wait)

    async def _read_limits(self) -> None:
        async with self._reading:
            if self._learned.announced is None:
                limits: int | dict[str, int] | None = await self._announced(calls.batch_limit())
                if limits is None:  # a server older than /v1/models' batch: its document
                    limits = await self._announced(calls.openapi()) or {}
                self._learned.announced = limits

    async def _wake(self) -> None:
        """Wake every call's workers waiting for room (a request ended). Shielded: a
        cancellation waiting for the lock would leave them waiting for a change they missed."""
        waking = asyncio.get_running_loop().create_task(self._notify())
        self._waking.add(waking)  # held until done: the loop keeps only a weak reference
        waking.add_done_callback(self._waking.discard)
        await asyncio.shield(waking)

    async def _notify(self) -> None:
        async with self._room:
            self._room.notify_all()

    async def _announced(self, call: Call[T]) -> T | None:
        try:
            return await self._send(call, {})
        except (ClientError, ServerError):  # none (or none readable): refusals teach
            return None

    async def _many(
        self,
        make: Callable[[Sequence[I]], Call[list[R]]],
        items: Sequence[I],
        chunk_size: int | None,
        concurrency: int,
        opts: CallOptions,
    ) -> list[R]:
        if concurrency < 1:
            raise ValueError(f"concurrency must be 1 or more, not {concurrency}")
        if not items:
            return []
        await self._read_limits()
        room = self._room
        plan = self._plan(make, items, chunk_size)  # no await: no other task between

        async def worker() -> None:
            while True:
                async with room:
                    try:
                        await room.wait_for(plan.fits)
                    except BaseException:  # cancelled: its turn goes to the next call
                        plan.leave()
                        room.notify_all()
                        raise
                    if (chunk := plan.begin()) is None:
                        room.notify_all()  # out of the calls waiting: the next one's turn
                        return
                outcome: list[R] | NlpserveError
                try:
                    call = make(items[chunk.start : chunk.stop])
                    outcome = await self._send(call, plan.chunk_options(opts, chunk))
                except NlpserveError as e:
                    outcome = e
                except BaseException:
                    # a cancellation, or the caller's exception (the TaskGroup then cancels the
                    # other workers and raises it): its items leave the client's count in flight,
                    # which other calls wait on
                    plan.stop(chunk)
                    await self._wake()
                    raise
                # No await since the answer (one task at a time: the lock is not needed to
                # count): the items leave the count even if this task is cancelled waiting
                # for the lock, which the woken waiters of every call take in turn.
                plan.end(chunk, outcome)
                await self._wake()

        async with asyncio.TaskGroup() as workers:
            for _ in range(concurrency):
                workers.create_task(worker())
        return plan.result()

    # ------------------------------------------------------------------ predictions
    async def pos(
        self,
        text: str | None = None,
        *,
        tokens: Sequence[str] | None = None,
        scores: bool = False,
        model: str | None = None,
        **opts: Unpack[CallOptions],
    ) -> PosResult:
        """Part-of-speech tags of ``text``, or of pre-split ``tokens``; ``scores``: each tag's
        probability too (the result's ``scores``)."""
        return await self._send(calls.pos(text, tokens, model, scores), opts)

    async def pos_batch(
        self,
        items: Sequence[str | Sequence[str]],
        *,
        scores: bool = False,
        model: str | None = None,
        **opts: Unpack[CallOptions],
    ) -> list[PosResult]:
        """One request of several items (a text, or a list of tokens, each)."""
        return await self._send(calls.pos_batch(items, model, scores), opts)

    async def polarity(
        self, text: str, *, model: str | None = None, **opts: Unpack[CallOptions]
    ) -> PolarityResult:
        return await self._send(calls.polarity(text, model), opts)

    async def polarity_batch(
        self, texts: Sequence[str], *, model: str | None = None, **opts: Unpack[CallOptions]
    ) -> list[PolarityResult]:
        return await self._send(calls.polarity_batch(texts, model), opts)

    async def detect(
        self,
        text: str,
        *,
        windows: bool = False,
        model: str | None = None,
        **opts: Unpack[CallOptions],
    ) -> DetectResult:
        """``windows``: read the whole text, in windows of the model's max length, not its
        head; the result's ``windows`` lists each one's answer."""
        return await self._send(calls.detect(text, model, windows), opts)

    async def detect_batch(
        self,
        texts: Sequence[str],
        *,
        windows: bool = False,
        model: str | None = None,
        **opts: Unpack[CallOptions],
    ) -> list[DetectResult]:
        return await self._send(calls.detect_batch(texts, model, windows), opts)

    async def qa(
        self,
        question: str,
        context: str,
        *,
        top_k: int | None = None,
        max_answer_length: int | None = None,
        model: str | None = None,
        **opts: Unpack[CallOptions],
    ) -> QAResult:
        """The best answer; ``top_k``: also ``answers``, the ``top_k`` best distinct spans;
        ``max_answer_length``: longest answer in model tokens (default: the model's)."""
        call = calls.qa(question, context, model, top_k, max_answer_length)
        return await self._send(call, opts)

    async def qa_batch(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        top_k: int | None = None,
        max_answer_length: int | None = None,
        model: str | None = None,
        **opts: Unpack[CallOptions],
    ) -> list[QAResult]:
        """One request of several ``(question, context)`` pairs (``top_k`` and
        ``max_answer_length`` as :meth:`qa`'s, for each)."""
        call = calls.qa_batch(pairs, model, top_k, max_answer_length)
        return await self._send(call, opts)

    # ------------------------------------------------------------------ any number of items
    async def pos_many(
        self,
        items: Sequence[str | Sequence[str]],
        *,
        scores: bool = False,
        model: str | None = None,
        chunk_size: int | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        **opts: Unpack[CallOptions],
    ) -> list[PosResult]:
        """``pos_batch`` of any number of items (:meth:`polarity_many` says how)."""
        make = lambda c: calls.pos_batch(c, model, scores)  # noqa: E731
        return await self._many(make, items, chunk_size, concurrency, opts)

    async def polarity_many(
        self,
        texts: Sequence[str],
        *,
        model: str | None = None,
        chunk_size: int | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        **opts: Unpack[CallOptions],
    ) -> list[PolarityResult]:
        """Any number of texts, in requests of as many as the server accepts (``GET
        /v1/models``' ``batch.max_items``, an older server's OpenAPI ``maxItems``, or
        ``chunk_size`` if less; a request refused 422
        ``too_many_items`` is cut to the limit the answer names, its ``limit`` (an older
        server's message), else halved, as one refused 413 or 422 ``input_too_long`` over
        ``max_request_sequences``, model sequences its texts make), at most ``concurrency`` at once
        (and, once a 422 named the client's in-flight limit, no more items at once than it,
        counting every call of the client's at once: what one learns, all share); the results
        in input order. A request that fails otherwise stops the call (no
        request starts after it; those under way end): :class:`~service.client.IncompleteBatch`,
        with the results so far. ``request_id`` names each request ``<id>.<first>-<last>``
        item."""
        make = lambda c: calls.polarity_batch(c, model)  # noqa: E731
        return await self._many(make, texts, chunk_size, concurrency, opts)

    async def detect_many(
        self,
        texts: Sequence[str],
        *,
        windows: bool = False,
        model: str | None = None,
        chunk_size: int | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        **opts: Unpack[CallOptions],
    ) -> list[DetectResult]:
        """``detect_batch`` of any number of texts (:meth:`polarity_many` says how)."""
        make = lambda c: calls.detect_batch(c, model, windows)  # noqa: E731
        return await self._many(make, texts, chunk_size, concurrency, opts)

    async def qa_many(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        top_k: int | None = None,
        max_answer_length: int | None = None,
        model: str | None = None,
        chunk_size: int | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        **opts: Unpack[CallOptions],
    ) -> list[QAResult]:
        """``qa_batch`` of any number of pairs (:meth:`polarity_many` says how)."""
        make = lambda c: calls.qa_batch(c, model, top_k, max_answer_length)  # noqa: E731
        return await self._many(make, pairs, chunk_size, concurrency, opts)

    # ------------------------------------------------------------------ explanations
    async def explain_detect(
        self,
        text: str,
        *,
        max_evals: int | None = None,
        model: str | None = None,
        **opts: Unpack[CallOptions],
    ) -> Explanation:
        """SHAP values of each token for P(machine) (docs/explain.md)."""
        return await self._send(calls.explain("detect", text, max_evals, model), opts)

    async def explain_polarity(
        self,
        text: str,
        *,
        max_evals: int | None = None,
        model: str | None = None,
        **opts: Unpack[CallOptions],
    ) -> Explanation:
        """SHAP values of each token for P(positive) (docs/explain.md)."""
        return await self._send(calls.explain("polarity", text, max_evals, model), opts)

    # ------------------------------------------------------------------ operations
    async def models(self, **opts: Unpack[CallOptions]) -> Models:
        return await self._send(calls.models(), opts)

    async def model(self, name: str, **opts: Unpack[CallOptions]) -> ModelInfo:
        return await self._send(calls.model_info(name), opts)

    async def healthz(self, **opts: Unpack[CallOptions]) -> Health:
        """Liveness; one attempt (a probe reports on now)."""
        return await self._send(calls.healthz(), opts)

    async def readyz(self, **opts: Unpack[CallOptions]) -> Ready:
        """Readiness; one attempt. Not ready is a 503: :class:`RetriesExhausted` whose
        ``code`` says why (``not_ready``, ``no_models``, ``queue_unavailable``...)."""
        return await self._send(calls.readyz(), opts)
