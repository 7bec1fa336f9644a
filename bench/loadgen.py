"""Async HTTP load generator for nlpserve (and for anything speaking its JSON API).

    python -m bench.loadgen --url http://127.0.0.1:8000 --model detector-en \\
        --models models --data ../shared/data --concurrency 32 --requests 1000 \\
        --out bench/results/adhoc

Requests are generated up front (so several servers can be fed exactly the same ones):
token lengths are drawn from a log-normal distribution clipped to the model's max length,
and texts of that many tokens are cut from real-looking sentences (HC3 English answers for
the detector when ``--data`` has them, else a built-in word list). Closed loop (a fixed
number of clients, each sending its next request when the previous one is answered) or open
loop (Poisson arrivals at ``--rate`` requests/s, in-flight requests capped by
``--concurrency``). ``/metrics`` is scraped before and after to get the padding efficiency of
exactly this run (token counters' deltas, and the response cache's hit ratio where it is on).
``--hot-fraction F --hot-set K`` makes repeated traffic: a share F of the requests repeat one
of the first K texts, drawn Zipf-like (``hot_set_requests``), to measure the response cache
(``NLPSERVE_RESPONSE_CACHE_MB``).

Client behaviour is the one we recommend to users (docs/deploy.md): predictions are
idempotent, so a request is retried (``--retries``) on a connection error and on 502/503/429
with exponential backoff, honouring ``Retry-After``: the Python client's own
:class:`service.client.RetryPolicy`, so the two retry alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import gzip
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.fastclient import FastClient, TransportError
from service.client.retry import RetryPolicy

# ---------------------------------------------------------------------------- request shapes

TASK_PATHS = {"detect": "/v1/detect", "polarity": "/v1/polarity", "pos": "/v1/pos", "qa": "/v1/qa"}
MODEL_TASKS = {"detector-en": "detect", "polarity-en": "polarity", "pos-en": "pos", "qa-zh": "qa"}


@dataclass(frozen=True)
class LengthDist:
    """Log-normal token lengths: ``exp(N(ln median, sigma))`` clipped to ``[lo, hi]``."""

    median: float
    sigma: float
    lo: int = 4
    hi: int = 512

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        raw = rng.lognormal(mean=math.log(self.median), sigma=self.sigma, size=n)
        return np.clip(np.rint(raw), self.lo, self.hi).astype(int)


# Defaults fitted by eye to the data each model serves: HC3 English answers have a median of
# ~110 words (~140 WordPiece tokens) and a log-sd of ~0.8; movie-review sentences ~20 words.
DEFAULT_LENGTHS: dict[str, LengthDist] = {
    "detect": LengthDist(median=128, sigma=0.75, lo=8),
    "polarity": LengthDist(median=20, sigma=0.5, lo=3),
    "pos": LengthDist(median=22, sigma=0.5, lo=3),
    "qa": LengthDist(median=220, sigma=0.5, lo=32),  # context tokens (characters for zh)
}


@dataclass
class RequestSpec:
    """One request to send: where, what, and how long it is in model tokens."""

    id: int
    path: str
    payload: dict[str, Any]
    tokens: int


# A small built-in vocabulary: texts look like English prose (function words at realistic
# rates) without needing any dataset on the machine.
_FALLBACK_WORDS = (  # noqa: SIM905 (a word list reads better as prose)
    "the of and to a in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there one all we their can has been if more when "
    "will would who so no model data people time system may other than then its some these "
    "into could two first also after new because most used only over such where through "
    "between both under while many each those however different during without important "
    "research example number results question answer language computer patient treatment "
    "doctor health network learning information process science history government company"
).split()


def _fallback_sentences(rng: random.Random, n: int = 2000) -> list[str]:
    out = []
    for _ in range(n):
        words = [rng.choice(_FALLBACK_WORDS) for _ in range(rng.randint(6, 24))]
        out.append(" ".join(words).capitalize() + ".")
    return out


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")


def hc3_sentences(data_dir: Path, lang: str = "en", limit: int = 50_000) -> list[str]:
    """Sentences of HC3 answers (human and ChatGPT alike) under ``data_dir/hc3/<lang>``."""
    out: list[str] = []
    for path in sorted(glob.glob(str(data_dir / "hc3" / lang / "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                for key in ("human_answers", "chatgpt_answers"):
                    for ans in row.get(key) or []:
                        if not ans:  # the README lists empty/null answers: skip them
                            continue
                        out.extend(s.strip() for s in _SENT_SPLIT.split(ans) if len(s) > 20)
                if len(out) >= limit:
                    return out
    return out


class TokenCounter:
    """Cuts text to an exact number of model tokens when the model's tokenizer is at hand,
    else approximates with whitespace words (1 word ~ 1.3 WordPiece tokens)."""

    def __init__(self, tokenizer_file: Path | None, word_level: bool) -> None:
        self.word_level = word_level
        self.tok = None
        if tokenizer_file is not None and tokenizer_file.is_file() and not word_level:
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(tokenizer_file))
            self.tok.no_padding()
            self.tok.no_truncation()

    def cut(self, text: str, n_tokens: int) -> tuple[str, int]:
        """``text`` cut to at most ``n_tokens`` model tokens (specials included)."""
        if self.word_level:
            words = text.split()[:n_tokens]
            return " ".join(words), len(words)
        if self.tok is None:
            words = text.split()[: max(1, round((n_tokens - 2) / 1.3))]
            return " ".join(words), round(len(words) * 1.3) + 2
        enc = self.tok.encode(text, add_special_tokens=False)
        keep = max(1, n_tokens - 2)  # [CLS] ... [SEP]
        if len(enc.ids) <= keep:
            return text, len(enc.ids) + 2
        end = enc.offsets[keep - 1][1]
        return text[:end], keep + 2


def model_folder_problem(models_dir: Path, model: str) -> str | None:
    """Why ``models_dir`` holds no version of ``model`` (``<model>/<version>/manifest.json``),
    naming what is there instead; None when it holds one. For one-line command-line errors."""
    if not models_dir.is_dir():
        where = "" if models_dir.is_absolute() else f" (relative to {Path.cwd()})"
        return f"--models {models_dir}: no such folder{where}"
    found = sorted(
        d.name
        for d in models_dir.iterdir()
        if d.is_dir() and any((v / "manifest.json").is_file() for v in d.iterdir())
    )
    there = f"models there: {', '.join(found)}" if found else "it holds no <model>/<version>/"
    if model not in found:
        return f"--model {model}: no {models_dir / model}/<version>/manifest.json ({there})"
    return None


def _model_files(models_dir: Path | None, model: str) -> tuple[Path | None, int | None]:
    """(tokenizer.json, max_length) of the newest version of ``model``, when present."""
    if models_dir is None or not (models_dir / model).is_dir():
        return None, None
    versions = [p for p in (models_dir / model).iterdir() if (p / "manifest.json").is_file()]
    if not versions:
        return None, None
    newest = max(versions, key=lambda p: (p.name.isdigit(), int(p.name) if p.name.isdigit() else 0))
    manifest = json.loads((newest / "manifest.json").read_text())
    tok = newest / manifest.get("preprocessing", {}).get("tokenizer_file", "tokenizer.json")
    return tok, int(manifest["max_length"])


def build_requests(
    model: str,
    n: int,
    *,
    models_dir: Path | None = None,
    data_dir: Path | None = None,
    lengths: LengthDist | None = None,
    seed: int = 13,
) -> list[RequestSpec]:
    """``n`` requests for ``model`` with token lengths drawn from ``lengths``."""
    task = MODEL_TASKS.get(model, model)
    if task not in TASK_PATHS:
        raise ValueError(f"unknown model/task {model!r}; one of {sorted(MODEL_TASKS)}")
    tok_file, max_len = _model_files(models_dir, model)
    dist = lengths or DEFAULT_LENGTHS[task]
    if max_len is not None:
        # A model trained with a short max_length would see most default-length texts cut
        # to the same length; keep the median at most half the max so the mix stays mixed
        # (with sigma 0.75, ~18% of requests still reach the max and are truncated).
        median = dist.median if lengths is not None else min(dist.median, max_len / 2)
        dist = LengthDist(median, dist.sigma, min(dist.lo, max_len), min(dist.hi, max_len))
    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    targets = dist.sample(n, rng)

    if task == "qa":
        return _qa_requests(targets, data_dir, prng)

    sentences: list[str] = []
    if task == "detect" and data_dir is not None:
        sentences = hc3_sentences(data_dir)
    if not sentences:
        sentences = _fallback_sentences(prng)
    counter = TokenCounter(tok_file, word_level=task in ("pos", "polarity"))
    out = []
    for i, target in enumerate(targets):
        # Enough consecutive-looking sentences to exceed the target, then cut exactly.
        parts: list[str] = []
        words = 0
        while words < target * 1.2 + 4:
            s = prng.choice(sentences)
            parts.append(s)
            words += len(s.split())
        text, ntok = counter.cut(" ".join(parts), int(target))
        payload = {"text": text}
        out.append(RequestSpec(i, TASK_PATHS[task], payload, ntok))
    return out


def _qa_requests(
    targets: np.ndarray, data_dir: Path | None, rng: random.Random
) -> list[RequestSpec]:
    """CMRC 2018 (question, context) pairs, contexts cut to the target character length."""
    pairs: list[tuple[str, str]] = []
    if data_dir is not None:
        path = data_dir / "cmrc2018" / "cmrc2018_dev.json"
        if path.is_file():
            for art in json.loads(path.read_text(encoding="utf-8"))["data"]:
                for para in art["paragraphs"]:
                    for qa in para["qas"]:
                        pairs.append((qa["question"], para["context"]))
    if not pairs:
        ctx = "北京是中华人民共和国的首都，也是全国的政治、文化中心。" * 20
        pairs = [("中国的首都是哪里？", ctx)]
    out = []
    for i, target in enumerate(targets):
        q, c = rng.choice(pairs)
        while len(c) < target:
            c = c + c
        out.append(
            RequestSpec(i, TASK_PATHS["qa"], {"question": q, "context": c[:target]}, int(target))
        )
    return out


def hot_set_requests(
    specs: Sequence[RequestSpec],
    fraction: float,
    hot_set: int,
    *,
    seed: int = 13,
    zipf_s: float = 1.0,
) -> list[RequestSpec]:
    """Repeated traffic: ``fraction`` of the requests, at random positions, are replaced by a
    copy of one of the first ``hot_set`` requests, drawn Zipf-like (rank k with weight
    ``1 / k**zipf_s``: a few texts very often, most of the set now and then), as popular
    items, retries and one headline sent by many services repeat in real traffic. The rest
    keep their (practically unique) texts. Ids stay the positions."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"hot fraction {fraction}: not within [0, 1]")
    if fraction == 0.0:
        return list(specs)
    if not 1 <= hot_set <= len(specs):
        raise ValueError(f"hot set {hot_set}: between 1 and the {len(specs)} requests")
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, hot_set + 1) ** zipf_s
    hot_at = rng.random(len(specs)) < fraction
    picks = rng.choice(hot_set, size=len(specs), p=weights / weights.sum())
    out = []
    for i, spec in enumerate(specs):
        src = specs[int(picks[i])] if hot_at[i] else spec
        out.append(RequestSpec(i, src.path, src.payload, src.tokens))
    return out


