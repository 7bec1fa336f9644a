"""The compose topology as processes: nginx gateway -> 2 API replicas -> Redis -> 2 workers.

There is no Docker engine here, so what ``docker-compose.yml`` describes is started as plain
processes on loopback ports: ``redis-server`` (noeviction, like compose), nginx with the
repository's own ``deploy/nginx/gateway.conf.template`` (rendered like the nginx image does),
two ``nlpserve serve`` replicas with ``NLPSERVE_QUEUE=redis`` and two ``nlpserve worker``s,
over the tiny real models of ``model_repo``.

1,000 mixed requests (models, lengths, single and batch) go through the gateway at
concurrency 32; one API replica and one worker are SIGKILLed mid-run. Every request must end
with its correct answer (the one the healthy system gave for the same payload before the
chaos), the client retrying once on a connection error or 502/503 from the dead replica, as
docs/deploy.md tells real clients to. Bounded (~1 minute on 2 cores); every process is
stopped however the test ends. Needs ``redis-server`` and ``nginx`` (Debian: ``nginx``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench import procs
from bench.loadgen import RequestSpec, Result, RetryPolicy, run_load, scrape_metrics

pytestmark = pytest.mark.e2e

N_REQUESTS = 1000
N_UNIQUE = 250
CONCURRENCY = 32
KILL_WORKER_AT = 300  # answered requests before a worker is killed (then an API replica)
CLAIM_IDLE_MS = 2000  # a dead worker's entries are reclaimed after this (prod: 15 s)


def _nginx_available() -> bool:
    return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()


needs_binaries = pytest.mark.skipif(
    shutil.which("redis-server") is None or not _nginx_available(),
    reason="needs redis-server and nginx on PATH (Debian packages redis-server, nginx; "
    ".ci/run installs them)",
)


# --------------------------------------------------------------------------- payloads
def _payloads(repo: Path, n: int, seed: int = 7) -> list[tuple[str, dict[str, Any]]]:
    """``n`` distinct (path, body) pairs over the models present, lengths 3..~40 words."""
    from tests.builders import FILLER, NEGATIVE, POS_LEXICON, POSITIVE

    rng = random.Random(seed)
    pos_words = [w for ws in POS_LEXICON.values() for w in ws]
    pol_words = POSITIVE + NEGATIVE + FILLER

    def words(vocab: list[str]) -> str:
        k = max(3, min(40, int(rng.lognormvariate(math.log(12), 0.6))))
        return " ".join(rng.choice(vocab) for _ in range(k))

    makers: list[tuple[str, Any]] = [
        ("/v1/polarity", lambda: {"text": words(pol_words)}),
        ("/v1/pos", lambda: {"text": words(pos_words)}),
    ]
    if (repo / "detector-en").is_dir():
        makers.append(("/v1/detect", lambda: {"text": words(pol_words + pos_words)}))
    seen: set[str] = set()
    out: list[tuple[str, dict[str, Any]]] = []
    while len(out) < n:
        path, make = rng.choice(makers)
        # One request in ten is a batch of 2-4 items: their outputs must come back in order.
        body = (
            {"inputs": [make() for _ in range(rng.randint(2, 4))]} if rng.random() < 0.1 else make()
        )
        key = f"{path}{body}"
        if key not in seen:
            seen.add(key)
            out.append((path, body))
    return out


def _same(got: Any, want: Any, where: str = "") -> str | None:
    """None when ``got`` matches ``want`` (floats to 1e-4), else what differs."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or got.keys() != want.keys():
            return (
                f"{where}: keys {sorted(got) if isinstance(got, dict) else got} != {sorted(want)}"
            )
        for k in want:
            if (d := _same(got[k], want[k], f"{where}.{k}")) is not None:
                return d
        return None
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return f"{where}: {got} != {want}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if (d := _same(g, w, f"{where}[{i}]")) is not None:
                return d
        return None
    if isinstance(want, float) and isinstance(got, int | float):
        return None if abs(got - want) <= 1e-4 else f"{where}: {got} != {want}"
    return None if got == want else f"{where}: {got!r} != {want!r}"


