"""deploy/grafana/nlpserve.json proven against the metrics the service really exports.

Static: the dashboard's shape (a ``$datasource`` variable so it imports anywhere, a
description on every panel, only defined variables, alerts it names exist), and every target
parses as PromQL. Live: an API replica with API keys (three clients) and an inference worker
in Redis mode (real ``redis-server``, the committed models) take requests of every kind from
the clients, a 4xx, 429s (a full queue; one client over its in-flight limit, another over
its rate limit) and 401s included; every ``nlpserve_*`` name the dashboard uses must be in
their ``/metrics``
expositions (a renamed metric fails here), and a real
Prometheus server (``prometheus`` on PATH: Debian package ``prometheus``, which .ci/run
installs for ``promtool``) scraping both every second, the response cache on and hit,
evicting and coalescing, exemplars stored, must accept every
target expression and the variable queries, answer with data for every panel but the ones
that only show incidents, and hold a sampled request's trace id as an exemplar of every
target that shows exemplars.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.api.auth import key_line
from service.metrics import Metrics
from service.runtime.runner import load_runners
from service.worker import Worker
from tests.redis_support import EXTERNAL_URL, RedisServer, unique_prefix
from tests.service_support import LiveServer, live_server, make_settings

yaml = pytest.importorskip("yaml", reason="pyyaml is in the dev extra")

# the live tests share the session loop with their fixtures (tests/conftest.py)
ASYNC = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "nlpserve.json"
PROM_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS = shutil.which("prometheus")

# What Grafana would put in place of its variables when a user picks "All".
GRAFANA_VARS = {
    "__rate_interval": "1m",  # holds every sample the test scrapes (one a second)
    "__interval": "15s",
    "__range": "5m",
}
# Panels whose series only exist after an incident (a fallback at load; a worker's crash,
# poison input, deadline or cancelled client): the live test asks only that they parse.
INCIDENT_PANELS = {"Provider fallback", "Reclaimed, dead-lettered, expired, cancelled"}
ERRORS = "Error ratio: shed (429, 503, 504), client limits (429), server errors (500)"
# ... and targets of other panels alike: the share of 500s (a bug; none here)
INCIDENT_TARGETS = {(ERRORS, "C")}
MAX_QUEUE_DEPTH = 8  # one request of 8 sequences fills a queue: the next is refused (429)
# The API's response cache: ~20 polarity results, so that the traffic below evicts some.
RESPONSE_CACHE_MB = 0.002
# Each round of traffic asks new texts (a cache that knew them would leave the model idle).
ROUNDS = itertools.count()
# The API's keys file: one client's key as its hash, the others' as themselves (both forms);
# bob with an in-flight limit of his own (alice has none: her bursts fill the queue), carol
# with a rate limit (a bucket of CAROL_BURST items that takes 50 s to refill: her second
# request of a round is refused 429 client_rate).
CLIENT_KEYS = {
    "alice": "alice-key-0123456789-abcdefghij",
    "bob": "bob-plaintext-key-9876543210",
    "carol": "carol-plaintext-key-5555544444",
}
BOB_MAX_IN_FLIGHT = 4
CAROL_RATE, CAROL_BURST = 0.04, 2
KEYS_FILE = (
    f"{key_line('alice', CLIENT_KEYS['alice'])}\n"
    f"bob {CLIENT_KEYS['bob']} max_in_flight={BOB_MAX_IN_FLIGHT}\n"
    f"carol {CLIENT_KEYS['carol']} rate={CAROL_RATE} burst={CAROL_BURST}\n"
)
# Cut at detector-en's max length (128 tokens): the drift row's truncated share moves.
LONG_TEXT = " ".join(["The committee reviewed every chapter of the long report twice."] * 25)
# A sampled request's trace (traceparent flags 01): its latency's exemplar.
TRACE_ID = "5a" * 16
TRACEPARENT = f"00-{TRACE_ID}-{'7b' * 8}-01"


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.extend([p, *p.get("panels", [])] if p["type"] == "row" else [p])
    return [p for p in out if p["type"] != "row"]


def _variables(dash: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dash["templating"]["list"]}


def _substitute(expr: str, variables: dict[str, dict[str, Any]]) -> str:
    """Grafana's variables in ``expr`` replaced the way it does for "All" (``.*``); a
    variable the dashboard does not define fails."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in GRAFANA_VARS:
            return GRAFANA_VARS[name]
        assert name in variables, f"{expr}: ${name} is not a dashboard variable"
        return str(variables[name].get("allValue") or ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def _targets() -> list[tuple[str, str, dict[str, Any]]]:
    """(panel title, PromQL as Prometheus gets it, target) for every target."""
    dash = _dashboard()
    variables = _variables(dash)
    return [
        (p["title"], _substitute(t["expr"], variables), t)
        for p in _panels(dash)
        for t in p["targets"]
    ]


def _variable_queries() -> list[tuple[str, str, str]]:
    """(variable, selector, label) of every ``label_values(selector, label)`` variable."""
    variables = _variables(_dashboard())
    out = []
    for name, v in variables.items():
        if v["type"] != "query":
            continue
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m, f"${name}: {query}"
        out.append((name, _substitute(m.group(1), variables), m.group(2)))
    return out


# ------------------------------------------------------------------ static
def test_dashboard_imports_anywhere() -> None:
    """A ``$datasource`` variable of type prometheus (no datasource uid of the author's
    Grafana baked in), a recent schema, unique panel ids, a description on every panel."""
    dash = _dashboard()
    assert dash["schemaVersion"] >= 39 and dash["uid"] == "nlpserve"
    variables = _variables(dash)
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    assert {"job", "instance", "model"} <= set(variables)
    every = [dash["panels"], *[p.get("panels", []) for p in dash["panels"]]]
    ids = [p["id"] for group in every for p in group]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    wanted = {"type": "prometheus", "uid": "${datasource}"}
    for v in variables.values():
        assert v["type"] == "datasource" or v["datasource"] == wanted, v["name"]
    panels = _panels(dash)
    assert len(panels) >= 20
    for p in panels:
        assert len(p.get("description", "")) > 40, f"{p['title']}: say what to look for"
        assert p["datasource"] == wanted, p["title"]
        assert p["targets"] and all(t["datasource"] == wanted for t in p["targets"]), p["title"]


def test_every_target_parses_and_names_its_alerts_right() -> None:
    import promql_parser

    for title, expr, _ in _targets():
        promql_parser.parse(expr)  # ValueError on a syntax error
        assert "nlpserve_" in expr, (title, expr)
    alerts = {
        r["alert"]
        for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
    }
    named = set(re.findall(r"\bNlpserve[A-Z]\w+", DASHBOARD.read_text()))
    assert named and named <= alerts, f"no such alert: {sorted(named - alerts)}"


def _alert_expr(name: str) -> str:
    return next(
        r["expr"]
        for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
        if r.get("alert") == name
    )


def test_the_shed_line_is_the_shedding_alert() -> None:
    """The error panel's shed line is NlpserveShedding's expression word for word, but for
    the dashboard's variables on every selector and Grafana's rate interval: what the line
    crosses 1% for is what fires (a 500 is a bug, not shedding: a line of its own)."""
    alert = _alert_expr("NlpserveShedding").rsplit(">", 1)[0].strip()
    selectors = 'job=~"$job", instance=~"$instance", model=~"$model"'
    want = re.sub(r"(nlpserve_\w+)\{", rf"\1{{{selectors}, ", alert)
    want = re.sub(r"(nlpserve_\w+)\[", rf"\1{{{selectors}}}[", want)
    want = want.replace("[5m]", "[$__rate_interval]")
    panel = next(p for p in _panels(_dashboard()) if p["title"] == ERRORS)
    lines = {t["legendFormat"]: t["expr"] for t in panel["targets"]}
    assert lines["{{model}} shed"] == want
    total = f"sum by (model) (rate(nlpserve_requests_total{{{selectors}}}[$__rate_interval]))"
    assert lines["{{model}} server errors (500)"] == (
        f'sum by (model) (rate(nlpserve_requests_total{{{selectors}, status="500"}}'
        f"[$__rate_interval])) / {total}"
    )


# ------------------------------------------------------------------ live
@dataclass
class Stack:
    api: LiveServer
    worker_port: int


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack() -> AsyncIterator[Stack]:
    """An API replica (with API keys) and a worker in Redis mode over the committed models,
    having answered requests of every kind."""
    with tempfile.TemporaryDirectory(prefix="nlpserve-dash-") as workdir:
        keys_file = Path(workdir) / "api-keys"
        keys_file.write_text(KEYS_FILE)
        redis = None if EXTERNAL_URL else RedisServer(Path(workdir))
        url = EXTERNAL_URL
        if redis is not None:
            redis.start()
            url = redis.url
        settings = make_settings(
            ROOT / "models",
            queue="redis",
            redis_url=url,
            redis_prefix=unique_prefix(),
            redis_block_ms=100,
            metrics_port=0,
            metrics_host="127.0.0.1",
            max_queue_depth=MAX_QUEUE_DEPTH,
            api_keys_file=keys_file,
            response_cache_mb=RESPONSE_CACHE_MB,
        )
        try:
            # as `nlpserve worker` does: the runners record into the worker's registry
            metrics = Metrics()
            runners = await asyncio.to_thread(load_runners, settings, metrics)
            worker = Worker(settings, runners, metrics)
            worker_port = worker.start_http(0)  # what `nlpserve worker` (serve) does
            task = asyncio.create_task(worker.run(), name="dashboard-worker")
            try:
                async with live_server(settings) as api:
                    st = Stack(api, worker_port)
                    await _traffic(st)
                    yield st
            finally:
                worker.stop()
                await asyncio.wait_for(task, timeout=15)
                worker.stop_http()
        finally:
            if redis is not None:
                redis.stop()


async def _traffic(st: Stack) -> None:
    """Every model's prediction from both clients (one a sampled trace), an explanation,
    batch-priority requests, a 4xx, a 429 and 401s (no key, a wrong key); response cache
    hits and coalesced items."""
    alice = {"Authorization": f"Bearer {CLIENT_KEYS['alice']}"}
    bob = {"X-API-Key": CLIENT_KEYS["bob"]}
    n = next(ROUNDS)
    short = f"The mitochondria is the powerhouse of the cell {n}."
    long = f"{LONG_TEXT} {n}"  # over detector-en's 128 tokens: cut (truncated)
    async with st.api.client(headers=alice) as c, st.api.client(headers=bob) as b:
        ok = [
            c.post(
                "/v1/polarity",
                json={"text": f"A charming, funny and moving film ({n})."},
                headers={"traceparent": TRACEPARENT},
            ),
            b.post(
                "/v1/polarity", json={"inputs": [{"text": f"dull {n}"}, {"text": "a fine cast"}]}
            ),
            c.post(
                "/v1/pos", json={"inputs": [{"text": f"The dog barks {n}."}, {"tokens": ["Hi"]}]}
            ),
            b.post("/v1/detect", json={"text": short}),
            c.post("/v1/detect", json={"text": long}),  # alice's: bob's limit is 4 items
            c.post(
                "/v1/qa",
                json={"question": "长城有多长？", "context": f"长城总长度超过两万千米。{n}"},
            ),
            b.post("/v1/polarity/explain", json={"text": "a charming film"}),
        ]
        for r in await asyncio.gather(*ok):
            assert r.status_code == 200, r.text
        for headers, code in (
            ({}, "unauthorized"),
            ({"X-API-Key": "wrong-key-0000000000-zzzzzzzz"}, "invalid_api_key"),
        ):
            async with st.api.client(headers=headers) as anon:
                r = await anon.post("/v1/polarity", json={"text": "a film"})
            assert (r.status_code, r.json()["error"]["code"]) == (401, code), r.text
        r = await c.post("/v1/polarity", json={"txet": "a typo"})
        assert r.status_code == 422, r.text
        # Requests that each fill the queue, sent at once: those admitted while another's
        # entries are still in the streams (until it is answered) are refused. A burst
        # where every one ran before the next arrived is tried again.
        # Every request its own texts: identical ones would wait on one run (single-flight).
        for k in range(5):
            burst = [
                c.post(
                    "/v1/polarity",
                    json={"inputs": [{"text": f"film {n}.{k}.{j}.{i}"} for i in range(8)]},
                )
                for j in range(8)
            ]
            statuses = [r.status_code for r in await asyncio.gather(*burst)]
            assert set(statuses) <= {200, 429}, statuses
            if 429 in statuses:
                break
        assert 429 in statuses, "no request was refused with queue_full"
        # batch-priority work: the batch lane's depth series (made once the lane has work)
        batch = [
            c.post(
                "/v1/polarity",
                json={"inputs": [{"text": f"bulk {n}.{j}.{i}"} for i in range(2)]},
                headers={"X-Priority": "batch"},
            )
            for j in range(3)
        ]
        statuses = [r.status_code for r in await asyncio.gather(*batch)]
        assert set(statuses) <= {200, 429} and 200 in statuses, statuses
        await _client_quota_traffic(b, n)
        await _client_rate_traffic(st, n)
        await _cache_traffic(st, c, n)


async def _client_quota_traffic(b: httpx.AsyncClient, n: int) -> None:
    """bob's requests of his whole limit at once: one is admitted while none of his others
    is in flight, the rest get 429 client_quota. A burst where every one ran before the next
    arrived is tried again."""
    for k in range(5):
        burst = [
            b.post(
                "/v1/polarity",
                json={
                    "inputs": [{"text": f"bob {n}.{k}.{j}.{i}"} for i in range(BOB_MAX_IN_FLIGHT)]
                },
            )
            for j in range(6)
        ]
        got = await asyncio.gather(*burst)
        codes = {r.json()["error"]["code"] if r.status_code == 429 else r.status_code for r in got}
        assert codes <= {200, "client_quota"}, [r.text for r in got]
        if "client_quota" in codes:
            return
    raise AssertionError("no request of bob's was refused with client_quota")


async def _client_rate_traffic(st: Stack, n: int) -> None:
    """carol's requests of her whole burst, one after another: the first of the fixture's
    round takes the bucket's tokens, every later one (this round's, or the next round's, well
    before the 50 s refill) is refused 429 client_rate."""
    async with st.api.client(headers={"X-API-Key": CLIENT_KEYS["carol"]}) as carol:
        got = [
            # new texts: the response cache's answers take no tokens
            await carol.post(
                "/v1/polarity",
                json={"inputs": [{"text": f"carol {n}.{k}.{i}"} for i in range(CAROL_BURST)]},
            )
            for k in range(2)
        ]
    codes = [r.json()["error"]["code"] if r.status_code == 429 else r.status_code for r in got]
    assert set(codes) <= {200, "client_rate"} and codes[-1] == "client_rate", codes


async def _cache_traffic(st: Stack, c: httpx.AsyncClient, n: int) -> None:
    """A response cache hit, and identical requests at once: all but the first wait on its
    run in flight (coalesced). Requests that each ran before the next arrived are tried
    again with another text."""
    body = {"text": f"a headline asked twice ({n})"}
    for _ in range(2):
        r = await c.post("/v1/polarity", json=body)
        assert r.status_code == 200, r.text
    assert r.headers["server-timing"].startswith("cache;desc=hit"), r.headers
    coalesced = "nlpserve_response_cache_coalesced_total"

    def counted(text: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{coalesced}{{[^}}]*}} (\S+)$", text, re.M))

    before = counted((await c.get("/metrics")).text)
    for k in range(5):
        same = {"text": f"a headline everyone asks at once ({n}.{k})"}
        answers = await asyncio.gather(*(c.post("/v1/polarity", json=same) for _ in range(6)))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        if counted((await c.get("/metrics")).text) > before:
            break
    else:
        raise AssertionError("no identical request was coalesced")


