"""The response cache (NLPSERVE_RESPONSE_CACHE_MB): per-item prediction results, LRU, in memory.

Real traffic repeats itself (one headline classified by many services, retries, popular
questions). A repeated item is answered here, on the one path of every prediction protocol
(``run_work`` in routes/predict.py: /v1, /v2 and gRPC), without tokenizing, queueing or
inference; a batch of 10 items of which 7 are known runs the other 3.

A key is a blake2b digest of what determines the answer:

* the model as served: name, version, task, its whole manifest (every variant's file and
  sha256, the tokenizer's and vocabularies' sha256, preprocessing) and, in-process, the
  variant this process runs (its sha256, or its file's size and mtime when the manifest
  records none). Fingerprinted per :class:`Task` object, so a model loaded anew (another
  version, another variant) gets other keys;
* how the result is decoded (/v1's task response or the V2 protocol's rows);
* the item itself, every field: its texts (text, tokens, question, context) and its
  options (qa's ``top_k`` and ``max_answer_length``, detect's ``windows``, pos's
  ``scores``), so an item asked with other options is another entry.

Process-wide settings that change answers (max lengths, buckets...) are fixed for a process's
life, and so is this cache's: it is per API process, never shared. Errors are never cached,
nor results that came back past the request's deadline.

A result is kept frozen, as bytes (a pydantic result's JSON, anything else pickled), and
thawed into a new object for each answer: what a response does with its results can never
reach the cache, with no deep copy either way, and the bytes are also the size counted.

Single-flight: a missed item that another request is running now is not run again; the
request waits for that run (within its own deadline) and thaws its result. A run that fails
(an error, a refusal, its client gone, its deadline past) leaves its waiters to run the item
themselves, each under its own admission and deadline, so each gets its own answer or error.
"""

from __future__ import annotations

import asyncio
import pickle
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from hashlib import blake2b
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import Counter, Gauge
from pydantic import BaseModel
from pydantic_core import PydanticSerializationError

from service.batching.scheduler import PREDICT_LANE, lanes_through
from service.metrics import Metrics
from service.queueing.base import DeadlineExceededError
from service.tasks.base import InputError, Task

if TYPE_CHECKING:  # onnxruntime: a Redis-mode API runs no model and never imports it
    from service.runtime.runner import ModelRunner

R = TypeVar("R")

KEY_BYTES = 16  # a 128-bit blake2b digest: the key's memory is bounded whatever the input
_ITEM_PREFIX = re.compile(r"^inputs\[(\d+)\]: ")

# A result as kept: (its kind, its bytes). Kind 0 is pickle (the V2 protocol's rows, any
# other value); kind k > 0 the JSON of the k-th pydantic class seen. Bytes and ints only, so
# the tuples are untracked by the garbage collector: a cache of a million entries adds
# nothing to each full collection's walk, as a million deep-copied models did.
Frozen = tuple[int, bytes]
PICKLED = 0
# What a run tells its waiters when its result has no kept form (a NaN): nothing to share,
# so each runs the item itself at once, rather than single-flight again, where each waiter
# would wait for the one before it to run the item, one model round trip each
UNSHAREABLE: Frozen = (-1, b"")


class Timing(dict[str, float]):
    """run_requests' stage -> seconds, and how the cache answered the request (``hit``:
    every item, ``partial``, ``miss``; None: no cache) for the Server-Timing header."""

    cache: str | None = None
    cache_s: float = 0.0


def decoder_name(decode: Callable[..., Any]) -> str:
    """What names how results are decoded, the same for every request: /v1's is the task's
    ``decode`` method, the V2 protocol's a function that tensors_of (v2_tensors.py) builds
    anew for each request, so its identity would never repeat."""
    func = getattr(decode, "__func__", decode)
    return f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}"


def fingerprint(task: Task, runner: ModelRunner | None) -> bytes:
    """The model as served (module docstring): what changes when another model answers."""
    h = blake2b(digest_size=KEY_BYTES)
    h.update(task.task.encode() + b"\0" + task.manifest.model_dump_json().encode())
    if runner is not None:  # in-process: the variant this process runs; Redis: the workers'
        spec = task.manifest.variants[runner.variant]
        h.update(b"\0" + runner.variant.encode() + b"\0")
        if spec.sha256 is not None:
            h.update(spec.sha256.encode())
        else:
            st = (runner.path / spec.file).stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.digest()