# --------------------------------------------------------------------------- topology
@dataclass
class Topology:
    gateway_url: str
    apis: list[procs.Proc]
    workers: list[procs.Proc]
    worker_metrics: list[str]
    all: list[procs.Proc]


@pytest.fixture
def topology(model_repo: Path, tmp_path: Path) -> Iterator[Topology]:
    logs = tmp_path / "logs"
    started: list[procs.Proc] = []
    with procs.stopping(started):
        redis, redis_url = procs.start_redis(logs)
        started.append(redis)
        common = {
            "NLPSERVE_QUEUE": "redis",
            "NLPSERVE_REDIS_URL": redis_url,
            "NLPSERVE_MODEL_DIR": str(model_repo),
            "NLPSERVE_PROVIDERS": "CPUExecutionProvider",
            # fp32, not the int8 the CPU would pick: dynamic int8 quantisation scales the
            # activations per batch, so an int8 answer moves (~1e-3) with its batch-mates and
            # padding. This test checks routing under failures, which needs exact answers.
            "NLPSERVE_VARIANT": "fp32",
            "NLPSERVE_LOG_LEVEL": "WARNING",
            "NLPSERVE_DEFAULT_DEADLINE_MS": "30000",
            "TOKENIZERS_PARALLELISM": "false",
        }
        workers, worker_metrics = [], []
        for i in range(2):
            mport = procs.free_port()
            env = {
                **common,
                "NLPSERVE_METRICS_HOST": "127.0.0.1",
                "NLPSERVE_METRICS_PORT": str(mport),
                "NLPSERVE_INTRA_OP_THREADS": "1",  # two workers share two cores
                "NLPSERVE_REDIS_CLAIM_IDLE_MS": str(CLAIM_IDLE_MS),
                "NLPSERVE_WORKER_NAME": f"e2e-worker-{i}",
            }
            w = procs.start(f"worker{i}", [procs.nlpserve_bin(), "worker"], logs, env=env)
            started.append(w)
            workers.append(w)
            worker_metrics.append(f"http://127.0.0.1:{mport}/metrics")
        apis, upstreams = [], []
        for i in range(2):
            port = procs.free_port()
            env = {**common, "NLPSERVE_HOST": "127.0.0.1", "NLPSERVE_PORT": str(port)}
            a = procs.start(f"api{i}", [procs.nlpserve_bin(), "serve"], logs, env=env)
            started.append(a)
            apis.append(a)
            # Same server parameters as compose's NLPSERVE_UPSTREAMS.
            upstreams.append(f"server 127.0.0.1:{port} max_fails=3 fail_timeout=5s;")
        for a, line in zip(apis, upstreams, strict=True):
            procs.wait_http(a, f"http://{line.split()[1]}/readyz", timeout_s=90)
        for w, m in zip(workers, worker_metrics, strict=True):
            procs.wait_http(w, m.replace("/metrics", "/readyz"), timeout_s=90)
        gport = procs.free_port()
        nginx = procs.start_nginx(
            tmp_path / "nginx",
            {
                "NLPSERVE_UPSTREAMS": " ".join(upstreams),
                "NLPSERVE_GATEWAY_PORT": str(gport),
                "NLPSERVE_RATE_LIMIT": "100000",  # this test is about failover, not limits
                "NLPSERVE_MAX_BODY": "1000000",
                **procs.no_grpc_upstream(),
            },
        )
        started.append(nginx)
        yield Topology(f"http://127.0.0.1:{gport}", apis, workers, worker_metrics, started)