def save_requests(specs: Sequence[RequestSpec], path: Path) -> None:
    """JSON lines; gzip-compressed when ``path`` ends in ``.gz`` (they travel to the GPU
    machine, where every MiB counts)."""
    text = "\n".join(json.dumps(asdict(s), ensure_ascii=False) for s in specs) + "\n"
    if path.suffix == ".gz":
        # mtime 0: the same requests give the same bytes
        path.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    else:
        path.write_text(text, encoding="utf-8")


def load_requests(path: Path) -> list[RequestSpec]:
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    return [RequestSpec(**json.loads(line)) for line in text.splitlines() if line]


# ---------------------------------------------------------------------------- /metrics


def scrape_metrics(urls: Iterable[str], timeout: float = 5.0) -> dict[tuple[str, tuple], float]:
    """Every sample of every ``urls`` Prometheus endpoint, summed across endpoints."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple], float] = {}
    for url in urls:
        try:
            text = httpx.get(url, timeout=timeout).text
        except httpx.HTTPError:
            continue
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                out[key] = out.get(key, 0.0) + float(s.value)
    return out


def _sum(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return sum(
        v
        for (n, lab), v in samples.items()
        if n == name and all(dict(lab).get(k) == want for k, want in labels.items())
    )


def metrics_delta(
    before: dict[tuple[str, tuple], float], after: dict[tuple[str, tuple], float], model: str
) -> dict[str, float | None]:
    """Padding efficiency and mean batch size of the traffic between two scrapes.

    Efficiency is traffic-weighted (sum of real tokens / sum of padded tokens over every
    batch), from ``nlpserve_batch_tokens_total``; the per-batch histogram would weight a
    batch of 1 like a batch of 32.
    """

    def d(name: str, **labels: str) -> float:
        return _sum(after, name, model=model, **labels) - _sum(before, name, model=model, **labels)

    real = d("nlpserve_batch_tokens_total", kind="real")
    padded = d("nlpserve_batch_tokens_total", kind="padded")
    batches = d("nlpserve_batch_size_count")
    seqs = d("nlpserve_batch_size_sum")
    # The response cache answers items before any batch: its share, where it is on.
    hits = d("nlpserve_response_cache_hits_total")
    looked_up = hits + d("nlpserve_response_cache_misses_total")
    return {
        "padding_efficiency": real / padded if padded > 0 else None,
        "mean_batch_size": seqs / batches if batches > 0 else None,
        "batches": batches or None,
        "real_tokens": real or None,
        "cache_hit_ratio": hits / looked_up if looked_up > 0 else None,
    }


# ---------------------------------------------------------------------------- sending


@dataclass
class Result:
    id: int
    status: int  # HTTP status; 0 = no response (connection error, timeout)
    latency_s: float  # first send to final answer, retries included
    start_s: float  # relative to the run start
    attempts: int = 1
    error: str | None = None
    body: dict[str, Any] | None = None
    # nlpserve's Server-Timing of the answer, ms by name (tokenize, queue, inference)
    server_ms: dict[str, float] | None = None


def parse_server_timing(header: str | None) -> dict[str, float] | None:
    """``name;dur=ms, ...`` as {name: ms}; None without the header (other servers)."""
    if not header:
        return None
    out = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur":
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
    return out or None


# (path, body) -> (status, headers with lower-cased names, content); raises TransportError.
Poster = Callable[[str, bytes], Awaitable[tuple[int, dict[str, str], bytes]]]


async def send_one(
    post: Poster,
    spec: RequestSpec,
    body: bytes,
    t0: float,
    policy: RetryPolicy,
    keep_body: bool = True,
) -> Result:
    start = time.perf_counter()
    attempt = 0
    while True:
        status, error, parsed, retry_after, timing = 0, None, None, None, None
        try:
            status, headers, content = await post(spec.path, body)
            retry_after = headers.get("retry-after")
            timing = parse_server_timing(headers.get("server-timing"))
            if keep_body or status >= 400:
                try:
                    parsed = json.loads(content)
                except ValueError:
                    parsed = {"raw": content[:200].decode(errors="replace")}
        except (TransportError, httpx.TransportError) as e:  # refused, reset, timeout...
            error = str(e) or type(e).__name__
        elapsed = time.perf_counter() - start
        if (wait := policy.next_delay(attempt, status or None, retry_after, elapsed)) is None:
            break
        await asyncio.sleep(wait)
        attempt += 1
    end = time.perf_counter()
    return Result(spec.id, status, end - start, start - t0, attempt + 1, error, parsed, timing)


@contextlib.asynccontextmanager
async def open_poster(
    base_url: str, concurrency: int, timeout_s: float, headers: dict[str, str] | None,
    client: str = "fast",
) -> AsyncIterator[Poster]:  # fmt: skip
    """A POST function over persistent connections: the lean client (default; see
    bench/fastclient.py for why) or httpx (``client="httpx"``)."""
    if client == "fast":
        async with FastClient(base_url, concurrency, timeout_s, headers) as fc:

            async def post_fast(path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
                r = await fc.post(path, body)
                return r.status, r.headers, r.content

            yield post_fast
        return
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=timeout_s, limits=limits, headers=headers
    ) as hc:

        async def post_httpx(path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
            r = await hc.post(path, content=body, headers={"content-type": "application/json"})
            return r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content

        yield post_httpx


async def run_load(
    base_url: str | Sequence[str],
    specs: Sequence[RequestSpec],
    *,
    concurrency: int = 32,
    rate: float | None = None,
    timeout_s: float = 60.0,
    policy: RetryPolicy | None = None,
    headers: dict[str, str] | None = None,
    on_progress: Callable[[int], Any] | None = None,
    keep_body: bool = True,
    seed: int = 0,
    client: str = "fast",
) -> tuple[list[Result], float]:
    """Send every spec; returns the results (in spec order) and the wall time in seconds.

    Closed loop when ``rate`` is None: ``concurrency`` clients, each sending its next
    request as soon as the previous one is answered. Open loop otherwise: Poisson arrivals
    at ``rate``/s, at most ``concurrency`` in flight (arrivals beyond that wait, and their
    latency includes the wait, as a real user's would). Several base URLs (API replicas
    without a gateway) share the clients round-robin, each with its own connections.
    """
    policy = policy or RetryPolicy(retries=1)  # the CLI's --retries default
    results: list[Result | None] = [None] * len(specs)
    bodies = [json.dumps(s.payload, ensure_ascii=False).encode() for s in specs]  # untimed
    done = 0

    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    per_url = -(-concurrency // len(urls))
    async with contextlib.AsyncExitStack() as stack:
        posters = [
            await stack.enter_async_context(open_poster(u, per_url, timeout_s, headers, client))
            for u in urls
        ]
        t0 = time.perf_counter()

        async def record(i: int, r: Result) -> None:
            nonlocal done
            results[i] = r
            done += 1
            if on_progress is not None:
                res = on_progress(done)
                if asyncio.iscoroutine(res):
                    await res

        if rate is None:
            next_index = iter(range(len(specs)))

            async def client_loop(post: Poster) -> None:
                for i in next_index:  # shared iterator: each index is taken exactly once
                    r = await send_one(post, specs[i], bodies[i], t0, policy, keep_body)
                    await record(i, r)

            await asyncio.gather(
                *(client_loop(posters[k % len(posters)]) for k in range(concurrency))
            )
        else:
            sem = asyncio.Semaphore(concurrency)
            rng = random.Random(seed)

            async def fire(i: int, arrival: float) -> None:
                async with sem:
                    post = posters[i % len(posters)]
                    r = await send_one(post, specs[i], bodies[i], t0, policy, keep_body)
                # Open-loop latency counts from the scheduled arrival, not from the send.
                r.latency_s = time.perf_counter() - (t0 + arrival)
                await record(i, r)

            tasks = []
            arrival = 0.0
            for i in range(len(specs)):
                arrival += rng.expovariate(rate)
                delay = t0 + arrival - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(fire(i, arrival)))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return [r for r in results if r is not None], wall


def _client_process(idx: int, urls: list[str], specs: list[RequestSpec], concurrency: int,
                    timeout_s: float, policy: RetryPolicy, keep_body: bool, ready: Any,
                    go: Any, out: Any) -> None:  # fmt: skip
    """One load-generator process of :func:`run_load_procs` (spawned: picklable arguments)."""
    import resource

    ready.put(idx)
    go.wait()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    began = time.time()
    results, _ = asyncio.run(
        run_load(urls, specs, concurrency=concurrency, timeout_s=timeout_s, policy=policy,
                 keep_body=keep_body)
    )  # fmt: skip
    ended = time.time()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    out.put((idx, began, ended, cpu, results))


def run_load_procs(
    base_url: str | Sequence[str],
    specs: Sequence[RequestSpec],
    *,
    processes: int,
    concurrency: int = 32,
    timeout_s: float = 60.0,
    policy: RetryPolicy | None = None,
    keep_body: bool = True,
) -> tuple[list[Result], float, float]:
    """:func:`run_load` (closed loop) spread over ``processes`` client processes.

    One Python process tops out at a few thousand requests/s, less than a GPU server with
    several API replicas can answer: the client would be what is measured. Each process gets
    every ``processes``-th request and its share of the ``concurrency`` clients; all start
    together once every process is up (start-up is not timed). Returns the results in
    request order, the wall time from the first start to the last finish, and the client
    processes' CPU seconds.
    """
    import multiprocessing as mp

    if processes <= 1:
        raise ValueError("run_load_procs needs processes >= 2 (else use run_load)")
    if concurrency < processes:
        raise ValueError(f"concurrency {concurrency} < client processes {processes}")
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    policy = policy or RetryPolicy(retries=1)
    ctx = mp.get_context("spawn")  # not fork: the parent may hold CUDA/ORT thread state
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    shares = [concurrency // processes + (k < concurrency % processes) for k in range(processes)]
    workers = [
        ctx.Process(
            target=_client_process,
            args=(
                k,
                urls[k % len(urls) :] + urls[: k % len(urls)],
                list(specs[k::processes]),
                shares[k],
                timeout_s,
                policy,
                keep_body,
                ready,
                go,
                out,
            ),
            daemon=True,
        )
        for k in range(processes)
    ]
    for w in workers:
        w.start()
    try:
        for _ in workers:
            ready.get(timeout=120)
        go.set()
        # Read before joining: a child blocks on a full pipe until its results are taken.
        got = [out.get(timeout=timeout_s * 4 + len(specs)) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
    t0 = min(g[1] for g in got)
    merged: list[Result] = []
    for _, began, _, _, results in got:
        for r in results:
            r.start_s += began - t0  # onto the common clock
            merged.append(r)
    merged.sort(key=lambda r: r.id)
    wall = max(g[2] for g in got) - t0
    return merged, wall, sum(g[3] for g in got)


# ---------------------------------------------------------------------------- summaries


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if len(values) else None


def summarize(
    name: str,
    results: Sequence[Result],
    wall_s: float,
    specs: Sequence[RequestSpec],
    metrics: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """Throughput, latency percentiles (successful requests), errors, padding efficiency."""
    ok = [r for r in results if r.status == 200]
    lat = [r.latency_s for r in ok]
    statuses = Counter(str(r.status) for r in results if r.status != 200)
    tokens = sum(specs[r.id].tokens for r in ok)
    out: dict[str, Any] = {
        "name": name,
        "requests": len(results),
        "ok": len(ok),
        "errors": dict(statuses),
        "retried": sum(1 for r in results if r.attempts > 1),
        "wall_s": wall_s,
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else None,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "latency_ms": {
            "p50": _ms(percentile(lat, 50)),
            "p95": _ms(percentile(lat, 95)),
            "p99": _ms(percentile(lat, 99)),
            "mean": _ms(float(np.mean(lat))) if lat else None,
            "max": _ms(max(lat)) if lat else None,
        },
    }
    if timed := [r.server_ms for r in ok if r.server_ms]:
        # Means add up: the mean latency is their sum plus the rest (HTTP, JSON, validation,
        # the event loop's turns, the client itself).
        names = list(dict.fromkeys(k for t in timed for k in t))
        split = {k: round(float(np.mean([t.get(k, 0.0) for t in timed])), 3) for k in names}
        if len(timed) == len(ok) and lat:
            split["rest"] = round(1000.0 * float(np.mean(lat)) - sum(split.values()), 3)
        out["server_ms_mean"] = split
    out.update(metrics or {})
    return out


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000.0 * x, 2)


def latencies(results: Sequence[Result]) -> list[float]:
    return [r.latency_s for r in results if r.status == 200]


# ---------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="detector-en", help=f"one of {sorted(MODEL_TASKS)}")
    p.add_argument("--models", type=Path, default=Path("models"), help="for tokenizer/max_length")
    p.add_argument("--data", type=Path, default=None, help="data root (HC3, CMRC) for texts")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rate", type=float, default=None, help="open loop: arrivals per second")
    p.add_argument("--median-tokens", type=float, default=None)
    p.add_argument("--sigma", type=float, default=None)
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument(
        "--metrics-url",
        action="append",
        default=None,
        help="Prometheus endpoint(s) to diff (default: URL/metrics; add workers')",
    )
    p.add_argument("--seed", type=int, default=13)
    p.add_argument(
        "--hot-fraction",
        type=float,
        default=0.0,
        help="share of requests repeating a text of the hot set (default: 0)",
    )
    p.add_argument(
        "--hot-set",
        type=int,
        default=100,
        help="the hot set: that many texts, drawn Zipf-like (default: 100)",
    )
    p.add_argument("--client", choices=["fast", "httpx"], default="fast")
    p.add_argument("--out", type=Path, default=None, help="write OUT.json, OUT.md, OUT.png")
    args = p.parse_args(argv)  # fmt: skip

    task = MODEL_TASKS.get(args.model, args.model)
    dist: LengthDist | None = None  # None: build_requests' default, fitted to max_length
    if args.median_tokens or args.sigma:
        base = DEFAULT_LENGTHS[task]
        dist = LengthDist(
            args.median_tokens or base.median, args.sigma or base.sigma, base.lo, base.hi
        )
    specs = build_requests(
        args.model, args.requests, models_dir=args.models, data_dir=args.data, lengths=dist,
        seed=args.seed,
    )  # fmt: skip
    specs = hot_set_requests(specs, args.hot_fraction, args.hot_set, seed=args.seed)
    metrics_urls = args.metrics_url or [args.url.rstrip("/") + "/metrics"]
    before = scrape_metrics(metrics_urls)
    results, wall = asyncio.run(
        run_load(
            args.url, specs, concurrency=args.concurrency, rate=args.rate, timeout_s=args.timeout,
            policy=RetryPolicy(retries=args.retries), keep_body=False, client=args.client,
        )
    )  # fmt: skip
    after = scrape_metrics(metrics_urls)
    summary = summarize(args.url, results, wall, specs, metrics_delta(before, after, args.model))
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        from bench.report import write_reports

        write_reports(
            args.out,
            [summary],
            {args.url: latencies(results)},
            meta={"model": args.model, "concurrency": args.concurrency, "rate": args.rate,
                  "requests": args.requests, "hot_fraction": args.hot_fraction,
                  "hot_set": args.hot_set,
                  "lengths": asdict(dist) if dist else "default (bench.loadgen.build_requests)"},
        )  # fmt: skip
    return 0 if all(r.status == 200 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
