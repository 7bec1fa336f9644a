"""nlpserve against a production-like Redis (docs/deploy.md, "Production Redis"): TLS with a
private CA (``rediss://...?ssl_ca_certs=``), the default user off, an ACL user holding only
the rule the docs give, a key prefix, the password in a file, and credentials that never
appear in an error.

The server is spawned here (TLS and an ACL file); the module skips where ``openssl`` is
missing or ``redis-server`` was built without TLS.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from service.config import Settings
from service.queueing.redis_keys import make_client
from service.queueing.redis_queue import RedisQueue
from tests.redis_backend.helpers import api_queue, assert_same, direct, make_item, running_worker
from tests.redis_support import EXTERNAL_URL, RedisServer, unique_prefix

ROOT = Path(__file__).resolve().parents[2]
ADMIN_PASSWORD = "admin-pw"


def documented_acl_rule() -> list[str]:
    """The ACL rule of docs/deploy.md (its ``user nlpserve on ...`` line), without the name."""
    text = (ROOT / "docs/deploy.md").read_text("utf-8")
    line = next(x for x in text.splitlines() if x.startswith("user nlpserve on "))
    return line.split()[2:]


def acl_rule(prefix: str, password: str, rule: list[str] | None = None) -> list[str]:
    """The documented rule for ``prefix`` (it is written for the default, ``nlpserve``)."""
    out = []
    for token in documented_acl_rule() if rule is None else rule:
        if token.startswith(">"):
            token = ">" + password
        out.append(token.replace("~nlpserve:", f"~{prefix}:").replace("&nlpserve:", f"&{prefix}:"))
    return out


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA and a server certificate for localhost and 127.0.0.1, with the
    extensions RFC 5280 asks for (the CA's key usage, the server's authority key id), which
    Python 3.13's clients require (docs/deploy.md, "Production Redis")."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH")
    d = tmp_path_factory.mktemp("tls")
    new_key = ["-newkey", "rsa:2048", "-nodes"]
    _openssl("req", "-x509", *new_key, "-days", "2", "-subj", "/CN=nlpserve-test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt")  # fmt: skip
    _openssl("req", *new_key, "-subj", "/CN=localhost",
             "-keyout", f"{d}/server.key", "-out", f"{d}/server.csr")  # fmt: skip
    (d / "ext.cnf").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "authorityKeyIdentifier=keyid,issuer\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl("x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.crt",
             "-CAkey", f"{d}/ca.key", "-CAcreateserial", "-days", "2",
             "-extfile", f"{d}/ext.cnf", "-out", f"{d}/server.crt")  # fmt: skip
    return d


class TlsRedisServer(RedisServer):
    """TLS only (no plain port), the default user off, an ``admin`` user for the tests."""

    def __init__(self, workdir: Path, certs: Path) -> None:
        super().__init__(workdir)
        self.certs = certs
        acl = workdir / "users.acl"
        workdir.mkdir(parents=True, exist_ok=True)
        acl.write_text(f"user default off\nuser admin on >{ADMIN_PASSWORD} ~* &* +@all\n")
        self.extra_args = [
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(certs / "server.crt"),
            "--tls-key-file", str(certs / "server.key"),
            "--tls-ca-cert-file", str(certs / "ca.crt"),
            "--tls-auth-clients", "no",
            "--aclfile", str(acl),
        ]  # fmt: skip

    # A method, not the plain server's property: each URL names its user.
    def url(self, user: str = "admin", password: str = ADMIN_PASSWORD) -> str:  # type: ignore[override]
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if password else f"{user}@"
        return f"rediss://{auth}localhost:{self.port}/0?ssl_ca_certs={self.certs / 'ca.crt'}"

    def ping(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        # Python 3.13's default (RFC 5280 conformance), on every Python: the certificates
        # must be what a 3.13 client of nlpserve (redis-py's default context) accepts.
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost") as s,
            ):
                s.sendall(f"AUTH admin {ADMIN_PASSWORD}\r\nPING\r\n".encode())
                got = b""
                while b"+PONG" not in got and len(got) < 64:
                    chunk = s.recv(64)
                    if not chunk:
                        break
                    got += chunk
                return b"+PONG" in got
        except ssl.SSLCertVerificationError:
            raise  # the server is up: the client refused its certificate
        except OSError:
            return False


@dataclass
class Prod:
    server: TlsRedisServer
    admin: aioredis.Redis

    async def add_user(self, prefix: str, password: str, rule: list[str] | None = None) -> str:
        user = f"nlpserve-{prefix}"
        await self.admin.execute_command("ACL", "SETUSER", user, *acl_rule(prefix, password, rule))
        return user


@pytest.fixture(scope="module")
def tls_server(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedisServer]:
    if EXTERNAL_URL:
        pytest.skip("NLPSERVE_REDIS_URL is set: these tests spawn a TLS server of their own")
    server = TlsRedisServer(tmp_path_factory.mktemp("redis-tls"), certs)
    try:
        server.start()
    except RuntimeError as e:  # e.g. a redis-server built without TLS exits at once
        pytest.skip(f"redis-server with TLS did not start ({e}); needs Redis 6+ built with TLS")
    except BaseException:  # e.g. the certificate refused: a failure, not a skip
        server.stop()
        raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def prod(tls_server: TlsRedisServer) -> AsyncIterator[Prod]:
    admin = aioredis.from_url(tls_server.url())
    await admin.execute_command("ACL", "LOG", "RESET")
    try:
        yield Prod(tls_server, admin)
    finally:
        await admin.aclose()


async def test_tls_and_the_documented_acl_rule_serve(prod, make_settings, tiny_runners, caplog):
    """API side (its queue, its clients' counts and buckets) and worker over TLS as a user
    holding only docs/deploy.md's rule, with a password that needs percent-encoding: answers as
    direct inference, and Redis denied nothing (its ACL LOG is empty), also while the worker reads
    the server's version and leaves on stop."""
    caplog.set_level(logging.INFO)
    prefix, password = unique_prefix(), "p@ss/w#rd:?%&="
    user = await prod.add_user(prefix, password)
    settings = make_settings(redis_url=prod.server.url(user, password), redis_prefix=prefix)
    rng = np.random.default_rng(0)
    items = [make_item(tiny_runners[m], int(rng.integers(1, 30)), rng) for m in [*tiny_runners] * 4]
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, tiny_runners) as w:
        got = await asyncio.gather(*(q.submit(it) for it in items))
        # a client's items in flight across replicas: alone, then a pipelined burst
        counts, deadline = q.shared_in_flight(), time.monotonic() + 5
        assert await counts.acquire("alice", "one", 2, 3, deadline) == (True, 0)
        burst = [counts.acquire("alice", f"b{i}", 1, 3, deadline) for i in range(3)]
        assert await asyncio.gather(*burst) == [(True, 2), (False, 3), (False, 3)]
        await asyncio.gather(
            counts.release("alice", "one", 2, deadline), counts.release("alice", "b0", 1, deadline)
        )
        assert not await prod.admin.exists(counts.key("alice"))
        # a client's token bucket: alone, then pipelined (HGETALL, HSET, EXPIRE in a script)
        buckets = q.shared_rate()
        assert (await buckets.take("alice", 2, 0.1, 3))[0]
        takes = await asyncio.gather(*(buckets.take("alice", 1, 0.1, 3) for _ in range(2)))
        assert [taken for taken, _ in takes] == [True, False]
    for g, it in zip(got, items, strict=True):
        assert_same(g, direct(tiny_runners[it.model], it))
    assert w._version_checked and "older than 7.0" not in caplog.text
    assert "not checking" not in caplog.text  # the version was read (HELLO, not INFO)
    denied = await prod.admin.execute_command("ACL", "LOG")
    assert denied == [], denied
    keys = [k.decode() async for k in prod.admin.scan_iter(match="*")]
    assert keys and all(k.startswith(f"{prefix}:") for k in keys), keys
    assert password not in caplog.text and quote(password, safe="") not in caplog.text