# --------------------------------------------------------------------------- tests
@needs_binaries
def test_every_request_answered_correctly_while_a_replica_and_a_worker_die(
    topology: Topology, model_repo: Path
) -> None:
    unique = _payloads(model_repo, N_UNIQUE)
    rng = random.Random(11)
    order = [i % N_UNIQUE for i in range(N_REQUESTS)]
    rng.shuffle(order)
    specs = [RequestSpec(k, unique[u][0], unique[u][1], 0) for k, u in enumerate(order)]
    ref_specs = [RequestSpec(u, p, b, 0) for u, (p, b) in enumerate(unique)]

    killed: dict[str, float] = {}
    held_at_kill: list[float] = []
    progress = threading.Event()  # set once KILL_WORKER_AT requests are answered

    def in_hand(url: str) -> float:
        m = scrape_metrics([url], timeout=0.5)
        return sum(v for (n, _), v in m.items() if n == "nlpserve_worker_in_hand_entries")

    def chaos() -> None:
        """Off the event loop: wait for the run to be well under way, then SIGKILL (no
        graceful shutdown: whatever the process held is simply gone) a worker and a replica."""
        if not progress.wait(timeout=120):
            return
        # Kill the worker while it holds entries (read, not yet answered) so the survivor
        # must reclaim them. With tiny models entries are in hand for milliseconds, hence
        # the tight polling; after 5 s it is killed anyway.
        give_up = time.monotonic() + 5.0
        held = 0.0
        while time.monotonic() < give_up:
            held = in_hand(topology.worker_metrics[0])
            if held >= 1:
                break
            time.sleep(0.005)
        topology.workers[0].kill()
        killed["worker"] = time.monotonic()
        held_at_kill.append(held)
        # The killed worker's requests stay in flight at the replicas until reclaimed
        # (CLAIM_IDLE_MS): killing a replica now catches requests it holds. Its clients
        # get a 502 from nginx (the request was sent: nginx does not replay a POST).
        time.sleep(0.3)
        topology.apis[0].kill()
        killed["api"] = time.monotonic()

    def on_progress(done: int) -> None:
        if done >= KILL_WORKER_AT:
            progress.set()

    async def scenario() -> tuple[list[Result], list[Result], float]:
        # Reference answers from the healthy system, each payload once.
        ref, _ = await run_load(
            topology.gateway_url, ref_specs, concurrency=CONCURRENCY,
            policy=RetryPolicy(retries=0), timeout_s=30,
        )  # fmt: skip
        t0 = time.monotonic()
        results, _ = await run_load(
            topology.gateway_url, specs, concurrency=CONCURRENCY, on_progress=on_progress,
            policy=RetryPolicy(retries=1, backoff_s=0.1), timeout_s=40,
        )  # fmt: skip
        return ref, results, time.monotonic() - t0

    killer = threading.Thread(target=chaos, name="chaos", daemon=True)
    killer.start()
    try:
        ref, results, secs = asyncio.run(asyncio.wait_for(scenario(), timeout=150))
    finally:
        progress.set()
        killer.join(timeout=10)

    bad_ref = [r for r in ref if r.status != 200]
    assert not bad_ref, (
        f"healthy system failed: {[(r.status, r.body, r.error) for r in bad_ref[:5]]}"
    )
    want = {r.id: r.body for r in ref}
    assert "api" in killed and "worker" in killed, "the kills did not happen mid-run"
    assert not topology.apis[0].alive() and not topology.workers[0].alive()

    failed = [r for r in results if r.status != 200]
    wrong = []
    for r in results:
        if r.status == 200 and (d := _same(r.body, want[order[r.id]])) is not None:
            wrong.append((r.id, specs[r.id].path, d))
    retried = sum(r.attempts > 1 for r in results)
    survivor = scrape_metrics(topology.worker_metrics[1:])
    reclaimed = sum(v for (n, _), v in survivor.items() if n == "nlpserve_worker_reclaimed_total")
    print(
        f"\n{len(results)} requests in {secs:.1f}s through the gateway; {retried} retried once; "
        f"surviving worker reclaimed {reclaimed:.0f} entries of the killed one, which held "
        f"{held_at_kill} when killed"
    )
    assert len(results) == N_REQUESTS
    assert not failed, (
        f"{len(failed)} requests failed even after a retry: "
        f"{[(r.status, r.error, r.body) for r in failed[:5]]}\n"
        + "\n".join(f"--- {p.name}\n{p.log_tail(1500)}" for p in topology.all)
    )
    assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[:3]}"
    # The survivors are still healthy after the chaos.
    assert procs.http_ok(topology.gateway_url + "/readyz")
    assert topology.apis[1].alive() and topology.workers[1].alive()


