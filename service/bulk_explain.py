"""``nlpserve predict --explain``: a JSON Lines file explained offline, as the explain
endpoints answer.

Each input line is one ``POST /v1/<task>/explain`` body (``{"text": ..., "max_evals": ...}``);
each output line is that endpoint's answer to it: the same request model and limits
(service/explain/schemas.py, NLPSERVE_MAX_TEXT_CHARS), the same :class:`ExplainService` built
from the same NLPSERVE_EXPLAIN_* settings (its cache, its worker threads, its seeded tie-breaks:
service/explain/ties.py), the same explainer (:func:`build_explainer`: segmenter, mask token,
cut at the model's max length) and the same model path: SHAP's batches of masked variants go
through an :class:`InProcessQueue` over the same runner, in the ``explain`` lane, as in the
in-process service.

Batching is the engine's own: each SHAP call is one batch of ``NLPSERVE_MAX_BATCH_SIZE``
masked variants of one text (near-equal lengths, so sorting them would save no padding), and
``NLPSERVE_EXPLAIN_CONCURRENCY`` explanations run at once, so the queue keeps the model's
inference threads busy. Lines are answered in input order, each written once it and the
lines before it are done; at most :data:`AHEAD_PER_SLOT` lines per explanation slot are
started and not yet written, so what a chunk holds beyond its input (the explanations' tasks,
answers done ahead of a slow line) does not grow with the chunk's lines.

Each line has the endpoint's deadline (``--deadline-ms``; by default NLPSERVE_DEFAULT_DEADLINE_MS,
what the endpoint gives a request without X-Deadline-Ms), and one past it gets the endpoint's
504 ``deadline_exceeded``. Its clock starts when the line's explanation gets one of the
NLPSERVE_EXPLAIN_CONCURRENCY slots, not when it is read: the lines started ahead of it are
this command's own backlog, which a request sent alone would not wait behind. shap's start-up
is paid before the first line (as a server's warm-up pays it), not out of its deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections import deque
from typing import IO

from service.api.middleware import BodyTooLarge
from service.bulk import (
    LineError,
    Progress,
    Stats,
    error_line,
    parse_line,
    position,
    read_chunks,
)
from service.config import Settings
from service.explain.adapters import build_explainer
from service.explain.engine import ExplainError, ExplainService, Explanation
from service.explain.schemas import ExplainRequest, ExplainResponse
from service.queueing.base import QueueError
from service.queueing.inprocess import InProcessQueue
from service.runtime.runner import ModelRunner
from service.tasks.base import InputError, Task

log = logging.getLogger(__name__)

# Lines started ahead of the one being written, per NLPSERVE_EXPLAIN_CONCURRENCY slot: enough
# that a slot never idles behind a slow line for long, few enough that a 4096-line chunk of
# long texts does not hold thousands of tasks and answers at once.
AHEAD_PER_SLOT = 4


class BulkExplainer:
    """Explains lines with one model's task and runner, through the service's explain path."""

    def __init__(
        self, task: Task, runner: ModelRunner, settings: Settings, deadline_ms: int | None = None
    ) -> None:
        self.task = task
        self.runner = runner
        self.settings = settings
        # each line's, as the endpoint's without X-Deadline-Ms unless given
        self.deadline_s = (deadline_ms or settings.default_deadline_ms) / 1000.0
        # the engine's slots, taken here first so that a line's deadline starts with its turn
        self.slots = asyncio.Semaphore(max(1, settings.explain_concurrency))
        too_large = BodyTooLarge(settings.max_body_bytes)
        self.too_large = LineError(
            too_large.status_code, too_large.code, too_large.detail, too_large.limit
        )
        self.stats = Stats()
        self.service = ExplainService.from_settings(settings)
        self.queue: InProcessQueue | None = None
        # the explanations whose evals were counted, by id, while they live (an entry leaves
        # with its object, so an id reused by a later one is not mistaken for it)
        self.computed: weakref.WeakValueDictionary[int, Explanation] = weakref.WeakValueDictionary()

    async def start(self) -> None:
        # Offline, a full queue must wait, not fail the line (429 queue_full): room for every
        # explanation running at once, each holding at most one of its scorer's requests
        # (service/explain/adapters.py) queued; that concurrency bounds the memory instead.
        s = self.settings
        step = max(1, min(s.max_request_sequences, s.max_queue_depth))
        depth = max(s.max_queue_depth, max(1, s.explain_concurrency) * step)
        queue_settings = s.model_copy(update={"max_queue_depth": depth})
        self.queue = InProcessQueue({self.task.name: self.runner}, queue_settings)
        await self.queue.start()
        self.service.register(build_explainer(self.task, self.queue))
        await self.service.warm_up()  # shap's import and JIT: not out of the first lines' time

    async def aclose(self) -> None:
        if self.queue is not None:
            await self.queue.close()
        self.service.close()

    def close(self) -> None:
        self.service.close()

    async def explain(self, req: ExplainRequest) -> str | LineError:
        """The endpoint's answer to ``req``: its JSON body, or its error."""
        try:
            self.task.check_length(req.text)  # the route's check, before the engine's
            async with self.slots:
                exp: Explanation = await self.service.explain(
                    self.task.name, req.text, req.max_evals, time.monotonic() + self.deadline_s
                )
        except InputError as e:
            return LineError(e.status_code, e.code, e.message)
        except (ExplainError, QueueError) as e:  # as the API's handlers map them
            return LineError(e.status_code, e.code, str(e))
        except Exception:  # the API's 500, logged; the other lines go on
            log.exception("%s: explaining a line failed", self.task.name)
            return LineError(500, "internal_error", "internal server error (logged)")
        # Model work done: a cache hit did none, and a line that joined the same text's
        # explanation in flight (single-flight) got the very object the first line got.
        if not exp.cached and id(exp) not in self.computed:
            self.computed[id(exp)] = exp
            self.stats.evals += exp.evals
        body = ExplainResponse.of(exp).model_dump(mode="json")
        return json.dumps(body, ensure_ascii=False)