async def test_a_rule_from_before_time_still_serves_on_the_hosts_clocks(
    prod, make_settings, tiny_runners, caplog
):
    """A rolling upgrade over a user whose rule predates ``+time`` (it had ``+ping``): the
    replica and the worker say so, fall back to their hosts' clocks, and serve; Redis denied
    them nothing but TIME."""
    caplog.set_level(logging.INFO)
    prefix = unique_prefix()
    older = [t for t in documented_acl_rule() if t != "+time"]
    assert "+ping" in older
    user = await prod.add_user(prefix, "secret", older)
    settings = make_settings(redis_url=prod.server.url(user, "secret"), redis_prefix=prefix)
    rng = np.random.default_rng(1)
    items = [make_item(tiny_runners[m], int(rng.integers(1, 30)), rng) for m in [*tiny_runners] * 2]
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, tiny_runners):
        assert await q.is_ready()
        got = await asyncio.gather(*(q.submit(it) for it in items))
        assert q.clock.denied
    for g, it in zip(got, items, strict=True):
        assert_same(g, direct(tiny_runners[it.model], it))
    assert caplog.text.count("may not run TIME") == 2  # the replica's and the worker's
    denied = await prod.admin.execute_command("ACL", "LOG")
    assert denied and {d[b"object"] for d in denied} == {b"time"}, denied