@needs_binaries
def test_gateway_limits_and_request_id(tmp_path: Path) -> None:
    """The gateway's own behaviour, with no backend (connection refused upstream): request
    ids propagate, oversized bodies get 413 and a flood gets 429 from nginx itself."""
    port = procs.free_port()
    nginx = procs.start_nginx(
        tmp_path,
        {
            "NLPSERVE_UPSTREAMS": f"server 127.0.0.1:{procs.free_port()};",
            "NLPSERVE_GATEWAY_PORT": str(port),
            "NLPSERVE_RATE_LIMIT": "1",
            "NLPSERVE_MAX_BODY": "1k",
            **procs.no_grpc_upstream(),
        },
    )
    with procs.stopping([nginx]):
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=5) as c:
            assert c.get("/gateway/healthz").status_code == 200
            r = c.post("/v1/polarity", json={"text": "x"}, headers={"X-Request-ID": "abc-123"})
            assert r.status_code == 502  # nothing behind it
            assert r.headers["x-request-id"] == "abc-123"  # kept, and sent back
            minted = c.post("/v1/polarity", json={"text": "x"}).headers.get("x-request-id")
            assert minted and len(minted) == 32  # nginx's $request_id when the client sent none
            # What nginx answers itself is in the API's error shape, not an HTML page.
            r = c.post("/v1/polarity", content=b"x" * 4096)
            assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
            r = c.post("/v1/polarity", json={"text": "x"}, headers={"X-Request-ID": "a b"})
            assert r.status_code == 502 and r.json()["error"]["code"] == "bad_gateway"
            # an id the API would refuse is replaced here too, so both sides log the same one
            assert r.headers["x-request-id"] != "a b" and len(r.headers["x-request-id"]) == 32
            assert r.headers["retry-after"] == "1" and "nginx/" not in r.headers.get("server", "")
            r = c.get("/metrics")  # scraped on each replica, not published by the gateway
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            # 1 r/s with a burst of 200: a quick flood of 260 must see 429s.
            answers = [c.post("/v1/polarity", json={"text": "x"}) for _ in range(260)]
            limited = [r for r in answers if r.status_code == 429]
            assert len(limited) >= 30, [r.status_code for r in answers]
            assert limited[0].json()["error"]["code"] == "rate_limited"
            assert limited[0].headers["retry-after"] == "1" and limited[0].headers["x-request-id"]
            # the V2 protocol's inferences share the limit (the flood above used it up; one
            # of three, in case a token came back in between)
            v2 = [c.post("/v2/models/polarity-en/infer", json={"inputs": []}) for _ in range(3)]
            limited = [r for r in v2 if r.status_code == 429]
            assert limited, v2
            # in that protocol's error shape, with the same headers
            assert limited[0].json()["error"].startswith("over "), limited[0].text
            assert limited[0].headers["retry-after"] == "1" and limited[0].headers["x-request-id"]


@contextlib.contextmanager
def _one_replica_behind_the_gateway(
    model_repo: Path, tmp_path: Path, model: str, **env: str
) -> Iterator[tuple[procs.Proc, str]]:
    """One in-process ``nlpserve serve`` of ``model`` with ``env`` on top, behind nginx with
    the repository's gateway config: (the replica, the gateway's URL); both stopped after."""
    port, gport = procs.free_port(), procs.free_port()
    api_env = {
        "NLPSERVE_MODEL_DIR": str(model_repo),
        "NLPSERVE_LOAD_MODELS": model,
        "NLPSERVE_PROVIDERS": "CPUExecutionProvider",
        "NLPSERVE_INTRA_OP_THREADS": "1",
        "NLPSERVE_HOST": "127.0.0.1",
        "NLPSERVE_PORT": str(port),
        **env,
    }
    started: list[procs.Proc] = []
    with procs.stopping(started):
        api = procs.start("api", [procs.nlpserve_bin(), "serve"], tmp_path / "logs", env=api_env)
        started.append(api)
        procs.wait_http(api, f"http://127.0.0.1:{port}/readyz", timeout_s=90)
        gateway = {
            "NLPSERVE_UPSTREAMS": f"server 127.0.0.1:{port};",
            "NLPSERVE_GATEWAY_PORT": str(gport),
            "NLPSERVE_RATE_LIMIT": "1000",
            "NLPSERVE_MAX_BODY": "1000000",
            **procs.no_grpc_upstream(),
        }
        started.append(procs.start_nginx(tmp_path / "nginx", gateway))
        yield api, f"http://127.0.0.1:{gport}"


