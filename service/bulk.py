"""``nlpserve predict``: a JSON Lines file answered offline, through the service's own path.

Each input line is one ``/v1/<task>`` item; each output line is what that endpoint answers
for it alone, in input order: the same validation (the request models of
service/api/schemas.py, the API's error codes and messages), the same task encode and decode
(service/tasks), the same session (variant, providers, threads: service/runtime) and the same
padding and output splitting (:meth:`ModelRunner.run_batch`). Only the batching differs: the
input is all there, so each chunk of lines is sorted by length and cut into batches padded to
their own longest sequence (:func:`sorted_batches`, as bench/raw_ort.py measures the ceiling),
instead of the live queue's waiting for company.

Lines are read a chunk at a time (``chunk_lines``), so a file of any size streams through;
while one chunk's batches run on the model's threads, the next chunk is parsed and tokenized.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import IO, Any

import numpy as np
from pydantic import BaseModel, ValidationError

from service.api.errors import Limit, body_parse_error, error_body, validation_error
from service.api.middleware import BodyTooLarge
from service.api.schemas import DetectRequest, PolarityRequest, PosRequest, QARequest
from service.batching import BatchPolicy, WorkItem, sorted_batches
from service.queueing.inprocess import run_batch_isolating
from service.runtime.runner import ModelRunner
from service.tasks.base import InputError, Prepared, Task, check_sequences

# One /v1 item's request model per task (the routes' bodies less the {"inputs"} batch shape).
ITEM_MODELS: dict[str, type[BaseModel]] = {
    "pos": PosRequest,
    "polarity": PolarityRequest,
    "detect": DetectRequest,
    "qa": QARequest,
}

# Lines per chunk: the batches are sorted within a chunk, so a larger one pads less, and it is
# all in memory at once (the lines, their tokens, their answers).
DEFAULT_CHUNK_LINES = 4096
# Offline work has no deadline; the work items still carry one (far away).
_NO_DEADLINE_S = 365 * 86400.0

Outputs = list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class LineError:
    """What the API would answer one item with instead of a result."""

    status: int
    code: str
    message: str
    limit: Limit | None = None


@dataclass
class Stats:
    lines: int = 0
    items: int = 0  # non-blank lines
    errors: int = 0
    batches: int = 0
    evals: int = 0  # --explain: model evaluations the explanations took
    real_tokens: int = 0
    padded_tokens: int = 0  # what the session computed (the CUDA shape grid included)
    first_error: tuple[int, LineError] | None = None

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


@dataclass
class _Chunk:
    """One chunk on its way: answers known so far, the rest waiting for their batches."""

    numbers: list[int]  # 1-based input line numbers
    answers: list[str | LineError | None]
    prepared: list[tuple[int, Prepared]] = field(default_factory=list)
    runs: list[tuple[list[WorkItem], Future[list[Any]]]] = field(default_factory=list)
    failed: bool = False  # a line refused before inference (with fail_fast: the last line)

    def cut(self, k: int) -> None:
        """Keep the lines up to ``k``, the failed line (--fail-fast): none after it runs."""
        self.failed = True
        del self.numbers[k + 1 :], self.answers[k + 1 :]
        self.prepared = [(j, p) for j, p in self.prepared if j < k]


def parse_line(raw: bytes, model: type[BaseModel]) -> BaseModel | LineError:
    """``raw`` (one line, no newline) as a request body of ``model``, or the API's error for
    it: FastAPI's json.loads of the bytes, then the route's model."""
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        err = {"type": "json_invalid", "loc": ("body", e.pos), "ctx": {"error": e.msg}}
        return LineError(*validation_error([err]))
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        return LineError(*body_parse_error(e))
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        return LineError(*validation_error([dict(err) for err in e.errors()]))


def error_line(number: int, err: LineError) -> str:
    """The output line of a failed input line: the API's error body, plus where it was."""
    body = {
        "line": number,
        "status": err.status,
        **error_body(err.code, err.message, limit=err.limit),
    }
    return json.dumps(body, ensure_ascii=False)


