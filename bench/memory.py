"""Memory and start-up of nlpserve's processes: what a container limit must hold.

    python -m bench.memory --models models --name memory-cpu-2core
    python -m bench.memory --setups each --derive-variants          # int8 and fp32 per model

Each setup starts real processes (``nlpserve serve``; in Redis mode a private redis-server,
one ``nlpserve serve`` with ``NLPSERVE_QUEUE=redis`` and one ``nlpserve worker``), and a
sampler reads every process's memory from ``/proc/<pid>/smaps_rollup`` about 20 times a
second (``--hz``): RSS, PSS (shared pages split among their users) and USS (private pages:
what killing the process would free). The phases, in order:

- ``start``: from the spawn to ``/readyz`` 200 (the start-up time is reported too);
- ``idle``: ``--idle-s`` seconds with no traffic (the steady state);
- ``burst``: ``--concurrency`` clients per loaded model, closed loop for ``--burst-s``
  seconds, each sending the largest request the server accepts: ``NLPSERVE_MAX_BATCH_ITEMS``
  items of the longest texts that fit ``NLPSERVE_MAX_BODY_BYTES`` (QA: Chinese contexts up to
  ``NLPSERVE_MAX_REQUEST_SEQUENCES`` windows; POS: sentences of the model's ``max_length``
  words). The sizes start at the limits and shrink until the server answers 200 (a 413/422
  is a body the server refuses before it costs memory); the report gives what was sent;
- ``explain``: ``--explain-concurrency`` clients per explainable model (detector, polarity)
  sending ``/v1/*/explain`` with a text of ``NLPSERVE_MAX_TEXT_CHARS`` characters and
  ``max_evals`` at ``NLPSERVE_EXPLAIN_MAX_EVALS_LIMIT``, for ``--explain-s`` seconds;
- ``after``: ``--after-s`` seconds idle again (what the process keeps after a burst).

Requests still running ``--drain-s`` after a phase's end are abandoned (the server finishes
or times them out during the next phase). ``--startup-only`` runs the start and idle phases
alone (no request); with it, ``--rounds N`` starts every setup N times, round by round, and
``--a-source DIR`` runs each setup twice a round, once on another source tree's ``service``
(A, first on ``PYTHONPATH``) and once on this one (B), in the order A B, B A, ... The report
then gives, per setup and process, the median start-up and idle RSS with their range:

    git worktree add /tmp/old <commit>
    python -m bench.memory --setups all,redis --startup-only --rounds 5 --a-source /tmp/old

The setups (``--setups``): ``all`` (in-process, every model), ``each`` (in-process, one model
at a time, once per variant in ``--variants`` the model has; ``--derive-variants`` makes the
fp32 file of an int8-only BERT version in a private copy, ``bench/variants.py``), ``redis``
(the three processes above, every model).
Writes ``<out>/<name>.json`` and ``.md``. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict
from unittest import mock

from bench import procs
from bench.cpu_account import process_cpu
from bench.fastclient import FastClient, TransportError
from bench.loadgen import model_folder_problem
from bench.overload import WORDS, ZH
from bench.report import machine_description
from service.config import Settings
from service.repository import discover_models

RESULTS_DIR = procs.REPO_ROOT / "bench" / "results"
PATHS = {"detect": "/v1/detect", "polarity": "/v1/polarity", "pos": "/v1/pos", "qa": "/v1/qa"}
EXPLAINABLE = ("detect", "polarity")
EXPLAIN_TEXTS = 64
PHASES = ("start", "idle", "burst", "explain", "after")

# ---------------------------------------------------------------------------- /proc


class Memory(TypedDict):
    rss: float
    pss: float | None  # None where only RSS could be read
    uss: float | None


def read_memory(pid: int) -> Memory | None:
    """RSS, PSS and USS of ``pid`` in MiB (``smaps_rollup``; RSS alone from ``status`` where
    that file cannot be read); None once the process is gone."""
    kb: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if rest.strip().endswith("kB"):
                    kb[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return None
    except (OSError, ValueError):
        kb = {}
    if "Rss" not in kb:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return {"rss": int(line.split()[1]) / 1024, "pss": None, "uss": None}
        except OSError:
            return None
        return None
    uss = kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)
    return {"rss": kb["Rss"] / 1024, "pss": kb.get("Pss", 0) / 1024, "uss": uss / 1024}


@dataclass
class Sample:
    t: float
    phase: str
    proc: str
    rss: float
    pss: float | None
    uss: float | None


class Sampler:
    """Reads every watched process's memory at ``hz`` in a thread, each sample tagged with the
    phase that was current when it was taken."""

    def __init__(self, hz: float = 20.0) -> None:
        self.interval = 1.0 / hz
        self.pids: dict[str, int] = {}
        self.phase = "start"
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def _loop(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            for name, pid in list(self.pids.items()):
                m = read_memory(pid)
                if m is not None:
                    self.samples.append(
                        Sample(now - t0, self.phase, name, m["rss"], m["pss"], m["uss"])
                    )
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - now)))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        self.phase = phase
        yield


def _stats(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return round(max(vals), 1), round(statistics.median(vals), 1)


def summarize_samples(samples: Sequence[Sample]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per process, per phase: peak and median of RSS, PSS and USS (MiB), and the count."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.proc, s.phase), []).append(s)
    for (proc, phase), group in groups.items():
        row: dict[str, Any] = {"samples": len(group)}
        for key in ("rss", "pss", "uss"):
            peak, median = _stats([getattr(s, key) for s in group])
            row[f"{key}_peak_mib"], row[f"{key}_median_mib"] = peak, median
        out.setdefault(proc, {})[phase] = row
    for phases in out.values():
        peaks = [p["rss_peak_mib"] for p in phases.values() if p["rss_peak_mib"] is not None]
        phases["overall"] = {"rss_peak_mib": max(peaks) if peaks else None}
    return out


# ---------------------------------------------------------------------------- request bodies


@dataclass
class Limits:
    """The request limits of the server under test (its ``Settings``)."""

    max_body_bytes: int
    max_text_chars: int
    max_batch_items: int
    max_request_sequences: int
    explain_max_evals_limit: int

    @classmethod
    def of(cls, s: Settings) -> Limits:
        return cls(s.max_body_bytes, s.max_text_chars, s.max_batch_items,
                   s.max_request_sequences, s.explain_max_evals_limit)  # fmt: skip


def english(chars: int, rng: random.Random) -> str:
    words: list[str] = []
    n = 0
    while n < chars:
        w = rng.choice(WORDS)
        words.append(w)
        n += len(w) + 1
    return " ".join(words)[:chars].strip()


def chinese(chars: int) -> str:
    return (ZH * (chars // len(ZH) + 1))[:chars]


def body(task: str, items: int, size: int, rng: random.Random) -> bytes:
    """A batch request of ``items`` items; ``size`` is characters per text (QA: per context),
    or words per sentence for POS (a POS sentence over ``max_length`` tokens is refused)."""
    if task == "qa":
        one = [{"question": "长城有多长？", "context": chinese(size)} for _ in range(items)]
    elif task == "pos":
        one = [{"text": " ".join(rng.choice(WORDS) for _ in range(size))} for _ in range(items)]
    else:
        one = [{"text": english(size, rng)} for _ in range(items)]
    return json.dumps({"inputs": one}, ensure_ascii=False).encode()


def first_size(task: str, limits: Limits, max_length: int) -> int:
    """The size to try first: the text limit, cut so the body fits ``max_body_bytes``."""
    if task == "pos":
        return max_length
    per_char = 3 if task == "qa" else 1  # UTF-8 bytes of the Chinese contexts
    room = int(0.97 * limits.max_body_bytes) // limits.max_batch_items // per_char - 60
    return max(1, min(limits.max_text_chars, room))


PROBE_DEADLINE_MS = 2000


async def largest_accepted(
    client: FastClient, task: str, limits: Limits, max_length: int, rng: random.Random,
    tries: int = 40,
) -> tuple[bytes, dict[str, Any]]:  # fmt: skip
    """The biggest body the server admits: from :func:`first_size`, shrinking by 15% on each
    4xx other than 429 (a refused body costs no memory, so it would measure nothing). The
    probes carry a short ``X-Deadline-Ms``: a 504 says the body was admitted and queued,
    without waiting for a 512-window QA request to run (~30 s on 2 loaded cores)."""
    size = first_size(task, limits, max_length)
    last: tuple[int, str] = (0, "")
    for _ in range(tries):
        data = body(task, limits.max_batch_items, size, rng)
        r = await client.post(PATHS[task], data)
        if r.status < 400 or r.status >= 500:
            info = {"items": limits.max_batch_items, "size": size, "bytes": len(data),
                    "unit": "words" if task == "pos" else "chars"}  # fmt: skip
            return data, info
        last = (r.status, r.content[:200].decode(errors="replace"))
        if r.status == 429:
            await asyncio.sleep(0.5)
            continue
        size = max(1, int(size * 0.85))
    raise RuntimeError(f"{task}: no request size was accepted; last answer {last}")


# ---------------------------------------------------------------------------- load


async def closed_loop(
    client: FastClient, path: str, bodies: Sequence[bytes], concurrency: int, seconds: float,
    drain_s: float,
) -> Counter[str]:  # fmt: skip
    """``concurrency`` clients sending ``bodies`` in turn, back to back, for ``seconds``; the
    statuses."""
    statuses: Counter[str] = Counter()
    end = time.monotonic() + seconds
    sent = itertools.count()

    async def one() -> None:
        while time.monotonic() < end:
            try:
                r = await client.post(path, bodies[next(sent) % len(bodies)])
                statuses[str(r.status)] += 1
            except TransportError:
                statuses["transport"] += 1
                await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(one()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=seconds + drain_s)
    for t in pending:  # still waiting for an answer: abandoned
        t.cancel()
    statuses["abandoned"] += len(pending)
    await asyncio.gather(*pending, return_exceptions=True)
    if not statuses["abandoned"]:
        del statuses["abandoned"]
    return statuses


# ---------------------------------------------------------------------------- setups


@dataclass
class Setup:
    name: str
    mode: str  # inprocess | redis
    models_dir: Path
    load: list[str] | None = None  # None: every model
    env: dict[str, str] = field(default_factory=dict)
    source: Path | None = None  # another source tree's `service` (--a-source)
    arm: str | None = None  # "A" (--a-source) or "B" (this tree) when comparing


def _ready_within(proc: procs.Proc, url: str, t0: float, timeout_s: float) -> float:
    """Seconds from ``t0`` to ``url`` answering 200, polled at 20 Hz."""
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        if procs.http_ok(url, timeout=0.5):
            return round(time.monotonic() - t0, 2)
        time.sleep(0.05)
    raise TimeoutError(f"{proc.name}: {url} not ready after {timeout_s:.0f} s:\n{proc.log_tail()}")


def _port(args: argparse.Namespace, k: int) -> int:
    return args.port + k if args.port else procs.free_port()


def start_setup(
    setup: Setup, args: argparse.Namespace, logs: Path, sampler: Sampler, running: list[procs.Proc]
) -> tuple[str, dict[str, float], dict[str, float]]:
    """Start ``setup``'s processes (added to ``running``, watched by ``sampler``); the API's
    URL, each process's start-up time (spawn to /readyz 200) and its CPU seconds by then
    (what its own work cost: less moved by neighbours than the wall clock on a shared
    machine). In Redis mode the worker starts first and the API once the worker is ready:
    each start is timed alone (started together, the API's was read only after the worker's
    wait, and each slowed the other)."""  # fmt: skip
    exe = procs.nlpserve_bin()
    port = _port(args, 0)
    env = {"NLPSERVE_MODEL_DIR": str(setup.models_dir), "NLPSERVE_HOST": "127.0.0.1",
           "NLPSERVE_PORT": str(port), "NLPSERVE_LOAD_MODELS": ",".join(setup.load or []),
           **setup.env}  # fmt: skip
    if setup.source is not None:  # the entry point's sys.path: PYTHONPATH decides the code
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(setup.source), os.environ.get("PYTHONPATH", "")) if p
        )
    started: list[tuple[procs.Proc, float, float]] = []
    if setup.mode == "redis":
        redis, url = procs.start_redis(logs, port=_port(args, 1))
        running.append(redis)
        sampler.watch("redis-server", redis.pid)
        env |= {"NLPSERVE_QUEUE": "redis", "NLPSERVE_REDIS_URL": url}
        mport = _port(args, 2)
        t0 = time.monotonic()
        worker = procs.start("worker", [exe, "worker", "--metrics-port", str(mport)], logs, env)
        running.append(worker)
        sampler.watch("worker", worker.pid)
        wurl = f"http://127.0.0.1:{mport}/readyz"
        secs = _ready_within(worker, wurl, t0, args.ready_timeout_s)
        started.append((worker, secs, round(process_cpu(worker.pid), 2)))
    t0 = time.monotonic()
    api = procs.start("api", [exe, "serve"], logs, env)
    running.append(api)
    sampler.watch("api", api.pid)
    aurl = f"http://127.0.0.1:{port}/readyz"
    secs = _ready_within(api, aurl, t0, args.ready_timeout_s)
    started.append((api, secs, round(process_cpu(api.pid), 2)))
    return (f"http://127.0.0.1:{port}", {p.name: s for p, s, _ in started},
            {p.name: c for p, _, c in started})  # fmt: skip


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


async def _phases(setup: Setup, base: str, args: argparse.Namespace, sampler: Sampler,
                  limits: Limits) -> dict[str, Any]:  # fmt: skip
    rng = random.Random(args.seed)
    models = _get_json(base + "/v1/models")
    models = models.get("models", models) if isinstance(models, dict) else models
    tasks = {m["task"]: m for m in models}
    out: dict[str, Any] = {"models": [{k: m.get(k) for k in ("name", "version", "task",
                                       "variant", "provider")} for m in models]}  # fmt: skip
    conns = max(args.concurrency, args.explain_concurrency) + 2
    async with FastClient(base, max_connections=conns * len(tasks),
                          timeout_s=args.burst_s + args.drain_s + 60) as client:  # fmt: skip
        with sampler.during("idle"):
            await asyncio.sleep(args.idle_s)
        bodies: dict[str, bytes] = {}
        sizes: dict[str, Any] = {}
        headers = {"X-Deadline-Ms": str(PROBE_DEADLINE_MS)}
        async with FastClient(base, max_connections=1, headers=headers) as probe:
            for task, m in tasks.items():
                if task in PATHS:
                    bodies[task], sizes[task] = await largest_accepted(
                        probe, task, limits, int(m.get("max_length") or 128), rng
                    )
        out["burst_requests"] = sizes
        with sampler.during("burst"):
            got = await asyncio.gather(*(
                closed_loop(client, PATHS[t], [b], args.concurrency, args.burst_s, args.drain_s)
                for t, b in bodies.items()
            ))  # fmt: skip
        out["burst_statuses"] = {t: dict(c) for t, c in zip(bodies, got, strict=True)}
        explainable = [t for t in tasks if t in EXPLAINABLE] if args.explain_s > 0 else []
        if explainable:
            evals = args.max_evals or limits.explain_max_evals_limit
            # A text of its own per request: a repeated one is answered from the cache.
            data = [json.dumps({"text": english(limits.max_text_chars, rng), "max_evals": evals})
                    .encode() for _ in range(EXPLAIN_TEXTS)]  # fmt: skip
            out["explain_requests"] = {"chars": limits.max_text_chars, "max_evals": evals}
            with sampler.during("explain"):
                got = await asyncio.gather(*(
                    closed_loop(client, PATHS[t] + "/explain", data, args.explain_concurrency,
                                args.explain_s, args.drain_s)
                    for t in explainable
                ))  # fmt: skip
            out["explain_statuses"] = {t: dict(c) for t, c in zip(explainable, got, strict=True)}
        with sampler.during("after"):
            await asyncio.sleep(args.after_s)
    return out


def tree_commit(tree: Path) -> str:
    """The git commit a source tree is at (a report names no local paths), '+' if modified."""
    try:
        head = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def schedule(setups: Sequence[Setup], args: argparse.Namespace) -> Iterator[tuple[int, Setup]]:
    """(round, setup) in the order they run: every setup each round; with ``--a-source``
    each twice, A B in even rounds and B A in odd ones (the second of a pair may run slower
    whichever it is: a fixed order would charge that to one side)."""
    for r in range(args.rounds):
        for s in setups:
            if args.a_source is None:
                yield r, s
                continue
            a = replace(s, source=args.a_source, arm="A")
            b = replace(s, arm="B")
            for one in (a, b) if r % 2 == 0 else (b, a):
                yield r, one


def server_limits(env: dict[str, str]) -> Limits:
    """The limits the server will apply: its settings read from this environment with ``env``
    over it, as the server reads them (as keyword arguments, a JSON value such as
    NLPSERVE_BUCKETS' was a string where a mapping was due, and the run ended there)."""
    with mock.patch.dict(os.environ, env):  # the environment the server processes get
        return Limits.of(Settings())


def run_setup(setup: Setup, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    limits = server_limits(setup.env)
    running: list[procs.Proc] = []
    result: dict[str, Any] = {"setup": setup.name, "mode": setup.mode, "load": setup.load,
                              "env": setup.env}  # fmt: skip
    if setup.arm is not None:
        result["arm"], result["source"] = setup.arm, tree_commit(setup.source or procs.REPO_ROOT)
    with Sampler(args.hz) as sampler, procs.stopping(running):
        base, startup, cpu = start_setup(setup, args, logs / setup.name.replace(" ", "_"),
                                         sampler, running)  # fmt: skip
        result["startup_s"], result["startup_cpu_s"] = startup, cpu
        if args.startup_only:
            with sampler.during("idle"):
                time.sleep(args.idle_s)
        else:
            result |= asyncio.run(_phases(setup, base, args, sampler, limits))
    result["memory"] = summarize_samples(sampler.samples)
    result["limits"] = vars(limits)
    return result


def _variant_setups(args: argparse.Namespace, models_dir: Path, tmp: Path,
                    notes: list[str]) -> list[Setup]:  # fmt: skip
    """One in-process setup per model and per variant of ``--variants`` it has (or, with
    ``--derive-variants``, can be given)."""
    out = []
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    for entry in discover_models(models_dir):
        m = entry.manifest
        have = {v.precision for v in m.variants.values()}
        folder = models_dir
        if args.derive_variants and set(wanted) - have and m.task in ("detect", "qa"):
            from bench.variants import derive_version

            try:
                _, more = derive_version(entry.path, tmp / "derived", ["fp32"])
            except Exception as e:  # a version the reader cannot rebuild: its own variant only
                notes.append(f"{m.name}: no fp32 derived ({type(e).__name__}: {e})")
            else:
                notes.extend(more)
                folder = tmp / "derived"
                have.add("fp32")
        runs = [v for v in wanted if v in have] or sorted(have)[:1]
        for v in runs:
            env = {"NLPSERVE_VARIANT": v} if len(runs) > 1 or v in wanted else {}
            out.append(Setup(f"{m.name} ({v})", "inprocess", folder, [m.name], env))
    return out


def build_setups(args: argparse.Namespace, tmp: Path, notes: list[str]) -> list[Setup]:
    models_dir = Path(args.models).resolve()
    env = dict(kv.split("=", 1) for kv in args.serve_env)
    out: list[Setup] = []
    for name in [s.strip() for s in args.setups.split(",") if s.strip()]:
        if name == "all":
            out.append(Setup("all models, in-process", "inprocess", models_dir))
        elif name == "each":
            out += _variant_setups(args, models_dir, tmp, notes)
        elif name == "redis":
            out.append(Setup("all models, Redis (1 API, 1 worker)", "redis", models_dir))
    for s in out:
        s.env = {**env, **s.env}
        s.load = s.load or args.load or None
    return [s for s in out if not args.load or set(s.load or ()) <= set(args.load)]


# ---------------------------------------------------------------------------- report


def _mib(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def table(doc: dict[str, Any]) -> list[str]:
    """The report's table, one row per setup and process (docs/deploy.md quotes it)."""
    lines = ["| setup | process | ready s | idle RSS | idle PSS / USS | burst peak RSS "
             "| explain peak RSS | after RSS | peak RSS (any phase) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in doc["results"]:
        for proc, ph in r["memory"].items():
            idle, burst = ph.get("idle", {}), ph.get("burst", {})
            expl, after = ph.get("explain", {}), ph.get("after", {})
            lines.append(
                f"| {r['setup']} | {proc} | {r['startup_s'].get(proc, '–')} "
                f"| {_mib(idle.get('rss_median_mib'))} "
                f"| {_mib(idle.get('pss_median_mib'))} / {_mib(idle.get('uss_median_mib'))} "
                f"| {_mib(burst.get('rss_peak_mib'))} | {_mib(expl.get('rss_peak_mib'))} "
                f"| {_mib(after.get('rss_median_mib'))} "
                f"| **{_mib(ph['overall']['rss_peak_mib'])}** |"
            )
    return lines


def _median_range(values: Sequence[float]) -> str:
    if not values:
        return "–"
    med = statistics.median(values)
    fmt = "{:.2f}" if med < 100 else "{:,.0f}"
    return f"{fmt.format(med)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def rounds_table(doc: dict[str, Any]) -> list[str]:
    """``--rounds``: per setup, arm and process, the median start-up and idle RSS and USS of
    its rounds, with the range; then B/A of the medians where two arms ran."""
    groups: dict[tuple[str, str | None, str], list[dict[str, Any]]] = {}
    for r in doc["results"]:
        for proc, ph in r["memory"].items():
            row = {"ready": r["startup_s"].get(proc), "source": r.get("source"),
                   "cpu": r.get("startup_cpu_s", {}).get(proc),
                   "rss": ph.get("idle", {}).get(
                   "rss_median_mib"), "uss": ph.get("idle", {}).get("uss_median_mib")}  # fmt: skip
            groups.setdefault((r["setup"], r.get("arm"), proc), []).append(row)
    lines = ["| setup | code | process | rounds | ready s, median (range) "
             "| CPU s to ready, median (range) | idle RSS MiB, median (range) "
             "| idle USS MiB, median |", "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    medians: dict[tuple[str, str | None, str], tuple[float | None, ...]] = {}
    for (setup, arm, proc), rows in groups.items():
        ready = [x["ready"] for x in rows if x["ready"] is not None]
        cpu = [x["cpu"] for x in rows if x["cpu"] is not None]
        rss = [x["rss"] for x in rows if x["rss"] is not None]
        uss = [x["uss"] for x in rows if x["uss"] is not None]
        medians[(setup, arm, proc)] = tuple(
            statistics.median(v) if v else None for v in (ready, cpu, rss)
        )
        code = f"{arm} ({rows[0]['source']})" if arm else "this tree"
        uss_median = statistics.median(uss) if uss else None
        lines.append(f"| {setup} | {code} | {proc} | {len(rows)} | {_median_range(ready)} "
                     f"| {_median_range(cpu)} | {_median_range(rss)} "
                     f"| {_mib(uss_median)} |")  # fmt: skip
    ratios = []
    for (setup, arm, proc), b in medians.items():
        a = medians.get((setup, "A", proc))
        if arm != "B" or a is None:
            continue
        cells = [f"{y / x:.2f}" if x and y else "–" for x, y in zip(a, b, strict=True)]
        ratios.append(f"| {setup} | {proc} | {' | '.join(cells)} |")
    if ratios:
        lines += ["", "B/A of the medians:", "",
                  "| setup | process | ready s | CPU s to ready | idle RSS |",
                  "|---|---|---:|---:|---:|", *ratios]  # fmt: skip
    return lines


def markdown(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = ["# nlpserve memory and start-up", ""]
    keys: tuple[str, ...] = (
        "command",
        "when",
        "hz",
        "concurrency",
        "burst_s",
        "explain_concurrency",
        "explain_s",
    )
    if meta.get("startup_only"):  # no load phase ran
        keys = ("command", "when", "hz", "idle_s", "rounds", "a_source")
    for k in keys:
        if meta.get(k) is not None:
            v = meta[k]
            lines.append(f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {v}")
    if doc["meta"].get("rounds", 1) > 1 or doc["meta"].get("a_source"):
        lines += ["", "Start-up: spawn to `/readyz` 200. Idle: the median over the idle "
                  "phase of each round.", "", *rounds_table(doc), ""]  # fmt: skip
        lines += ["## Machine", "", "```json", json.dumps(doc["machine"], indent=2), "```"]
        return "\n".join(lines) + "\n"
    lines += ["", "MiB. Idle: the median over the idle phase; peaks: the highest sample of the "
              "phase (RSS; PSS and USS beside it where /proc gives them).", "",
              *table(doc)]  # fmt: skip
    lines += ["", "## Requests", ""]
    for r in doc["results"]:
        sizes = "; ".join(f"{t}: {s['items']} items × {s['size']} {s['unit']} ({s['bytes']:,} "
                          f"bytes)" for t, s in r.get("burst_requests", {}).items())  # fmt: skip
        lines.append(f"- {r['setup']}: burst {sizes}; statuses {r.get('burst_statuses')}")
        if r.get("explain_requests"):
            lines.append(f"  explain {r['explain_requests']}; statuses "
                         f"{r.get('explain_statuses')}")  # fmt: skip
    if doc.get("notes"):
        lines += ["", *[f"- {n}" for n in doc["notes"]]]
    lines += ["", "## Machine", "", "```json", json.dumps(doc["machine"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def write(doc: dict[str, Any], out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(doc, indent=2) + "\n")
    paths[1].write_text(markdown(doc))
    return paths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.memory", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--models", default="models", help="model repository (default: %(default)s)")
    p.add_argument("--setups", default="all,each,redis",
                   help="comma list of all, each, redis (default: %(default)s)")  # fmt: skip
    p.add_argument("--load", action="append", default=[], metavar="NAME",
                   help="only this model (repeatable; default: every model)")  # fmt: skip
    p.add_argument("--variants", default="int8,fp32",
                   help="`each`: the variants to run per model, where it has them "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--derive-variants", action="store_true",
                   help="make the fp32 file of int8-only BERT versions in a private copy "
                   "(needs the train extra: torch, transformers)")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=8,
                   help="clients per model in the burst (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--burst-s", type=float, default=20.0, help="burst seconds (default: %(default)s)"
    )
    p.add_argument("--explain-concurrency", type=int, default=4,
                   help="clients per explainable model (default: %(default)s)")  # fmt: skip
    p.add_argument("--explain-s", type=float, default=20.0,
                   help="explanation seconds, 0 to skip (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-evals", type=int, default=None,
                   help="max_evals of the explanations (default: the server's limit)")  # fmt: skip
    p.add_argument("--idle-s", type=float, default=5.0, help="idle seconds (default: %(default)s)")
    p.add_argument("--after-s", type=float, default=5.0,
                   help="idle seconds after the load (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--drain-s",
        type=float,
        default=10.0,
        help="how long a phase waits for its requests in flight (default: %(default)s)",
    )
    p.add_argument(
        "--hz", type=float, default=20.0, help="samples per second (default: %(default)s)"
    )
    p.add_argument("--ready-timeout-s", type=float, default=180.0,
                   help="start-up allowed per setup (default: %(default)s)")  # fmt: skip
    p.add_argument("--port", type=int, default=0,
                   help="first of 3 consecutive ports (API, redis-server, worker metrics); "
                   "0: free ones (default)")  # fmt: skip
    p.add_argument("--serve-env", action="append", default=[], metavar="NAME=V",
                   help="an environment variable of every server process, e.g. a NLPSERVE_ "
                   "setting or MALLOC_ARENA_MAX (repeatable)")  # fmt: skip
    p.add_argument("--startup-only", action="store_true",
                   help="only the start and idle phases: no request is sent")  # fmt: skip
    p.add_argument("--rounds", type=int, default=1,
                   help="with --startup-only: start every setup this many times, round by "
                   "round (default: %(default)s)")  # fmt: skip
    p.add_argument("--a-source", type=Path, default=None, metavar="DIR",
                   help="with --startup-only: run each setup on this source tree's code "
                   "too (A, e.g. a git worktree of another commit), alternated with this "
                   "one (B)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS_DIR), help="report folder (default: bench/results)")
    p.add_argument("--name", default="memory-cpu", help="report name (default: %(default)s)")
    args = p.parse_args(argv)
    bad = [kv for kv in args.serve_env if "=" not in kv]
    if bad:
        p.error(f"--serve-env takes NAME=VALUE, not {bad}")
    unknown = {s.strip() for s in args.setups.split(",")} - {"all", "each", "redis", ""}
    if unknown:
        p.error(f"unknown --setups {sorted(unknown)}: all, each, redis")
    if (args.rounds != 1 or args.a_source) and not args.startup_only:
        p.error("--rounds and --a-source need --startup-only (the load phases run once)")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.a_source is not None:
        args.a_source = args.a_source.resolve()
        if not (args.a_source / "service" / "cli.py").is_file():
            p.error(f"--a-source {args.a_source} is not an nlpserve source tree")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.models).is_dir():
        print(f"bench.memory: no model repository at {args.models}", file=sys.stderr)
        return 2
    notes: list[str] = []
    command = " ".join(sys.argv[1:] if argv is None else argv)
    if args.a_source is not None:  # the tree's commit, not a path of this machine
        for given in {str(args.a_source), *(a for a in (argv or sys.argv) if "/" in a)}:
            if Path(given).resolve() == args.a_source:
                command = command.replace(given, "<a-source>")
    doc: dict[str, Any] = {
        "meta": {"command": "python -m bench.memory " + command,
                 "when": datetime.now(UTC).isoformat(timespec="seconds"),
                 **{k: getattr(args, k) for k in ("hz", "concurrency", "burst_s",
                    "explain_concurrency", "explain_s", "idle_s", "after_s", "serve_env",
                    "startup_only", "rounds")},
                 "a_source": tree_commit(args.a_source) if args.a_source else None},
        "machine": machine_description(),
        "results": [],
        "notes": notes,
    }  # fmt: skip
    paths = write(doc, Path(args.out), args.name)
    with tempfile.TemporaryDirectory(prefix="nlpserve-memory-") as tmp:
        setups = build_setups(args, Path(tmp), notes)
        for r, setup in schedule(setups, args):
            if setup.load:
                problem = model_folder_problem(setup.models_dir, setup.load[0])
                if problem:
                    if r == 0 and problem not in notes:
                        notes.append(problem)
                    continue
            arm = f" [{setup.arm}]" if setup.arm else ""
            print(f"[memory] round {r + 1}: {setup.name}{arm} ...", file=sys.stderr, flush=True)
            result = run_setup(setup, args, Path(tmp) / "logs" / f"round{r + 1}{arm.strip()}")
            if args.rounds > 1:
                result["round"] = r + 1
            doc["results"].append(result)
            paths = write(doc, Path(args.out), args.name)  # each setup's figures kept at once
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