def _exposed(text: str) -> set[str]:
    """Every series name an exposition declares (``# TYPE``: labelled series that have seen
    no sample yet included), with the suffixes Prometheus stores them under."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        base = name.removesuffix("_total") if kind == "counter" else name
        names.update(base + s for s in suffixes.get(kind, ("",)))
    return names


@ASYNC
async def test_every_series_the_dashboard_names_is_exported(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=10) as c:
        texts = [
            (await c.get(f"{stack.api.url}/metrics")).text,
            (await c.get(f"http://127.0.0.1:{stack.worker_port}/metrics")).text,
        ]
    exposed = set().union(*map(_exposed, texts))
    assert "nlpserve_requests_total" in exposed and "nlpserve_worker_replies_total" in exposed
    named = set(re.findall(r"\bnlpserve_[a-z_]+", DASHBOARD.read_text()))
    assert named - exposed == set(), "the dashboard names series nothing exports"


# ------------------------------------------------------------------ Prometheus
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _job_names() -> tuple[str, str]:
    """The repository's scrape jobs (API, worker): the dashboard's $job values."""
    jobs = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())["scrape_configs"]
    api, worker = (j["job_name"] for j in jobs)
    return api, worker


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus scraping the API replica and the worker every second, storing
    exemplars (as the compose ``prometheus`` service does)."""
    if PROMETHEUS is None:
        pytest.skip("prometheus is not on PATH (Debian package prometheus)")
    folder = tmp_path_factory.mktemp("prometheus")
    api_job, worker_job = _job_names()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": api_job, "static_configs": [{"targets": [stack.api.url[7:]]}]},
            {
                "job_name": worker_job,
                "static_configs": [{"targets": [f"127.0.0.1:{stack.worker_port}"]}],
            },
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--enable-feature=exemplar-storage",
            "--log.level=error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "prometheus did not become ready"
            time.sleep(0.1)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def _query(c: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    r = await c.get("/api/v1/query", params={"query": expr})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


async def _scrapes_done(c: httpx.AsyncClient, at_least: int) -> None:
    """Until both targets were scraped (and up) ``at_least`` times."""
    end = time.monotonic() + 30
    while True:
        got = await _query(c, "count_over_time(up[5m]) and up == 1")
        if len(got) == 2 and all(float(s["value"][1]) >= at_least for s in got):
            return
        assert time.monotonic() < end, f"targets not scraped {at_least} times: {got}"
        await asyncio.sleep(0.2)


@ASYNC
async def test_every_panel_queries_real_data(stack: Stack, prometheus: str) -> None:
    """Each target is valid PromQL to Prometheus itself (its parser and type checks: a
    rate() of an instant vector fails there), and every panel but the incident ones has
    data: traffic before and between scrapes makes every rate() real."""
    targets = _targets()
    async with httpx.AsyncClient(base_url=prometheus, timeout=10) as c:
        await _scrapes_done(c, 2)
        await _traffic(stack)  # counters move between two scrapes: rates above 0
        await _scrapes_done(c, 4)
        for name, selector, label in _variable_queries():
            values = {s["metric"].get(label) for s in await _query(c, selector)} - {None}
            assert values, f"${name} would offer no values"
        empty: list[tuple[str, str]] = []
        end = time.monotonic() + 20
        while True:  # the worker samples its streams on its own schedule
            empty = []
            for title, expr, target in targets:
                result = await _query(c, expr)
                incident = title in INCIDENT_PANELS or (title, target["refId"]) in INCIDENT_TARGETS
                if not result and not incident:
                    empty.append((title, expr))
            if not empty or time.monotonic() > end:
                break
            await asyncio.sleep(0.5)
        assert not empty, "panels without data:\n" + "\n".join(f"{t}: {e}" for t, e in empty)
        # the clients row tells the clients and both reasons apart; only bob has an in-flight
        # limit and was refused for it, only carol a rate limit and was refused for it
        exprs = {(title, t["refId"]): expr for title, expr, t in targets}
        first = {title: expr for (title, ref), expr in exprs.items() if ref == "A"}
        in_flight = "Client in flight vs its limit"
        used = "Client items/s vs its rate limit"
        for (title, ref), label, want in (
            (("Requests per client", "A"), "client", {"alice", "bob", "carol"}),
            (("Auth failures (401) by reason", "A"), "reason", {"missing", "invalid"}),
            ((in_flight, "A"), "client", {"alice", "bob", "carol"}),
            ((in_flight, "B"), "client", {"bob"}),
            (("Client quota rejections (429 client_quota) per client", "A"), "client", {"bob"}),
            ((used, "A"), "client", {"carol"}),
            ((used, "B"), "client", {"alice", "bob", "carol"}),
            (("Client rate rejections (429 client_rate) per client", "A"), "client", {"carol"}),
        ):
            result = await _query(c, exprs[title, ref])
            assert {s["metric"][label] for s in result} == want, (title, ref, result)
        result = await _query(c, first[used])
        assert [float(s["value"][1]) for s in result] == [CAROL_RATE], result
        # every round runs new texts of alice's: her items a second, above 0
        result = await _query(c, exprs[used, "B"])
        assert {s["metric"]["client"]: float(s["value"][1]) for s in result}["alice"] > 0, result
        # the error ratio: shed as NlpserveShedding counts it (the clients' own limits left
        # out), and those limits' 429s apart: bob's and carol's, on polarity-en
        errors = ERRORS
        result = await _query(c, exprs[errors, "B"])
        assert {s["metric"]["model"] for s in result} == {"polarity-en"}, result
        assert all(float(s["value"][1]) > 0 for s in result), result
        alert_ratio = (
            _alert_expr("NlpserveShedding")
            .rsplit(">", 1)[0]
            .replace("[5m]", f"[{GRAFANA_VARS['__rate_interval']}]")
        )
        result = await _query(c, f"abs(({exprs[errors, 'A']}) - on (model) ({alert_ratio}))")
        # alike for every model either shows (those with a 429, 503 or 504: polarity-en's
        # queue was full)
        assert {s["metric"]["model"] for s in result} == {"polarity-en"}, result
        for expr in (exprs[errors, "A"], alert_ratio):
            assert {s["metric"]["model"] for s in await _query(c, expr)} == {"polarity-en"}
        assert all(float(s["value"][1]) < 1e-9 for s in result), result
        # ... and under the ratio that counted the clients' limits as errors (what it showed)
        counted = exprs[errors, "B"].replace(
            'rate(nlpserve_rejected_total{job=~".*", instance=~".*", model=~".*", '
            'reason=~"client_quota|client_rate"}',
            'rate(nlpserve_requests_total{job=~".*", instance=~".*", model=~".*", '
            'status=~"429|5.."}',
        )
        assert counted != exprs[errors, "B"]
        result = await _query(c, f"({counted}) - on (model) ({exprs[errors, 'A']})")
        assert [float(s["value"][1]) > 0 for s in result] == [True], result
        # the stage panel: the interactive stages, and the batch-priority queue wait apart
        result = await _query(c, exprs["Where latency goes: p95 per stage", "B"])
        assert {s["metric"]["model"] for s in result} == {"polarity-en"}, result
        # the lanes panel: interactive and batch-priority work, each its own series
        result = await _query(c, first["Queue depth per lane"])
        lanes = {s["metric"]["lane"] for s in result if s["metric"]["model"] == "polarity-en"}
        assert {"predict", "batch"} <= lanes, result
        # the cache row: the polarity model's hits and coalesced items, above 0
        for title in ("Response cache hit ratio", "Response cache coalesced items per second"):
            result = await _query(c, first[title])
            rates = {s["metric"]["model"]: float(s["value"][1]) for s in result}
            assert rates.get("polarity-en", 0) > 0, (title, result)
        # the drift row: a label share per model that answers labels (pos: none); QA's
        # no_answer share for QA models only; detector-en's long text counted as cut
        result = await _query(c, first["Predicted label share per model"])
        models = {s["metric"]["model"] for s in result}
        assert models == {"detector-en", "polarity-en", "qa-zh"}, result
        result = await _query(c, first["QA no_answer share"])
        assert {s["metric"]["model"] for s in result} == {"qa-zh"}, result
        result = await _query(c, first["Inputs truncated (share)"])
        shares = {s["metric"]["model"]: float(s["value"][1]) for s in result}
        assert 0 < shares["detector-en"] < 1 and shares["pos-en"] == 0, shares


@ASYNC
async def test_latency_exemplars_carry_the_trace_id(stack: Stack, prometheus: str) -> None:
    """The p99 latency target shows exemplars, and Prometheus (OpenMetrics scrape, exemplar
    storage on) answers that very expression with the sampled request's trace id: the dot
    Grafana links to the trace."""
    shown = [(title, expr) for title, expr, t in _targets() if t.get("exemplar")]
    assert [t for t, e in shown if "histogram_quantile(0.99" in e] == [
        "Prediction latency p50 / p95 / p99"
    ], shown
    async with httpx.AsyncClient(base_url=prometheus, timeout=10) as c:
        await _scrapes_done(c, 2)  # after the fixture's traffic, its sampled request included
        for title, expr in shown:
            end = time.monotonic() + 10
            while True:
                r = await c.get(
                    "/api/v1/query_exemplars",
                    params={"query": expr, "start": time.time() - 300, "end": time.time()},
                )
                assert r.status_code == 200 and r.json()["status"] == "success", r.text
                ids = {
                    e["labels"].get("trace_id")
                    for series in r.json()["data"]
                    for e in series["exemplars"]
                }
                if TRACE_ID in ids:
                    break
                assert time.monotonic() < end, f"{title}: no exemplar of {TRACE_ID}: {ids}"
                await asyncio.sleep(0.3)