async def explain_stream(
    explainer: BulkExplainer,
    inp: IO[bytes],
    out: IO[str],
    *,
    chunk_lines: int,
    fail_fast: bool = False,
    progress: Progress | None = None,
) -> Stats:
    """Explain every line of ``inp`` into ``out``, in input order; with ``fail_fast``, stop
    after the first failed line's answer: a line refused before its explanation ends the
    reading there (no line after it is explained), one whose explanation fails cancels the
    explanations after it."""
    stats = explainer.stats
    ahead = AHEAD_PER_SLOT * max(1, explainer.settings.explain_concurrency)

    def begin(raw: bytes | None) -> str | LineError | asyncio.Future[str | LineError]:
        if raw is None:
            return explainer.too_large
        if not raw.strip():
            return ""  # a blank line stays blank, as predict answers it
        if isinstance(req := parse_line(raw, ExplainRequest), LineError):
            return req
        assert isinstance(req, ExplainRequest)
        # the service's threads take NLPSERVE_EXPLAIN_CONCURRENCY at a time, in line order
        return asyncio.ensure_future(explainer.explain(req))

    await explainer.start()
    try:
        for lines in read_chunks(inp, chunk_lines, explainer.settings.max_body_bytes):
            # started, not yet written: (line number, answer or its explanation to come)
            started: deque[tuple[int, str | LineError | asyncio.Future[str | LineError]]]
            started = deque()
            todo = iter(lines)
            refused = stop = False
            try:
                while True:
                    while not refused and len(started) < ahead:
                        if (line := next(todo, None)) is None:
                            break
                        started.append((line[0], answer := begin(line[1])))
                        # --fail-fast: a line refused before its explanation starts no other
                        refused = fail_fast and isinstance(answer, LineError)
                    if not started:
                        break
                    number, answer = started[0]
                    # shielded: Ctrl-C cancels this task, and a cancellation passed on to the
                    # explanation could be lost there (Python 3.11's wait_for returns a result
                    # that came as it was cancelled), the run then going on to its end. The
                    # explanation itself is cancelled below, with the others started.
                    got = (
                        await asyncio.shield(answer)
                        if isinstance(answer, asyncio.Future)
                        else answer
                    )
                    started.popleft()
                    stats.lines += 1
                    if isinstance(got, LineError):
                        stats.items += 1
                        stats.errors += 1
                        if stats.first_error is None:
                            stats.first_error = (number, got)
                        out.write(error_line(number, got) + "\n")
                        stop = fail_fast
                    else:
                        stats.items += bool(got)
                        out.write(got + "\n")
                    out.flush()  # slow lines: each visible as soon as it is known
                    if progress is not None:
                        progress.update(stats, position(inp))
                    if stop:
                        break
            finally:
                for _, answer in started:
                    if isinstance(answer, asyncio.Future) and not answer.done():
                        answer.cancel()  # stopped early (--fail-fast, Ctrl-C, a closed pipe)
            if stop:
                break
    finally:
        await explainer.aclose()
    return stats
