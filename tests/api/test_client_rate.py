"""Per-client rate limits (``NLPSERVE_CLIENT_RATE``, ``rate=R burst=B`` in the keys file;
service/api/client_rate.py) over real HTTP with real API keys, in one process. The buckets'
clock is a fake the tests move (``ClientRate.clock``), so no assertion rests on the wall
clock: a client over its rate gets 429 ``client_rate`` with the Retry-After after which it is
admitted (and not a second before); a burst passes at once; a request over the burst is 422;
another client keeps its own bucket; a request refused by either limit holds nothing and
takes no tokens; a request that ends before its items reach a model batch gets its tokens
back, one whose items reached one does not; the response cache's answers cost none; each
client's items are counted as its rate limit charges them; a reload changes the rate at
once; the settings and ``nlpserve keys new --rate`` are checked in one line."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.api.auth import Rate, digest, parse_keys
from service.api.client_rate import ClientRate, ClientRateConfigError
from service.api.errors import ApiError
from service.config import Settings
from tests.api.test_auth import _cli
from tests.service_support import (
    POLARITY_MODEL,
    POS_MODEL,
    GatedRunner,
    LiveServer,
    live_server,
    make_settings,
    metric_value,
    post_polarity,
    read_metrics,
    wait_for,
)

session_loop = pytest.mark.asyncio(loop_scope="session")

LOADED = f"{POLARITY_MODEL},{POS_MODEL}"  # the LSTMs: a server starts in a second
ALICE = "alice-rate-key-0123456789xx"  # rate=0.1 burst=3: an item every 10 s
BOB = "bob-rate-key-9876543210xxxx"  # NLPSERVE_CLIENT_RATE=0.5, its burst 1
CAROL = "carol-rate-key-0123456789xx"  # max_in_flight=1, rate=0.1 burst=2
OWN = "this client's rate in NLPSERVE_API_KEYS_FILE"
KEYS = (
    f"alice {ALICE} rate=0.1 burst=3\nbob {BOB}\ncarol {CAROL} max_in_flight=1 rate=0.1 burst=2\n"
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rate_of(srv: LiveServer) -> ClientRate:
    rate = srv.state.client_rate
    assert rate is not None
    return rate


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys"
    path.write_text(KEYS)
    return path


def settings_for(model_repo: Path, keys_file: Path, **more: Any) -> Settings:
    return make_settings(
        model_repo, load_models=LOADED, api_keys_file=keys_file, client_rate=0.5, **more
    )


@pytest_asyncio.fixture(loop_scope="session")
async def served(model_repo: Path, keys_file: Path) -> AsyncIterator[tuple[LiveServer, FakeClock]]:
    async with live_server(settings_for(model_repo, keys_file)) as srv:
        clock = FakeClock()
        rate_of(srv).clock = clock
        yield srv, clock


def assert_rate_refusal(
    r: httpx.Response, retry_after: int, needs: int = 1, rate: float = 0.1
) -> str:
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "client_rate"
    assert r.json()["error"]["limit"] == {"name": "rate", "value": rate}
    assert int(r.headers["retry-after"]) == retry_after
    message = r.json()["error"]["message"]
    assert f"this request needs {needs} items" in message
    assert f"retry in {retry_after} s" in message
    for name in ("alice", "bob", "carol"):
        assert name not in message
    return message


@session_loop
async def test_over_its_rate_a_client_waits_the_retry_after_and_is_admitted(served):
    srv, clock = served
    async with srv.client() as c:
        before = await read_metrics(c)
        assert (await post_polarity(c, ALICE, 2)).status_code == 200  # the burst: 3 at once...
        assert (await post_polarity(c, ALICE)).status_code == 200
        message = assert_rate_refusal(
            await post_polarity(c, ALICE), retry_after=10
        )  # ...then 0.1/s
        assert (
            "this client may send 0.1 items a second, 3 at most at once "
            f"({OWN}); it has room for 0 now" in message
        )
        assert not srv.state.client_quota.in_flight

        # the others keep their own buckets: bob's default (0.5/s, burst 1) is untouched
        assert (await post_polarity(c, BOB)).status_code == 200
        message = assert_rate_refusal(await post_polarity(c, BOB), retry_after=2, rate=0.5)
        assert "may send 0.5 items a second, 1 at most at once (NLPSERVE_CLIENT_RATE)" in message
        # under /v2 in that protocol's shape, a tensor's rows counted as items
        v2 = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["ok"]}]}
        r = await c.post(f"/v2/models/{POLARITY_MODEL}/infer", json=v2, headers={"X-API-Key": BOB})
        assert r.status_code == 429 and int(r.headers["retry-after"]) == 2
        assert set(r.json()) == {"error"} and "0.5 items a second" in r.json()["error"]

        clock.now += 9  # a second short of the Retry-After: still no whole item
        assert_rate_refusal(await post_polarity(c, ALICE), retry_after=1)
        clock.now += 1
        assert (await post_polarity(c, ALICE)).status_code == 200
        # two items need twice the wait, and the bucket is full after 30 s however long idle
        assert_rate_refusal(await post_polarity(c, ALICE, 2), retry_after=20, needs=2)
        clock.now += 3600
        assert (await post_polarity(c, ALICE, 3)).status_code == 200

        # more than the burst in one request could never pass: 422, no token taken
        clock.now += 3600
        r = await post_polarity(c, ALICE, 4)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "too_many_items"
        assert (
            "this request needs 4 items run at once; this client may send at most 3 at once "
            f"(the burst of its 0.1 items a second, 3 at most at once, {OWN})"
        ) in r.json()["error"]["message"]
        assert r.json()["error"]["limit"] == {"name": "burst", "value": 3}
        assert (await post_polarity(c, ALICE, 3)).status_code == 200  # all 3 still there

        after = await read_metrics(c)
    assert metric_value(after, "nlpserve_client_rate", client="alice") == 0.1
    assert metric_value(after, "nlpserve_client_rate", client="bob") == 0.5

    def grew(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert grew("nlpserve_client_rate_rejections_total", client="alice") == 3
    assert grew("nlpserve_client_rate_rejections_total", client="bob") == 2
    assert grew("nlpserve_rejected_total", model=POLARITY_MODEL, reason="client_rate") == 5
    assert grew("nlpserve_client_quota_rejections_total", client="alice") == 0


@session_loop
async def test_a_request_refused_by_either_limit_holds_nothing_and_takes_no_tokens(served):
    srv, _ = served
    q, quota, rate = srv.queue, srv.state.client_quota, rate_of(srv)
    assert quota is not None
    q.pause()
    try:
        async with srv.client() as c:
            held = post_polarity(c, CAROL)  # 1 of its 2 tokens, its 1 in flight
            await wait_for(lambda: quota.in_flight == {"carol": 1})
            r = await post_polarity(c, CAROL)
            assert r.status_code == 429 and r.json()["error"]["code"] == "client_quota"
            assert rate.buckets["carol"][0] == 1  # the in-flight refusal took no token
            q.resume()
            assert (await held).status_code == 200
            await wait_for(lambda: not quota.in_flight)
            assert (await post_polarity(c, CAROL)).status_code == 200  # the last token
            assert_rate_refusal(await post_polarity(c, CAROL), retry_after=10)
            assert not quota.in_flight  # admitted in flight, then refused: given back
            assert rate.buckets["carol"][0] == 0
    finally:
        q.resume()


@session_loop
async def test_tokens_come_back_to_a_request_whose_items_never_ran(served):
    """The rate limit shares out model time. A request that ends before any of its items
    reached a model batch (the tokenizer's 422, its deadline passed while queued, its
    client gone) used none: its tokens come back, and the client's next request at the burst
    passes at once (each of them spent the tokens on nothing, and it waited 30 s). One whose
    items were taken into a batch keeps them spent, however it ends."""
    srv, clock = served
    q, quota, rate = srv.queue, srv.state.client_quota, rate_of(srv)
    assert quota is not None
    full = (3.0, clock.now)  # alice's burst
    async with srv.client() as c:
        r = await c.post("/v1/pos", json={"text": "word " * 400}, headers={"X-API-Key": ALICE})
        assert r.status_code == 422 and r.json()["error"]["code"] == "input_too_long", r.text
        assert rate.buckets["alice"] == full
        q.pause()
        try:
            r = await post_polarity(c, ALICE, 3, deadline_ms=100)
            assert r.status_code == 504, r.text
            assert rate.buckets["alice"] == full
            # the client goes away while its items are queued (its task is cancelled)
            body = b'{"inputs": [{"text": "a"}, {"text": "b"}, {"text": "c"}]}'
            request = (
                f"POST /v1/polarity HTTP/1.1\r\nHost: x\r\nX-API-Key: {ALICE}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(request)
            await writer.drain()
            await wait_for(lambda: quota.in_flight == {"alice": 3})
            writer.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            writer.close()
            await wait_for(lambda: not quota.in_flight)
            assert rate.buckets["alice"] == full
        finally:
            q.resume()
        assert (await post_polarity(c, ALICE, 3)).status_code == 200  # the burst, at once

        clock.now += 30  # full again; now a batch that has started when the request ends
        gated = GatedRunner(q.runners[POLARITY_MODEL])
        q.runners[POLARITY_MODEL] = gated
        try:
            r = await post_polarity(c, ALICE, 3, deadline_ms=300)
            assert r.status_code == 504, r.text
            assert gated.started  # its items were in a batch
        finally:
            gated.gate.set()
            q.runners[POLARITY_MODEL] = gated.inner
        assert_rate_refusal(await post_polarity(c, ALICE), retry_after=10)


@session_loop
async def test_the_response_caches_answers_take_no_tokens(model_repo, keys_file):
    async with live_server(settings_for(model_repo, keys_file, response_cache_mb=1)) as srv:
        rate_of(srv).clock = FakeClock()
        async with srv.client() as c:
            assert (await post_polarity(c, BOB, text="known")).status_code == 200  # its 1 token
            r = await post_polarity(c, BOB, text="known")  # answered by the cache: no model run
            assert r.status_code == 200 and r.headers["server-timing"].startswith("cache;desc=hit")
            mixed = {"inputs": [{"text": "known 0"}, {"text": "new"}]}
            r = await c.post("/v1/polarity", json=mixed, headers={"X-API-Key": BOB})
            assert_rate_refusal(r, retry_after=2, rate=0.5)  # needs 1: the miss only


@session_loop
async def test_items_are_counted_per_client_as_the_rate_limit_charges_them(model_repo, keys_file):
    """nlpserve_client_items_total: the items run, as the tokens taken; neither the cache's
    answers nor a refused request's; the series gone with the client."""
    async with live_server(settings_for(model_repo, keys_file, response_cache_mb=1)) as srv:
        rate_of(srv).clock = FakeClock()  # no refill: the tokens taken are the items charged
        keys = srv.state.api_keys
        assert keys is not None

        async def items(c: httpx.AsyncClient) -> dict[str, float]:
            text = await read_metrics(c)
            names = ("alice", "bob", "carol")
            return {n: metric_value(text, "nlpserve_client_items_total", client=n) for n in names}

        async with srv.client() as c:
            text = await read_metrics(c)
            for name in ("alice", "bob", "carol"):  # from the start, at 0
                assert f'nlpserve_client_items_total{{client="{name}"}} 0.0' in text
            assert (await post_polarity(c, ALICE, 2, text="run")).status_code == 200
            assert (await post_polarity(c, ALICE, 2, text="run")).status_code == 200  # the cache's
            assert (await post_polarity(c, ALICE, 4)).status_code == 422  # over its burst of 3
            mixed = {"inputs": [{"text": "run 0"}, {"text": "run 1"}, {"text": "new"}]}
            r = await c.post("/v1/polarity", json=mixed, headers={"X-API-Key": ALICE})
            assert r.status_code == 200  # 1 run, 2 from the cache
            assert_rate_refusal(await post_polarity(c, ALICE, text="more"), retry_after=10)
            assert await items(c) == {"alice": 3, "bob": 0, "carol": 0}
            assert rate_of(srv).buckets["alice"][0] == 0  # its burst of 3: all 3 charged

            keys.path.write_text(f"carol {CAROL}\n")  # alice and bob gone: their series too
            assert keys.reload()
            text = await read_metrics(c)
            assert "nlpserve_client_items_total" in text
            assert 'client="alice"' not in text and 'client="bob"' not in text