async def test_the_documented_rule_still_serves_the_release_before_it(prod) -> None:
    """docs/deploy.md lets a rolling upgrade change the rule before the images: the replicas
    of the release before probe Redis with a pipelined PING and XLEN (that release's
    health probe). Without ``+ping`` in the rule each of those probes is refused, and every
    replica not yet replaced stops being ready at once."""
    prefix = unique_prefix()
    user = await prod.add_user(prefix, "secret")
    client = make_client(Settings(redis_url=prod.server.url(user, "secret")))
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.ping()
            pipe.xlen(f"{prefix}:pos-en:v1:b0")
            assert await pipe.execute() == [True, 0]
    finally:
        await client.aclose()
    denied = await prod.admin.execute_command("ACL", "LOG")
    assert denied == [], denied


async def test_a_rule_that_loses_time_while_running_keeps_replica_and_worker_serving(
    prod, make_settings, tiny_runners, caplog
):
    """The rule rolled back to one without ``+time`` while a replica and a worker run (an
    upgrade rolled back, the old rule reapplied): both fall back to their hosts' clocks, as
    when the rule lacked it at start. The replica's probe, refused at its TIME, used to fail
    at every round: the replica was never ready again until restarted."""
    caplog.set_level(logging.INFO)
    prefix = unique_prefix()
    user = await prod.add_user(prefix, "secret")
    settings = make_settings(redis_url=prod.server.url(user, "secret"), redis_prefix=prefix)
    rng = np.random.default_rng(2)
    items = [make_item(tiny_runners[m], int(rng.integers(1, 30)), rng) for m in tiny_runners]
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, tiny_runners) as w:
        # A tuple: mypy would keep `not q.clock.denied` narrowed across the awaits below.
        assert (q.clock.measured, q.clock.denied) == (True, False)
        await prod.admin.execute_command("ACL", "SETUSER", user, "-time")
        for _ in range(200):  # the next probe and beat (0.5 s and 2 s apart)
            if q.clock.denied and w.clock.denied:
                break
            await asyncio.sleep(0.05)
        assert q.clock.denied and w.clock.denied, caplog.text
        for _ in range(200):  # the probe after the refused one, on the fallback
            if await q.is_ready():
                break
            await asyncio.sleep(0.05)
        assert await q.is_ready(), caplog.text
        got = await asyncio.gather(*(q.submit(it) for it in items))
    for g, it in zip(got, items, strict=True):
        assert_same(g, direct(tiny_runners[it.model], it))
    assert caplog.text.count("may not run TIME") == 2  # the replica's and the worker's
    assert "refused its heartbeat" not in caplog.text


