"""SHAP explanations whose model calls go through the service's own inference queue.

``shap`` calls the model function synchronously with batches of masked texts. The explainer
therefore runs in a worker thread, and its model function hands each batch back to the
event loop (``asyncio.run_coroutine_threadsafe``), where a :data:`Scorer` encodes the texts
with the model's preprocessing and submits them as ``lane="explain"`` work items: the same
batcher and ONNX session as ordinary requests, at a lower priority.

Output space: **probability** of one class (the detector's ``machine`` probability, the
polarity model's ``positive`` probability). SHAP's partition explainer is exactly additive
in the space of the function it is given, so ``base_value + sum(values) == output``, where
``base_value`` is the probability for the text with every token masked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from service.explain.segmenters import cut_to_tokens
from service.explain.ties import seeded_tie_breaks
from service.queueing.base import DeadlineExceededError

if TYPE_CHECKING:
    from service.config import Settings

# texts, monotonic deadline -> one float per text (the explained output); a coroutine
# function: the explainer's thread runs it on the event loop
Scorer = Callable[[list[str], float], Coroutine[Any, Any, np.ndarray]]

_RESULT_GRACE_S = 1.0  # extra wait past the deadline for a batch already running


class ExplainError(Exception):
    """Base of the errors an explanation raises; each maps to one HTTP status."""

    status_code = 500
    code = "explain_failed"


class ExplainUnavailableError(ExplainError):
    """``shap`` is not installed in this environment (501)."""

    status_code = 501
    code = "explain_unavailable"


class ExplainInputError(ExplainError):
    """The request cannot be explained as sent (422)."""

    status_code = 422
    code = "invalid_explain_request"


class ExplainCancelledError(ExplainError):
    """The caller went away; the explainer thread stops at its next model call."""

    status_code = 499
    code = "cancelled"


class Segmenter(Protocol):
    mask_token: str

    def __call__(self, s: str, return_offsets_mapping: bool = True) -> dict[str, list]: ...

    def offsets(self, s: str) -> list[tuple[int, int]]: ...


@dataclass
class ModelExplainer:
    """What it takes to explain one served model."""

    name: str
    version: str
    segmenter: Segmenter
    scorer: Scorer
    output_name: str  # e.g. "machine_probability"
    label_for: Callable[[float], str]  # explained probability -> predicted label
    max_tokens: int  # features beyond this are cut (the model would not see them)


@dataclass(frozen=True)
class Explanation:
    model: str
    version: str
    tokens: list[str]  # surface substrings of the text, one per feature
    offsets: list[tuple[int, int]]  # character offsets of each token into the text
    values: list[float]  # SHAP value of each token, in probability units
    base_value: float  # output with every token masked
    output: float  # output for the text as sent (base_value + sum(values))
    output_name: str
    label: str
    max_evals: int
    evals: int  # model evaluations SHAP actually made
    truncated: bool  # the text had more tokens than the model reads: the tail is ignored
    seconds: float
    cached: bool = False


class LRUCache:
    """Bounded least-recently-used map. Only the event loop touches it (no lock needed)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[Any, Explanation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Any) -> Explanation | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: Any, value: Explanation) -> None:
        if self.maxsize <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)


def shap_available() -> bool:
    import importlib.util
    import sys

    if "shap" in sys.modules:  # imported already, or blocked (None) as tests do
        return sys.modules["shap"] is not None
    return importlib.util.find_spec("shap") is not None


