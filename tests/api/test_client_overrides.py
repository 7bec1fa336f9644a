"""A client's own in-flight limit (``max_in_flight=N`` on its lines of NLPSERVE_API_KEYS_FILE,
service/api/client_quota.py) over real HTTP with real keys: above and below
NLPSERVE_CLIENT_MAX_IN_FLIGHT, shared by a client's keys, without the setting (the others then
unlimited but counted), changed by a reload without cutting off what is in flight; a file whose
lines of one client disagree is refused at start (one line, exit 2) and on reload (the keys in
force kept, the failure counted); the per-client series follow the file's clients."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from service.api.auth import HASH_PREFIX, digest, key_line, parse_keys
from service.api.client_quota import ClientQuota
from tests.api.test_auth import _cli
from tests.service_support import (
    POLARITY_MODEL,
    POS_MODEL,
    LiveServer,
    live_server,
    make_settings,
    metric_value,
    post_polarity,
    read_metrics,
    wait_for,
)

session_loop = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parents[2]
LOADED = f"{POLARITY_MODEL},{POS_MODEL}"  # the LSTMs: a server starts in a second
DEFAULT = 3  # NLPSERVE_CLIENT_MAX_IN_FLIGHT
ALICE = "alice-override-key-0123456789"  # the default limit
BULK = "bulk-override-key-0123456789"  # max_in_flight=5, higher
BULK_2 = "bulk-second-key-for-rotation-01"  # the same client's second key
TINY = "tiny-override-key-0123456789"  # max_in_flight=1, lower
OWN = "this client's max_in_flight in NLPSERVE_API_KEYS_FILE"


def hashed(key: str) -> str:
    return f"{HASH_PREFIX}{digest(key).hex()}"


def quota_of(srv: LiveServer) -> ClientQuota:
    quota = srv.state.client_quota
    assert quota is not None
    return quota


async def hold(srv: LiveServer, c: httpx.AsyncClient, key: str, client: str, n: int) -> list:
    """``n`` single-item requests of ``key``, admitted and held in the paused queue."""
    before = quota_of(srv).in_flight.get(client, 0)
    tasks = [post_polarity(c, key) for _ in range(n)]
    await wait_for(lambda: quota_of(srv).in_flight.get(client, 0) == before + n)
    return tasks


def assert_refused(r: httpx.Response, held: int, limit: int, where: str) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "client_quota"
    message = r.json()["error"]["message"]
    assert f"this client has {held} items in flight and this request needs 1 more" in message
    assert f"the limit for this client is {limit} ({where})" in message


def series(text: str, name: str, client: str) -> bool:
    return any(line.startswith(f'{name}{{client="{client}"}} ') for line in text.splitlines())


@session_loop
async def test_overrides_above_and_below_the_default(model_repo, tmp_path):
    path = tmp_path / "api-keys"
    path.write_text(
        f"alice {hashed(ALICE)}\n"
        f"bulk {hashed(BULK)} max_in_flight=5\n"
        f"bulk {BULK_2} max_in_flight=5  # being rotated in\n"
        f"tiny {hashed(TINY)} max_in_flight=1\n"
    )
    settings = make_settings(
        model_repo, load_models=LOADED, api_keys_file=path, client_max_in_flight=DEFAULT
    )
    async with live_server(settings) as srv, srv.client() as c:
        q = srv.queue
        q.pause()
        try:
            metrics = await read_metrics(c)
            for client, limit in (("alice", DEFAULT), ("bulk", 5), ("tiny", 1)):
                got = metric_value(metrics, "nlpserve_client_max_in_flight", client=client)
                assert got == limit, client
                assert series(metrics, "nlpserve_client_in_flight", client)  # at 0, from start

            held = await hold(srv, c, ALICE, "alice", DEFAULT)
            assert_refused(
                await post_polarity(c, ALICE), DEFAULT, DEFAULT, "NLPSERVE_CLIENT_MAX_IN_FLIGHT"
            )

            # higher: 5, over both of the client's keys together
            held += await hold(srv, c, BULK, "bulk", 3)
            held += await hold(srv, c, BULK_2, "bulk", 2)
            assert_refused(await post_polarity(c, BULK_2), 5, 5, OWN)
            assert_refused(await post_polarity(c, BULK), 5, 5, OWN)

            # lower: 1, and a batch over it could never be admitted
            r = await post_polarity(c, TINY, 2)
            assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_items"
            assert f"at most 1 in flight ({OWN})" in r.json()["error"]["message"]
            held += await hold(srv, c, TINY, "tiny", 1)
            assert_refused(await post_polarity(c, TINY), 1, 1, OWN)

            assert quota_of(srv).in_flight == {"alice": 3, "bulk": 5, "tiny": 1}
            assert q.depth(POLARITY_MODEL) == 9
            metrics = await read_metrics(c)
            assert metric_value(metrics, "nlpserve_client_in_flight", client="bulk") == 5
            refused = "nlpserve_client_quota_rejections_total"
            assert metric_value(metrics, refused, client="bulk") == 2
            assert metric_value(metrics, refused, client="tiny") == 1
        finally:
            q.resume()
        assert [(await t).status_code for t in held] == [200] * 9
        await wait_for(lambda: not quota_of(srv).in_flight)


@session_loop
async def test_overrides_without_the_default_limit_only_those_clients(model_repo, tmp_path):
    """NLPSERVE_CLIENT_MAX_IN_FLIGHT unset: a client with max_in_flight has that limit,
    the others none; all are counted."""
    path = tmp_path / "api-keys"
    path.write_text(f"alice {ALICE}\ntiny {TINY} max_in_flight=1\n")
    settings = make_settings(model_repo, load_models=LOADED, api_keys_file=path)
    async with live_server(settings) as srv, srv.client() as c:
        q = srv.queue
        q.pause()
        try:
            held = await hold(srv, c, ALICE, "alice", 6)  # no limit
            held += await hold(srv, c, TINY, "tiny", 1)
            assert_refused(await post_polarity(c, TINY), 1, 1, OWN)
            metrics = await read_metrics(c)
            assert metric_value(metrics, "nlpserve_client_in_flight", client="alice") == 6
            assert metric_value(metrics, "nlpserve_client_max_in_flight", client="tiny") == 1
            assert not series(metrics, "nlpserve_client_max_in_flight", "alice")
        finally:
            q.resume()
        assert [(await t).status_code for t in held] == [200] * 7


@session_loop
async def test_a_reload_changes_the_limit_without_cutting_off_what_is_in_flight(
    model_repo, tmp_path
):
    path = tmp_path / "api-keys"
    path.write_text(f"alice {ALICE}\ntiny {TINY}\n")
    settings = make_settings(
        model_repo, load_models=LOADED, api_keys_file=path, client_max_in_flight=2
    )
    async with live_server(settings) as srv, srv.client() as c:
        keys, q = srv.state.api_keys, srv.queue
        assert keys is not None
        q.pause()
        try:
            held = await hold(srv, c, ALICE, "alice", 2)
            assert_refused(await post_polarity(c, ALICE), 2, 2, "NLPSERVE_CLIENT_MAX_IN_FLIGHT")

            path.write_text(f"alice {ALICE} max_in_flight=4\ntiny {TINY}\n")  # raised
            assert keys.reload()
            held += await hold(srv, c, ALICE, "alice", 2)
            assert_refused(await post_polarity(c, ALICE), 4, 4, OWN)

            path.write_text(f"alice {ALICE} max_in_flight=1\ntiny {TINY}\n")  # lowered
            assert keys.reload()
            limit = metric_value(
                await read_metrics(c), "nlpserve_client_max_in_flight", client="alice"
            )
            assert limit == 1
            # over the new limit: nothing it holds is cut off, nothing new is admitted
            assert quota_of(srv).in_flight == {"alice": 4}
            assert_refused(await post_polarity(c, ALICE), 4, 1, OWN)
            held.append(post_polarity(c, TINY, 2))  # tiny keeps the default: a pair admitted
            await wait_for(lambda: quota_of(srv).in_flight.get("tiny") == 2)
        finally:
            q.resume()
        assert [(await t).status_code for t in held] == [200] * 5
        await wait_for(lambda: not quota_of(srv).in_flight)
        assert (await post_polarity(c, ALICE)).status_code == 200  # under it again: admitted

        # back to the default by dropping the field
        path.write_text(f"alice {ALICE}\ntiny {TINY}\n")
        assert keys.reload()
        q.pause()
        try:
            held = await hold(srv, c, ALICE, "alice", 2)
            assert_refused(await post_polarity(c, ALICE), 2, 2, "NLPSERVE_CLIENT_MAX_IN_FLIGHT")
        finally:
            q.resume()
        assert [(await t).status_code for t in held] == [200] * 2


@session_loop
async def test_a_conflicting_rewrite_keeps_the_keys_and_limits_in_force(model_repo, tmp_path):
    path = tmp_path / "api-keys"
    path.write_text(f"alice {ALICE} max_in_flight=1\n")
    settings = make_settings(model_repo, load_models=LOADED, api_keys_file=path)
    async with live_server(settings) as srv, srv.client() as c:
        failures = "nlpserve_api_keys_reload_failures_total"
        # a second key for alice with another limit, and a new client: none of it applies
        path.write_text(
            f"alice {ALICE} max_in_flight=1\nalice {BULK} max_in_flight=8\ntiny {TINY}\n"
        )

        async def counted() -> bool:
            return metric_value(await read_metrics(c), failures) == 1

        for _ in range(100):  # the watcher sees the change within a second
            if await counted():
                break
            await asyncio.sleep(0.05)
        assert await counted()
        assert (await post_polarity(c, BULK)).status_code == 401
        assert (await post_polarity(c, TINY)).status_code == 401
        q = srv.queue
        q.pause()
        try:
            held = await hold(srv, c, ALICE, "alice", 1)
            assert_refused(await post_polarity(c, ALICE), 1, 1, OWN)
        finally:
            q.resume()
        assert (await held[0]).status_code == 200


@session_loop
async def test_the_series_follow_the_files_clients(model_repo, tmp_path):
    """Labels come from the file: a client's series go when its lines do (also while its
    items are in flight, which do not bring them back as they end), and come back with it."""
    path = tmp_path / "api-keys"
    path.write_text(f"alice {ALICE}\ntiny {TINY}\n")
    settings = make_settings(
        model_repo, load_models=LOADED, api_keys_file=path, client_max_in_flight=1
    )
    names = [
        "nlpserve_client_in_flight",
        "nlpserve_client_max_in_flight",
        "nlpserve_client_quota_rejections_total",
        "nlpserve_client_requests_total",
        "nlpserve_client_items_total",
    ]
    async with live_server(settings) as srv, srv.client() as c:
        keys, q = srv.state.api_keys, srv.queue
        assert keys is not None
        q.pause()
        try:
            held = await hold(srv, c, TINY, "tiny", 1)
            assert (await post_polarity(c, TINY)).status_code == 429
            metrics = await read_metrics(c)
            assert all(series(metrics, name, "tiny") for name in names)

            path.write_text(f"alice {ALICE}\n")  # tiny removed, one item still in flight
            assert keys.reload()
            metrics = await read_metrics(c)
            assert not any(series(metrics, name, "tiny") for name in names)
            assert series(metrics, "nlpserve_client_in_flight", "alice")
        finally:
            q.resume()
        assert (await held[0]).status_code == 200  # admitted before: answered
        await wait_for(lambda: not quota_of(srv).in_flight)
        metrics = await read_metrics(c)
        assert not any(series(metrics, name, "tiny") for name in names)

        path.write_text(f"alice {ALICE}\ntiny {TINY} max_in_flight=2\n")  # back
        assert keys.reload()
        assert (await post_polarity(c, TINY)).status_code == 200
        metrics = await read_metrics(c)
        assert metric_value(metrics, "nlpserve_client_max_in_flight", client="tiny") == 2
        assert metric_value(metrics, "nlpserve_client_requests_total", client="tiny") == 1
        assert metric_value(metrics, "nlpserve_client_items_total", client="tiny") == 1
        assert series(metrics, "nlpserve_client_in_flight", "tiny")


# --------------------------------------------------------------------------- the command
def test_serve_refuses_conflicting_lines_in_one_line(model_repo, tmp_path):
    path = tmp_path / "api-keys"
    path.write_text(f"alice {ALICE} max_in_flight=4\n# rotating\nalice {hashed(BULK)}\n")
    r = _cli(
        "serve", "--models", str(model_repo), NLPSERVE_API_KEYS_FILE=str(path), NLPSERVE_PORT="0"
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"nlpserve: invalid setting: NLPSERVE_API_KEYS_FILE: {path}:3: client 'alice' has no "
        "max_in_flight here but max_in_flight=4 on line 1: the limit is the client's, over "
        "all its keys; give its lines the same one"
    ]
    assert ALICE not in r.stderr + r.stdout


def test_keys_new_max_in_flight_prints_the_field():
    made = _cli("keys", "new", "batch-jobs", "--max-in-flight", "256")
    assert made.returncode == 0, made.stderr
    key, line = made.stdout.splitlines()
    assert line == key_line("batch-jobs", key, 256)
    assert line.endswith(" max_in_flight=256")
    parsed = parse_keys(line + "\n", "f")
    assert parsed.keys == {digest(key): "batch-jobs"} and parsed.limits == {"batch-jobs": 256}
    refused = _cli("keys", "new", "batch-jobs", "--max-in-flight", "0")
    assert refused.returncode == 2 and not refused.stdout


def test_keys_new_priority_prints_the_field():
    made = _cli("keys", "new", "batch-jobs", "--max-in-flight", "9", "--priority", "batch")
    assert made.returncode == 0, made.stderr
    key, line = made.stdout.splitlines()
    assert line.endswith(" max_in_flight=9 priority=batch")
    assert parse_keys(line + "\n", "f").priorities == {"batch-jobs": "batch"}
    refused = _cli("keys", "new", "batch-jobs", "--priority", "urgent")
    assert refused.returncode == 2 and not refused.stdout
    assert "invalid --priority 'urgent': interactive or batch" in refused.stderr