@session_loop
async def test_a_reload_changes_the_rate_at_once(served):
    srv, clock = served
    keys = srv.state.api_keys
    assert keys is not None
    async with srv.client() as c:
        assert (await post_polarity(c, ALICE, 3)).status_code == 200
        assert_rate_refusal(await post_polarity(c, ALICE), retry_after=10)

        keys.path.write_text(KEYS.replace("rate=0.1 burst=3", "rate=100 burst=20"))
        assert keys.reload()
        clock.now += 1  # refilled at the new rate, up to the new burst
        assert (await post_polarity(c, ALICE, 20)).status_code == 200
        assert_rate_refusal(await post_polarity(c, ALICE), retry_after=1, rate=100)

        keys.path.write_text(KEYS.replace("rate=0.1 burst=3", "rate=1"))  # burst lowered
        assert keys.reload()
        clock.now += 3600
        r = await post_polarity(c, ALICE, 2)
        assert r.status_code == 422 and "at most 1 at once" in r.text
        assert r.json()["error"]["limit"] == {"name": "burst", "value": 1}  # the new one
        assert (await post_polarity(c, ALICE)).status_code == 200
        text = await read_metrics(c)
        assert metric_value(text, "nlpserve_client_rate", client="alice") == 1

        # its own rate gone: NLPSERVE_CLIENT_RATE's (bob's); a client gone: its bucket too
        keys.path.write_text(f"alice {ALICE}\n")
        assert keys.reload()
        assert rate_of(srv).rates == {"alice": Rate(0.5, 1)}
        assert set(rate_of(srv).buckets) <= {"alice"}
        text = await read_metrics(c)
        assert 'nlpserve_client_rate{client="bob"}' not in text
        assert metric_value(text, "nlpserve_client_rate", client="alice") == 0.5


