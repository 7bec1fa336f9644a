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
* the item itself, every field (text, tokens, question, context): the /v1 items have no
  other option that changes an answer.

Process-wide settings that change answers (max lengths, buckets...) are fixed for a process's
life, and so is this cache's: it is per API process, never shared. Errors are never cached,
nor results that came back past the request's deadline.
"""

from __future__ import annotations

import copy
import json
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from hashlib import blake2b
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import Counter, Gauge
from pydantic import BaseModel

from service.metrics import Metrics
from service.tasks.base import InputError, Task

if TYPE_CHECKING:  # onnxruntime: a Redis-mode API runs no model and never imports it
    from service.runtime.runner import ModelRunner

R = TypeVar("R")

KEY_BYTES = 16  # a 128-bit blake2b digest: the key's memory is bounded whatever the input
_ITEM_PREFIX = re.compile(r"^inputs\[(\d+)\]: ")


class Timing(dict[str, float]):
    """run_requests' stage -> seconds, and how the cache answered the request (``hit``:
    every item, ``partial``, ``miss``; None: no cache) for the Server-Timing header."""

    cache: str | None = None
    cache_s: float = 0.0


def result_size(value: Any) -> int:
    """The estimate of a result's memory: its JSON's length (the Python objects behind it
    take a few times that; docs/service.md says so)."""
    if isinstance(value, BaseModel):
        return len(value.model_dump_json())
    return len(json.dumps(value, ensure_ascii=False, default=str).encode())


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
    """An LRU of per-item results bounded by an estimate of bytes (keys + results' JSON)."""

    def __init__(self, max_bytes: int, metrics: Metrics) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
        self._fingerprints: weakref.WeakKeyDictionary[Task, bytes] = weakref.WeakKeyDictionary()
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
            "Prediction items the response cache did not hold (run by the model).",
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
            "The response cache's size as it counts it: keys plus results' JSON.",
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
        out = []
        for item in items:
            h = blake2b(fp, digest_size=KEY_BYTES)
            h.update(b"\0" + how + b"\0" + type(item).__qualname__.encode() + b"\0")
            h.update(item.model_dump_json().encode())
            out.append(h.digest())
        return out

    # ------------------------------------------------------------------ LRU
    def get(self, key: bytes) -> tuple[bool, Any]:
        # no lock: every caller (HTTP routes, grpc.aio's servicer) runs on the event loop
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        self._entries.move_to_end(key)
        # a copy: what a response does with its results never reaches the cache
        return True, copy.deepcopy(entry[0])

    def put(self, key: bytes, value: Any) -> None:
        size = len(key) + result_size(value)
        if size > self.max_bytes:
            return  # would evict everything and still not fit
        value = copy.deepcopy(value)
        evicted = 0
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
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
    ) -> list[R]:
        """``items``' results: those held from here, the others from ``run`` (admission,
        queue, model; in the items' order), which are then kept."""
        t0 = time.perf_counter()
        keys = self.keys(task, runner, decode, items)
        results: list[Any] = [None] * len(items)
        missing: list[int] = []
        for i, key in enumerate(keys):
            found, value = self.get(key)
            if found:
                results[i] = value
            else:
                missing.append(i)
        hits = len(items) - len(missing)
        if hits:
            self._metrics.child(self.hits, task.name).inc(hits)
        if missing:
            self._metrics.child(self.misses, task.name).inc(len(missing))
        timing.cache = "miss" if not hits else "partial" if missing else "hit"
        timing.cache_s = time.perf_counter() - t0
        if not missing:
            return results
        try:
            ran = await run([items[i] for i in missing])
        except InputError as e:
            raise renumbered(e, missing, len(items)) from None
        late = time.monotonic() > deadline  # answered, but not in time: not kept
        for i, value in zip(missing, ran, strict=True):
            results[i] = value
            if not late:
                self.put(keys[i], value)
        return results


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
    return InputError(error.code, message, error.status_code)