@dataclass
class ExplainService:
    """Per-model explainers, the worker threads that run SHAP, a result cache."""

    max_evals_default: int = 200
    max_evals_limit: int = 1000
    cache_size: int = 256
    batch_size: int = 32  # masked texts per model call (one queue batch)
    concurrency: int = 2  # explanations computed at once; more wait for a thread
    explainers: dict[str, ModelExplainer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cache = LRUCache(self.cache_size)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, self.concurrency), thread_name_prefix="nlpserve-explain"
        )
        self._inflight: dict[tuple, asyncio.Future[Explanation]] = {}
        self._warm: asyncio.Future[None] | None = None

    @classmethod
    def from_settings(cls, s: Settings) -> ExplainService:
        """The service's NLPSERVE_EXPLAIN_* settings (the API's and ``nlpserve predict
        --explain``'s: the same answers)."""
        return cls(
            max_evals_default=s.explain_max_evals_default,
            max_evals_limit=s.explain_max_evals_limit,
            cache_size=s.explain_cache_size,
            # Each model call submits its batch of masked texts as one request: at most what
            # a request may need and the queue admits (the scorer splits SHAP's occasional
            # overshoot; a small NLPSERVE_MAX_QUEUE_DEPTH answered 422 before).
            batch_size=min(s.max_batch_size, s.max_queue_depth, s.max_request_sequences),
            concurrency=s.explain_concurrency,
        )

    # ------------------------------------------------------------------ setup
    def register(self, explainer: ModelExplainer) -> None:
        self.explainers[explainer.name] = explainer

    def warm_up(self) -> asyncio.Future[None]:
        """Import shap and JIT-compile its partition tree off the event loop, once.

        The first explanation otherwise pays ~5 s of imports and numba compilation.
        """
        if self._warm is None:
            loop = asyncio.get_running_loop()
            self._warm = asyncio.ensure_future(loop.run_in_executor(self._executor, _warm_shap))
        return self._warm

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def max_evals(self, requested: int | None) -> int:
        value = self.max_evals_default if requested is None else requested
        if value > self.max_evals_limit:
            raise ExplainInputError(
                f"max_evals {value} is over this server's limit of {self.max_evals_limit}"
            )
        return value

    # ------------------------------------------------------------------ explaining
    async def explain(
        self, model: str, text: str, max_evals: int | None, deadline: float
    ) -> Explanation:
        if not shap_available():
            raise ExplainUnavailableError(
                "explanations need the 'shap' package, which is not installed on this server "
                "(pip install 'nlpserve[explain]')"
            )
        ex = self.explainers.get(model)
        if ex is None:
            raise ExplainInputError(f"model {model!r} is not loaded, so it cannot be explained")
        evals = self.max_evals(max_evals)
        key = (ex.name, ex.version, text, evals)
        asked = time.monotonic()  # for a joiner's 504: its whole wait, over every owner
        while True:
            hit = self.cache.get(key)
            if hit is not None:
                return replace(hit, cached=True)
            running = self._inflight.get(key)
            if running is None:
                break
            # Identical concurrent requests share one computation, each within its own
            # deadline...
            try:
                return await _within(running, deadline)
            except TimeoutError:
                raise _joined_too_late(asked) from None
            except (ExplainCancelledError, DeadlineExceededError):
                # ...unless its owner went away or ran out of its own (shorter) time: then
                # compute it here, within this request's deadline.
                if time.monotonic() >= deadline:
                    raise _joined_too_late(asked) from None
                continue
        fut: asyncio.Future[Explanation] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            result = await self._compute(ex, text, evals, deadline)
        except asyncio.CancelledError:
            fut.set_exception(ExplainCancelledError("the request computing this went away"))
            fut.exception()  # mark retrieved: nobody else may be waiting
            raise
        except Exception as e:
            fut.set_exception(e)
            fut.exception()
            raise
        else:
            fut.set_result(result)
            self.cache.put(key, result)
            return result
        finally:
            del self._inflight[key]

    async def _compute(
        self, ex: ModelExplainer, text: str, max_evals: int, deadline: float
    ) -> Explanation:
        asked = time.perf_counter()
        try:
            await _within(self.warm_up(), deadline)
        except TimeoutError:
            raise DeadlineExceededError(
                "the explanation did not start before its deadline: "
                f"{time.perf_counter() - asked:.1f} s waiting for shap's start-up (the first "
                "explanation after a server start loads it); retry"
            ) from None
        loop = asyncio.get_running_loop()
        cancel = _Cancel()
        job = loop.run_in_executor(
            self._executor, _explain_sync, ex, text, max_evals, self.batch_size, deadline, loop,
            cancel, asked,
        )  # fmt: skip
        # A job abandoned by a cancelled request still ends (with an error): consume it.
        job.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await _within(job, deadline)
        except TimeoutError:
            if cancel.started.is_set():  # running: its own deadline checks end it shortly
                return await asyncio.shield(job)
            cancel.set()  # it will not run when a slot frees
            raise DeadlineExceededError(
                "the explanation did not start before its deadline: "
                f"{time.perf_counter() - asked:.1f} s waiting for a free explanation slot "
                f"({self.concurrency} run at once, NLPSERVE_EXPLAIN_CONCURRENCY); retry later, "
                "or with a longer X-Deadline-Ms"
            ) from None
        except asyncio.CancelledError:
            cancel.set()  # drops the model call in flight; the thread stops instead of going on
            raise