@session_loop
async def test_a_burst_lowered_between_the_check_and_the_take_is_422_not_429(served):
    """The in-flight admission between the two may wait on Redis: a reload meanwhile that
    lowers the client's burst below the request's items makes it one no retry could pass,
    the 422 of a request over the burst, not a 429 whose Retry-After never comes true."""
    srv, clock = served
    keys, rate = srv.state.api_keys, rate_of(srv)
    assert keys is not None
    clock.now += 3600  # a full bucket: 3
    rate.check("alice", 3)
    keys.path.write_text(KEYS.replace("rate=0.1 burst=3", "rate=0.1 burst=2"))
    assert keys.reload()
    with pytest.raises(ApiError) as refused:
        await rate.take("alice", 3)
    assert (refused.value.status_code, refused.value.code) == (422, "too_many_items")
    assert "this client may send at most 2 at once" in refused.value.message
    await rate.take("alice", 2)  # nothing was taken: the lowered burst's 2 are there


# --------------------------------------------------------------------------- settings
@session_loop
async def test_the_rate_needs_a_keys_file_and_the_burst_a_rate(model_repo, keys_file, tmp_path):
    assert Settings(client_rate="", client_burst="").client_rate is None  # compose's ${VAR:-}
    from service.api.app import create_app

    with pytest.raises(ClientRateConfigError, match="set NLPSERVE_API_KEYS_FILE too"):
        create_app(make_settings(model_repo, client_rate=2))
    with pytest.raises(ClientRateConfigError, match="set NLPSERVE_CLIENT_RATE too"):
        create_app(make_settings(model_repo, api_keys_file=keys_file, client_burst=2))
    serve = ("serve", "--models", str(tmp_path), "--port", "0")
    run = _cli(*serve, NLPSERVE_CLIENT_RATE="4")
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "nlpserve: invalid setting: NLPSERVE_CLIENT_RATE limits each client, and clients are "
        "known only by their API key: set NLPSERVE_API_KEYS_FILE too (docs/deploy.md, "
        "Authentication), or unset it"
    ]
    run = _cli(*serve, NLPSERVE_API_KEYS_FILE=str(keys_file), NLPSERVE_CLIENT_BURST="4")
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "nlpserve: invalid setting: NLPSERVE_CLIENT_BURST is the burst of NLPSERVE_CLIENT_RATE's "
        "rate: set NLPSERVE_CLIENT_RATE too, or unset it (a client's own burst=B goes with its "
        "rate=R in the keys file)"
    ]
    # a line with a bad rate stops the server in one line, as any malformed line does
    bad = tmp_path / "bad-keys"
    bad.write_text(f"alice {ALICE} rate=0\n")
    run = _cli(*serve, NLPSERVE_API_KEYS_FILE=str(bad))
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"nlpserve: invalid setting: NLPSERVE_API_KEYS_FILE: {bad}:1: client 'alice': rate is "
        "items a second, a number above 0 (0.1: one every 10 s; without the field it has "
        "NLPSERVE_CLIENT_RATE's)"
    ]
    assert ALICE not in run.stderr + run.stdout