@needs_binaries
def test_gateway_passes_api_keys_and_401s_through(model_repo: Path, tmp_path: Path) -> None:
    """NLPSERVE_API_KEYS_FILE behind the gateway: Authorization and X-API-Key reach the
    replica, its 401 (and WWW-Authenticate) reaches the client as the replica wrote it, in
    both error shapes; the replica's log names the client and never holds a key."""
    from service.api.auth import key_line

    key, wrong = "e2e-gateway-key-0123456789", "e2e-wrong-key-0123456789"
    keys = tmp_path / "api-keys"
    keys.write_text(key_line("e2e-client", key) + "\n")
    with _one_replica_behind_the_gateway(
        model_repo,
        tmp_path,
        "polarity-en",
        NLPSERVE_API_KEYS_FILE=str(keys),
        NLPSERVE_LOG_LEVEL="DEBUG",
        NLPSERVE_LOG_FORMAT="json",
    ) as (api, gateway_url):
        v2 = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["good"]}]}
        with httpx.Client(base_url=gateway_url, timeout=10) as c:
            r = c.post("/v1/polarity", json={"text": "a good film"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == 'Bearer realm="nlpserve"'
            r = c.post("/v2/models/polarity-en/infer", json=v2, headers={"X-API-Key": wrong})
            assert r.status_code == 401 and isinstance(r.json()["error"], str)
            r = c.post(
                "/v1/polarity",
                json={"text": "a good film"},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert r.status_code == 200, r.text
            r = c.post("/v2/models/polarity-en/infer", json=v2, headers={"X-API-Key": key})
            assert r.status_code == 200, r.text
            assert c.get("/readyz").status_code == 200  # probes need no key
    log = api.log_path.read_text()
    assert key not in log and wrong not in log
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(r.get("client") == "e2e-client" for r in records)


@needs_binaries
def test_gateway_compresses_large_answers_for_clients_that_ask(
    model_repo: Path, tmp_path: Path
) -> None:
    """gzip at the gateway: a large JSON answer comes compressed to a client that sends
    ``Accept-Encoding: gzip`` and decodes to the very bytes an ``identity`` client gets; a
    small one (under gzip_min_length) and every answer to a client that does not ask come as
    they are; the request id and Server-Timing pass either way."""
    import gzip

    with _one_replica_behind_the_gateway(
        model_repo, tmp_path, "pos-en", NLPSERVE_LOG_LEVEL="WARNING"
    ) as (_, gateway_url):
        batch = {"inputs": [{"text": "the dog runs quickly over the green hill"}] * 40}

        def raw(path: str, accept: str, body: dict[str, Any] | None = None) -> httpx.Response:
            # the bytes on the wire: httpx would otherwise decode them
            with httpx.Client(base_url=gateway_url, timeout=30) as c:
                method = "POST" if body is not None else "GET"
                req = c.build_request(method, path, json=body, headers={"Accept-Encoding": accept})
                r = c.send(req, stream=True)
                r._content = b"".join(r.iter_raw())  # noqa: SLF001 - keep the raw bytes
                r.close()
                return r

        plain = raw("/v1/pos", "identity", batch)
        assert plain.status_code == 200 and "content-encoding" not in plain.headers
        assert len(plain.content) > 1024  # over gzip_min_length: else this test shows nothing
        zipped = raw("/v1/pos", "gzip", batch)
        assert zipped.status_code == 200, zipped.text
        assert zipped.headers["content-encoding"] == "gzip"
        assert "accept-encoding" in zipped.headers["vary"].lower()
        assert zipped.headers["x-request-id"] and "server-timing" in zipped.headers
        assert gzip.decompress(zipped.content) == plain.content
        assert len(zipped.content) * 3 < len(plain.content)  # 40 alike sentences
        small = raw("/v1/pos", "gzip", {"text": "the dog runs"})
        assert small.status_code == 200 and "content-encoding" not in small.headers
        assert small.json()["tokens"]
        doc = raw("/openapi.json", "gzip")  # the docs page's ~200 KB document
        assert doc.headers["content-encoding"] == "gzip"
        assert json.loads(gzip.decompress(doc.content))["openapi"]