def _joined_too_late(asked: float) -> DeadlineExceededError:
    return DeadlineExceededError(
        "the explanation did not finish before its deadline: "
        f"{time.monotonic() - asked:.1f} s waiting for the same explanation, already running for "
        "another request; ask for a smaller max_evals"
    )


async def _within(fut: asyncio.Future[Any], deadline: float) -> Any:
    """``fut``'s result, or TimeoutError at ``deadline`` (``time.monotonic()``). ``fut`` itself is
    not cancelled: other requests may share it, or a thread runs it."""
    return await asyncio.wait_for(
        asyncio.shield(fut), timeout=max(0.0, deadline - time.monotonic())
    )


class _Cancel(threading.Event):
    """Set from the event loop when the request goes away (or its deadline passes before a
    thread took the job); also cancels the model call in flight (its queued work items are
    then skipped by the batcher). ``started``: a thread runs the job."""

    current: concurrent.futures.Future | None = None

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()

    def set(self) -> None:
        super().set()
        if self.current is not None:
            self.current.cancel()


def _warm_shap() -> None:
    import shap

    class _Tok:
        def __call__(self, s: str, return_offsets_mapping: bool = True) -> dict[str, list]:
            spans, pos = [], 0
            for w in s.split():
                start = s.index(w, pos)
                spans.append((start, start + len(w)))
                pos = start + len(w)
            return {"input_ids": list(range(len(spans))), "offset_mapping": spans}

    masker = shap.maskers.Text(_Tok(), mask_token="_", collapse_mask_token=False)
    explainer = shap.Explainer(
        lambda xs: np.array([len(str(x)) for x in xs], dtype=float), masker, algorithm="partition"
    )
    explainer(["a b c d"], max_evals=20, silent=True)