def test_the_default_burst_is_one_seconds_items_at_least_one(model_repo, keys_file):
    from service.api.client_rate import default_rate

    assert default_rate(make_settings(model_repo, client_rate=0.2)) == Rate(0.2, 1)
    assert default_rate(make_settings(model_repo, client_rate=2.5)) == Rate(2.5, 3)
    assert default_rate(make_settings(model_repo, client_rate=2, client_burst=9)) == Rate(2, 9)
    assert default_rate(make_settings(model_repo)) is None


def test_keys_new_rate_and_burst_print_the_fields():
    made = _cli("keys", "new", "paying", "--rate", "2.5", "--burst", "10")
    assert made.returncode == 0, made.stderr
    key, line = made.stdout.splitlines()
    assert line.endswith(" rate=2.5 burst=10")
    parsed = parse_keys(line + "\n", "f")
    assert parsed.keys == {digest(key): "paying"} and parsed.rates == {"paying": Rate(2.5, 10)}
    made = _cli("keys", "new", "paying", "--rate", "0.1")
    assert made.returncode == 0 and made.stdout.splitlines()[1].endswith(" rate=0.1")
    for args, why in (
        (("--rate", "0"), "invalid --rate"),
        (("--rate", "-1"), "invalid --rate"),
        (("--rate", "inf"), "invalid --rate"),
        (("--burst", "4"), "--burst is the burst of --rate"),
        (("--rate", "1", "--burst", "0"), "greater than or equal to 1"),
    ):
        refused = _cli("keys", "new", "paying", *args)
        assert refused.returncode == 2 and not refused.stdout, args
        assert why in refused.stderr, (args, refused.stderr)