class ResponseCache:
    """An LRU of per-item results bounded by an estimate of bytes (keys + results as kept),
    and the items being run now, so that identical misses run once (single-flight)."""

    def __init__(self, max_bytes: int, metrics: Metrics) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, Frozen] = OrderedDict()
        self._fingerprints: weakref.WeakKeyDictionary[Task, bytes] = weakref.WeakKeyDictionary()
        self._classes: list[type[BaseModel] | None] = [None]  # kind -> class (0: pickled)
        self._kinds: dict[type[BaseModel], int] = {}
        # key -> what its running item will be (None: its run failed or kept nothing)
        # a key being run -> (its result to come, the lane of the run: an interactive
        # request never waits on a batch-priority run, which waits for every interactive one)
        self._inflight: dict[bytes, tuple[asyncio.Future[Frozen | None], str]] = {}
        r = metrics.registry
        self._metrics = metrics
        self.hits = Counter(
            "nlpserve_response_cache_hits_total",
            "Prediction items answered from the response cache (NLPSERVE_RESPONSE_CACHE_MB).",
            ["model"],
            registry=r,
        )
        self.misses = Counter(
            "nlpserve_response_cache_misses_total",
            "Prediction items the response cache did not hold (run by the model, or coalesced).",
            ["model"],
            registry=r,
        )
        self.coalesced = Counter(
            "nlpserve_response_cache_coalesced_total",
            "Missed items answered by an identical item's run for another request, in flight.",
            ["model"],
            registry=r,
        )
        self.evictions = Counter(
            "nlpserve_response_cache_evictions_total",
            "Results dropped, least recently used first, to stay within the cache's size.",
            registry=r,
        )
        self.size = Gauge(
            "nlpserve_response_cache_bytes",
            "The response cache's size as it counts it: keys plus results as kept (JSON).",
            registry=r,
        )

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ keys
    def keys(
        self,
        task: Task,
        runner: ModelRunner | None,
        decode: Callable[..., Any],
        items: Sequence[BaseModel],
    ) -> list[bytes]:
        fp = self._fingerprints.get(task)
        if fp is None:
            fp = self._fingerprints[task] = fingerprint(task, runner)
        how = decoder_name(decode).encode()
        prefixes: dict[type[BaseModel], Any] = {}  # the hash of what every item shares, copied
        out = []
        for item in items:
            cls = type(item)
            prefix = prefixes.get(cls)
            if prefix is None:
                prefix = prefixes[cls] = blake2b(fp, digest_size=KEY_BYTES)
                prefix.update(b"\0" + how + b"\0" + cls.__qualname__.encode() + b"\0")
            h = prefix.copy()
            h.update(cls.__pydantic_serializer__.to_json(item))  # model_dump_json's bytes
            out.append(h.digest())
        return out

    # ------------------------------------------------------------------ kept form
    def freeze(self, value: Any) -> Frozen | None:
        """``value`` as kept: bytes that nothing a caller does to ``value`` can change, and
        from which :meth:`thaw` makes a new equal object each time (the copy a response may
        do anything with). None: there is no such form (it is then not kept)."""
        if isinstance(value, BaseModel):
            cls = type(value)
            kind = self._kinds.get(cls)
            if kind is None:
                kind = self._kinds[cls] = len(self._classes)
                self._classes.append(cls)
            try:
                data = cls.__pydantic_serializer__.to_json(value)
            except PydanticSerializationError:
                return None
            # JSON writes NaN and infinities as null, which no float field reads back
            if b"null" in data and not _reads_back(cls, data, value):
                return None
            return kind, data
        try:
            return PICKLED, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # whatever a value's pickling raises: answered, just not kept
            return None

    def thaw(self, frozen: Frozen) -> Any:
        kind, data = frozen
        cls = self._classes[kind]
        # our own bytes, never a client's: unpickling them is safe
        return pickle.loads(data) if cls is None else cls.model_validate_json(data)

    # ------------------------------------------------------------------ LRU
    def get(self, key: bytes) -> tuple[bool, Any]:
        # no lock: every caller (HTTP routes, grpc.aio's servicer) runs on the event loop
        frozen = self._entries.get(key)
        if frozen is None:
            return False, None
        self._entries.move_to_end(key)
        return True, self.thaw(frozen)

    def put(self, key: bytes, value: Any) -> None:
        frozen = self.freeze(value)
        if frozen is not None:
            self.keep(key, frozen)

    def keep(self, key: bytes, frozen: Frozen) -> None:
        size = len(key) + len(frozen[1])
        if size > self.max_bytes:
            return  # would evict everything and still not fit
        evicted = 0
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(key) + len(old[1])
        self._entries[key] = frozen
        self.bytes += size
        while self.bytes > self.max_bytes:
            dropped, (_, data) = self._entries.popitem(last=False)
            self.bytes -= len(dropped) + len(data)
            evicted += 1
        self.size.set(self.bytes)
        if evicted:
            self.evictions.inc(evicted)

    # ------------------------------------------------------------------ serving
    async def serve(
        self,
        task: Task,
        runner: ModelRunner | None,
        items: list[BaseModel],
        decode: Callable[..., R],
        deadline: float,
        timing: Timing,
        run: Callable[[list[BaseModel]], Awaitable[list[R]]],
        lane: str = PREDICT_LANE,
    ) -> list[R]:
        """``items``' results: those held from here, those another request is running now
        from its run (single-flight: a run in ``lane``, the request's, or a lane before it),
        the others from ``run`` (admission, queue, model; in the items' order), which are
        then kept."""
        t0 = time.perf_counter()
        keys = self.keys(task, runner, decode, items)
        results: list[Any] = [None] * len(items)
        missing: list[int] = []
        for i, key in enumerate(keys):
            frozen = self._entries.get(key)
            if frozen is None:
                missing.append(i)
            else:
                self._entries.move_to_end(key)
                results[i] = self.thaw(frozen)
        hits = len(items) - len(missing)
        if hits:
            self._metrics.child(self.hits, task.name).inc(hits)
        if missing:
            self._metrics.child(self.misses, task.name).inc(len(missing))
        timing.cache = "miss" if not hits else "partial" if missing else "hit"
        timing.cache_s = time.perf_counter() - t0
        todo = missing
        while todo:  # more than once only when a run this request waited on failed
            todo = await self._run_or_wait(
                task.name, keys, items, todo, results, deadline, run, lane
            )
        return results

    async def _run_or_wait(
        self,
        model: str,
        keys: list[bytes],
        items: list[BaseModel],
        todo: list[int],
        results: list[Any],
        deadline: float,
        run: Callable[[list[BaseModel]], Awaitable[list[R]]],
        lane: str = PREDICT_LANE,
    ) -> list[int]:
        """Runs the items of ``todo`` that no request is running, waits for the others' runs;
        returns the items still to do: those whose run failed (the error was its request's:
        this one runs them itself, under its own deadline and admission, or waits for
        another request that got there first). A run whose result cannot be kept is run
        again here at once (:data:`UNSHAREABLE`)."""
        lead: list[int] = []
        mine: list[int] = []  # of lead, those whose run others may wait on
        follow: list[tuple[int, asyncio.Future[Frozen | None]]] = []
        ahead = lanes_through(lane)
        answered = 0  # by other requests (kept meanwhile, or coalesced)
        loop = asyncio.get_running_loop()
        for i in todo:
            key = keys[i]
            if (frozen := self._entries.get(key)) is not None:  # kept since this one looked
                results[i] = self.thaw(frozen)
                answered += 1
            elif (flight := self._inflight.get(key)) is None:
                self._inflight[key] = (loop.create_future(), lane)
                lead.append(i)
                mine.append(i)
            elif flight[1] in ahead:
                follow.append((i, flight[0]))
            else:  # a lower lane's run (it may wait long): run it here, unshared
                lead.append(i)
        if lead:
            done: dict[int, Frozen | None] = {}
            try:
                ran = await run([items[i] for i in lead])
                late = time.monotonic() > deadline  # answered, but not in time: not kept
                for i, value in zip(lead, ran, strict=True):
                    results[i] = value
                    frozen = self.freeze(value)
                    done[i] = UNSHAREABLE if frozen is None else frozen
                    if frozen is not None and not late:
                        self.keep(keys[i], frozen)
            except InputError as e:
                raise renumbered(e, lead, len(items)) from None
            finally:  # whatever happened (errors, cancellation): no one waits on it any more
                for i in mine:
                    self._inflight.pop(keys[i])[0].set_result(done.get(i))
        again: list[int] = []
        alone: list[int] = []
        if follow:
            pending = {f for _, f in follow if not f.done()}
            if pending:
                # asyncio.wait never cancels them: another request's run is not this one's
                _, late_ones = await asyncio.wait(pending, timeout=deadline - time.monotonic())
                if late_ones:
                    raise DeadlineExceededError(
                        "the deadline passed while an identical item ran for another request"
                    )
            for i, waited in follow:
                frozen = waited.result()
                if frozen is None:
                    again.append(i)
                elif frozen is UNSHAREABLE:
                    alone.append(i)
                else:
                    results[i] = self.thaw(frozen)
                    answered += 1
        if alone:  # answered for another request but not shareable: run here, now
            try:
                ran = await run([items[i] for i in alone])
            except InputError as e:
                raise renumbered(e, alone, len(items)) from None
            for i, value in zip(alone, ran, strict=True):
                results[i] = value
        if answered:
            self._metrics.child(self.coalesced, model).inc(answered)
        return again


def _reads_back(cls: type[BaseModel], data: bytes, value: BaseModel) -> bool:
    try:
        return cls.model_validate_json(data) == value
    except ValueError:
        return False


def renumbered(error: InputError, positions: list[int], n: int) -> InputError:
    """An error about item j of the items run (``positions[j]`` of the request's ``n``)
    named as the request's item, as it would be without the cache."""
    if n == 1 or len(positions) == n:
        return error
    m = _ITEM_PREFIX.match(error.message)
    if m is not None:
        rest = error.message[m.end() :]
        message = f"inputs[{positions[int(m[1])]}]: {rest}"
    elif len(positions) == 1:  # one item run alone: its errors name no item
        message = f"inputs[{positions[0]}]: {error.message}"
    else:
        return error
    return InputError(error.code, message, error.status_code, error.limit)