def _explain_sync(
    ex: ModelExplainer,
    text: str,
    max_evals: int,
    batch_size: int,
    deadline: float,
    loop: asyncio.AbstractEventLoop,
    cancel: _Cancel,
    asked: float | None = None,
) -> Explanation:
    """Runs in a worker thread: SHAP drives, every model call is bridged to the event loop.
    ``asked``: perf_counter() when the explanation was asked for (the wait for a free slot
    and shap's start-up come before this thread runs)."""
    cancel.started.set()
    if cancel.is_set():  # given up while it waited for this thread
        raise ExplainCancelledError("the request gave up before a thread was free")
    import shap

    t0 = time.perf_counter()
    waited = t0 - asked if asked is not None else 0.0
    # Cut where the model stops reading (counted in its tokens), then take SHAP's features of
    # what is left: tokens that map back to one character are one feature (segmenters.py), so
    # the model's token offsets are not the features' (a value per feature, an offset per
    # token failed with a 500).
    text, truncated = cut_to_tokens(text, ex.segmenter.offsets(text), ex.max_tokens)
    offsets = [(int(s), int(e)) for s, e in ex.segmenter(text)["offset_mapping"]]
    if not offsets:
        raise ExplainInputError("the text has no tokens to explain")
    n_evals = 0
    full_text: str | None = None  # the input as SHAP renders it with nothing masked
    full_output: float | None = None  # the model's output for it, as SHAP evaluated it

    def out_of_time() -> DeadlineExceededError:
        before = (
            f", after {waited:.1f} s waiting for a free explanation slot (NLPSERVE_EXPLAIN_"
            "CONCURRENCY) and shap's start-up"
            if waited >= 0.5
            else ""
        )
        return DeadlineExceededError(
            f"the explanation did not finish before its deadline: {n_evals} of {max_evals} "
            f"model evaluations done in {time.perf_counter() - t0:.1f} s{before}; ask for a "
            "smaller max_evals (or send a shorter text)"
        )

    def model_fn(batch: Sequence[Any]) -> np.ndarray:
        nonlocal n_evals, full_output
        if cancel.is_set():
            raise ExplainCancelledError("the client went away")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise out_of_time()
        texts = [str(t) for t in batch]
        fut = asyncio.run_coroutine_threadsafe(ex.scorer(texts, deadline), loop)
        cancel.current = fut
        if cancel.is_set():  # cancelled between the check above and now
            fut.cancel()
        try:
            out = fut.result(timeout=remaining + _RESULT_GRACE_S)
        except concurrent.futures.CancelledError:
            raise ExplainCancelledError("the client went away") from None
        except (concurrent.futures.TimeoutError, DeadlineExceededError):
            # The queue's own message speaks of a queued batch; say what ran out instead.
            fut.cancel()
            raise out_of_time() from None
        n_evals += len(texts)
        out = np.asarray(out, dtype=np.float64).reshape(len(texts))
        if full_output is None and full_text in texts:
            full_output = float(out[texts.index(full_text)])
        return out

    mask_token = ex.segmenter.mask_token
    if len(offsets) == 1:
        # SHAP's text clustering needs two tokens; one token's Shapley value is exact anyway.
        # Two calls, not one batch of two: int8 scales depend on the batch, and the text
        # scored alone is what a lone /v1/detect request gets (SHAP's own f(x) call is alone).
        full_text = text
        base = float(model_fn([mask_token])[0])
        output = float(model_fn([text])[0])
        values = [output - base]
    else:
        # The masker swaps a token's segment (the token plus the spaces after it) for
        # " " + mask: without a trailing space the mask would glue onto the next word
        # ("was _good") and change how it tokenizes.
        masker = shap.maskers.Text(
            ex.segmenter, mask_token=mask_token + " ", collapse_mask_token=False
        )
        full_text = str(masker(np.ones(len(offsets), dtype=bool), text)[0][0])
        explainer = shap.Explainer(model_fn, masker, algorithm="partition")
        with seeded_tie_breaks():  # the same request, the same values (ties.py)
            sv = explainer([text], max_evals=max_evals, batch_size=batch_size, silent=True)
        values = [float(v) for v in np.asarray(sv.values[0], dtype=np.float64).reshape(-1)]
        base = float(np.asarray(sv.base_values).reshape(-1)[0])
        if len(values) != len(offsets):
            raise RuntimeError(f"SHAP returned {len(values)} values for {len(offsets)} tokens")
        # f(x) is always evaluated by the partition explainer; SHAP's additivity guarantee is
        # base + sum(values) == f(x), which the tests check against this captured value.
        output = full_output if full_output is not None else base + float(np.sum(values))
    return Explanation(
        model=ex.name,
        version=ex.version,
        tokens=[text[s:e] for s, e in offsets],
        offsets=[(int(s), int(e)) for s, e in offsets],
        values=values,
        base_value=float(base),
        output=float(output),
        output_name=ex.output_name,
        label=ex.label_for(float(output)),
        max_evals=max_evals,
        evals=n_evals,
        truncated=truncated,
        seconds=time.perf_counter() - t0,
    )