async def test_password_file_is_read_at_each_new_connection(prod, tmp_path: Path) -> None:
    """NLPSERVE_REDIS_PASSWORD_FILE: the URL names the user only; a rotated password (the
    secret file rewritten, the old connections dropped) is used without a restart."""
    prefix = unique_prefix()
    user = await prod.add_user(prefix, "first-secret")
    secret = tmp_path / "redis-password"
    secret.write_text("first-secret\n")  # as `echo ... > file` writes it
    settings = Settings(redis_url=prod.server.url(user, ""), redis_password_file=secret)
    client = make_client(settings)
    try:
        assert await client.time()  # a command the documented rule allows
        await prod.admin.execute_command("ACL", "SETUSER", user, "resetpass", ">second-secret")
        secret.write_text("second-secret")
        await prod.admin.execute_command("CLIENT", "KILL", "USER", user)
        assert await client.time()  # reconnected (one retry) with the new password
    finally:
        await client.aclose()


async def test_a_refusal_is_logged_with_its_cause(prod, make_settings, tiny_runners, caplog):
    """A user whose ACL lacks the channel pattern (Redis 7 grants no channel by default), or
    a wrong password: the replica is not ready and says why, instead of only "not
    reachable" (Redis is reachable)."""
    prefix = unique_prefix()
    no_channels = [t for t in documented_acl_rule() if not t.startswith("&")]
    user = await prod.add_user(prefix, "secret", no_channels)
    manifests = {n: r.manifest for n, r in tiny_runners.items()}
    for password, cause in [("secret", "NoPermissionError"), ("wrong", "AuthenticationError")]:
        caplog.clear()
        settings = make_settings(redis_url=prod.server.url(user, password), redis_prefix=prefix)
        q = RedisQueue(settings, manifests)
        await q.start()
        try:
            assert not await q.is_ready()
            assert f"not reachable yet ({cause}" in caplog.text
            assert "check the user and ACL rules of NLPSERVE_REDIS_URL" in caplog.text
            assert f":{password}@" not in caplog.text
        finally:
            await q.close(drain_timeout_s=0.1)


def test_redis_py_errors_about_the_url_quote_no_credentials() -> None:
    """A URL the settings' check did not see (Settings.model_copy skips validation): redis-py's
    own message would quote the password's start as the port."""
    url = "redis://nlpserve:Xy7#rest-of-secret@redis-host:6379/0"
    settings = Settings().model_copy(update={"redis_url": url})
    with pytest.raises(ValueError) as info:
        make_client(settings)
    assert "Xy7" not in str(info.value) and "secret" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.fixture
def plain_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, started with ``extra_args`` the test sets first."""
    if EXTERNAL_URL:
        pytest.skip("NLPSERVE_REDIS_URL is set: these tests spawn a server of their own")
    server = RedisServer(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


async def test_a_unix_socket_url_connects(plain_server: RedisServer, tmp_path: Path) -> None:
    """``unix://`` is a URL the settings accept: its connections take no TCP keep-alive
    option (passed anyway, each connection failed with a TypeError that the worker's read
    loop does not catch)."""
    sock = tmp_path / "redis.sock"
    plain_server.extra_args = ["--unixsocket", str(sock)]
    plain_server.start()
    client = make_client(Settings(redis_url=f"unix://{sock}?db=0"))
    try:
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_password_file_that_cannot_be_read_is_a_connection_error(
    plain_server: RedisServer, tmp_path: Path
) -> None:
    """The secret not mounted (yet): each command fails as a Redis connection error naming
    the setting and the file (what the replicas' and workers' retry paths log), none runs
    on a connection left unauthenticated, and the file once there is used."""
    plain_server.start()
    admin = aioredis.from_url(plain_server.url)
    await admin.config_set("requirepass", "the-secret")
    await admin.aclose()
    secret = tmp_path / "redis-password"
    settings = Settings(redis_url=plain_server.url, redis_password_file=secret)
    client = make_client(settings)
    try:
        for _ in range(2):
            with pytest.raises(redis.exceptions.ConnectionError) as info:
                await client.ping()
            assert str(info.value) == (
                f"NLPSERVE_REDIS_PASSWORD_FILE {secret}: No such file or directory"
            )
        secret.write_text("the-secret\n")
        assert await client.ping()
    finally:
        await client.aclose()