class BulkPredictor:
    """Answers chunks of JSON Lines with one model's task and runner."""

    def __init__(self, task: Task, runner: ModelRunner, policy: BatchPolicy) -> None:
        self.task = task
        too_large = BodyTooLarge(task.settings.max_body_bytes)
        self.too_large = LineError(
            too_large.status_code, too_large.code, too_large.detail, too_large.limit
        )
        self.runner = runner
        self.policy = policy
        self.item_model = ITEM_MODELS[task.task]
        self.stats = Stats()
        # As many batches at once as the service runs for this model (its provider's
        # NLPSERVE_INFERENCE_THREADS, each with its share of the cores).
        self.executor = ThreadPoolExecutor(
            max(1, runner.batches_at_once), thread_name_prefix=f"predict-{runner.name}"
        )

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ one line
    def parse(self, raw: bytes) -> BaseModel | LineError:
        return parse_line(raw, self.item_model)

    # ------------------------------------------------------------------ one chunk
    def start(self, lines: Sequence[tuple[int, bytes | None]], fail_fast: bool = False) -> _Chunk:
        """Parse and tokenize ``lines`` ((line number, bytes) pairs; None: a line over the
        body limit) and hand their batches to the model's threads; :meth:`finish` collects
        the answers. With ``fail_fast``, the chunk ends at its first line refused before
        inference (``failed``): the lines after it are neither tokenized nor run."""
        chunk = _Chunk([n for n, _ in lines], [None] * len(lines))
        todo: list[tuple[int, BaseModel]] = []
        for k, (_, raw) in enumerate(lines):
            if raw is None:
                chunk.answers[k] = self.too_large
            elif not raw.strip():
                chunk.answers[k] = ""  # a blank line stays blank: output line N answers input N
                continue
            elif isinstance(parsed := self.parse(raw), LineError):
                chunk.answers[k] = parsed
            else:
                todo.append((k, parsed))
                continue
            if fail_fast:
                chunk.cut(k)
                break
        deadline = time.monotonic() + _NO_DEADLINE_S
        first_refused: int | None = None
        for k, result in self._prepare(todo, deadline):
            if isinstance(result, InputError):
                chunk.answers[k] = LineError(
                    result.status_code, result.code, result.message, Limit.of(result)
                )
                first_refused = k if first_refused is None else min(first_refused, k)
            else:
                chunk.prepared.append((k, result))
        if fail_fast and first_refused is not None:
            chunk.cut(first_refused)
        flat = [it for _, p in chunk.prepared for it in p.items]
        for batch in sorted_batches(flat, self.policy.max_batch_size, self.policy.max_batch_tokens):
            rows, width = self.runner.padded_shape(len(batch), max(it.length for it in batch))
            self.stats.batches += 1
            self.stats.real_tokens += sum(it.length for it in batch)
            self.stats.padded_tokens += rows * width
            chunk.runs.append(
                (batch, self.executor.submit(run_batch_isolating, self.runner, batch))
            )
        return chunk

    def _prepare(
        self, todo: list[tuple[int, BaseModel]], deadline: float
    ) -> Iterator[tuple[int, Prepared | InputError]]:
        """Each request's :class:`Prepared`, or the InputError the API would answer it alone
        with. Tokenized in one call per group (tokenizers batch-encode fast); a group that
        fails is halved until the failing item is alone, so its message is the one of a
        single-item request (no ``inputs[i]:`` prefix)."""
        ok: list[tuple[int, BaseModel]] = []
        for k, req in todo:
            try:
                self.task.check_limits([req])  # NLPSERVE_MAX_TEXT_CHARS, as the API does first
            except InputError as e:
                yield k, e
            else:
                ok.append((k, req))
        groups = [ok] if ok else []
        while groups:
            group = groups.pop()
            try:
                prepared = self.task.prepare([r for _, r in group], deadline, "predict", False)
            except InputError as e:
                if len(group) == 1:
                    yield group[0][0], e
                else:
                    half = len(group) // 2
                    groups += [group[half:], group[:half]]
                continue
            for (k, _), p in zip(group, prepared, strict=True):
                try:
                    check_sequences(self.task, len(p.items))
                except InputError as e:
                    yield k, e
                else:
                    yield k, p

    def finish(self, chunk: _Chunk) -> list[tuple[int, str | LineError]]:
        """The chunk's answers, (line number, output line or error), in input order (waits
        for its batches)."""
        outputs: dict[int, dict[str, np.ndarray] | Exception] = {}
        for batch, fut in chunk.runs:
            for it, res in zip(batch, fut.result(), strict=True):
                outputs[id(it)] = res
        for k, p in chunk.prepared:
            got = [outputs[id(it)] for it in p.items]
            failed = next((r for r in got if isinstance(r, Exception)), None)
            if failed is not None:  # the in-process queue's InferenceFailedError, as a line
                msg = f"the model could not process this input: {failed}"
                chunk.answers[k] = LineError(422, "inference_failed", msg)
                continue
            try:
                result = self.task.decode(p, got)  # type: ignore[arg-type]
            except InputError as e:
                chunk.answers[k] = LineError(e.status_code, e.code, e.message, Limit.of(e))
                continue
            chunk.answers[k] = json.dumps(result.model_dump(), ensure_ascii=False)
        done: list[tuple[int, str | LineError]] = []
        for number, answer in zip(chunk.numbers, chunk.answers, strict=True):
            assert answer is not None, f"line {number} was never answered"
            done.append((number, answer))
        return done


# How much of a line over the body limit is read at a time, to skip it.
_SKIP_BYTES = 1 << 16


def read_lines(stream: IO[bytes], max_bytes: int) -> Iterator[bytes | None]:
    """Each line without its end (LF or CRLF; the last may have none), or None for one over
    ``max_bytes`` (NLPSERVE_MAX_BODY_BYTES, as /v1 refuses such a body 413): that one is
    skipped a piece at a time, never held whole (a file without newlines is one line)."""
    while raw := stream.readline(max_bytes + 2):  # + room for its CRLF
        if raw.endswith(b"\n") or len(raw) < max_bytes + 2:  # all of it (the last: EOF)
            line = raw.rstrip(b"\r\n")
            yield line if len(line) <= max_bytes else None
            continue
        while (rest := stream.readline(_SKIP_BYTES)) and not rest.endswith(b"\n"):
            pass
        yield None


def read_chunks(
    stream: IO[bytes], chunk_lines: int, max_bytes: int
) -> Iterator[list[tuple[int, bytes | None]]]:
    """(line number, :func:`read_lines`' line) pairs, ``chunk_lines`` at a time."""
    numbered = enumerate(read_lines(stream, max_bytes), start=1)
    while chunk := list(islice(numbered, chunk_lines)):
        yield chunk


class Progress:
    """One status line on stderr, rewritten at most twice a second (no dependency: the
    service's installs have neither tqdm nor a promise of rich). With the input's size known
    (a regular file), it says how far through the file the run is."""

    def __init__(self, enabled: bool, total_bytes: int | None, out: IO[str] = sys.stderr) -> None:
        self.enabled = enabled
        self.total = total_bytes
        self.out = out
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, stats: Stats, done_bytes: int | None, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self._last < 0.5):
            return
        self._last = now
        rate = stats.items / max(now - self.t0, 1e-9)
        where = ""
        if self.total and done_bytes is not None:
            where = f"{100 * min(done_bytes, self.total) / self.total:5.1f}% "
        # explanations run at a few items/s or less: a whole number would read 0
        shown = f"{rate:.0f}" if rate >= 10 else f"{rate:.2f}"
        self.out.write(f"\r{where}{stats.items} items, {stats.errors} errors, {shown} items/s")
        if final:
            self.out.write("\n")
        self.out.flush()


def position(stream: IO[bytes]) -> int | None:
    """How far into ``stream`` reading has got, where that can be told (a regular file)."""
    try:
        return stream.tell()
    except (OSError, ValueError):
        return None


def input_size(stream: IO[bytes]) -> int | None:
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return st.st_size if st.st_size > 0 and not os.isatty(stream.fileno()) else None


def predict_stream(
    predictor: BulkPredictor,
    inp: IO[bytes],
    out: IO[str],
    *,
    chunk_lines: int = DEFAULT_CHUNK_LINES,
    fail_fast: bool = False,
    progress: Progress | None = None,
) -> Stats:
    """Answer every line of ``inp`` into ``out``, a chunk at a time; with ``fail_fast``, stop
    after the first failed line's answer (the lines before it answered, none after)."""
    stats = predictor.stats
    pending: _Chunk | None = None
    for lines in read_chunks(inp, chunk_lines, predictor.task.settings.max_body_bytes):
        started = predictor.start(lines, fail_fast)  # tokenized while the chunk before runs
        if pending is not None:
            if _emit(predictor, pending, out, fail_fast):
                return stats
            if progress is not None:
                progress.update(stats, position(inp))
        pending = started
        if started.failed:  # --fail-fast: it ends at a failed line; read no further
            break
    if pending is not None:
        _emit(predictor, pending, out, fail_fast)
    return stats


def _emit(predictor: BulkPredictor, chunk: _Chunk, out: IO[str], fail_fast: bool) -> bool:
    """Write ``chunk``'s answers; True when ``fail_fast`` stops the run at a failed line."""
    stats = predictor.stats
    lines = []
    stop = False
    for number, answer in predictor.finish(chunk):
        stats.lines += 1
        if isinstance(answer, LineError):
            stats.items += 1
            stats.errors += 1
            if stats.first_error is None:
                stats.first_error = (number, answer)
            lines.append(error_line(number, answer))
            if fail_fast:
                stop = True
                break
        else:
            stats.items += bool(answer)  # a blank line is no item
            lines.append(answer)
    if lines:
        out.write("\n".join(lines) + "\n")
    return stop
