"""W3C Trace Context through the nginx gateway (deploy/nginx/gateway.conf.template): the
caller's ``traceparent`` and ``tracestate`` reach the replica, its answer's ``traceparent``
reaches the caller, and nginx's access log names the trace. One replica of the real API
(in-process queue, tiny models) behind the repository's own gateway config."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from bench import procs
from tests.service_support import POLARITY_MODEL, live_server, make_settings, require_model

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="needs nginx (Debian package nginx)",
)
async def test_trace_context_passes_the_gateway_and_is_logged(model_repo, tmp_path):
    require_model(model_repo, POLARITY_MODEL)
    async with live_server(make_settings(model_repo)) as srv:
        port = procs.free_port()
        nginx = procs.start_nginx(
            tmp_path,
            {
                "NLPSERVE_UPSTREAMS": f"server 127.0.0.1:{srv.port};",
                "NLPSERVE_GATEWAY_PORT": str(port),
                "NLPSERVE_RATE_LIMIT": "100",
                "NLPSERVE_MAX_BODY": "1m",
                **procs.no_grpc_upstream(),
            },
        )
        with procs.stopping([nginx]):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                r = await c.post(
                    "/v1/polarity",
                    json={"text": "good"},
                    headers={"traceparent": SENT, "tracestate": "rojo=1"},
                )
                # the replica saw both headers: it continued the trace and sent the state back
                assert r.status_code == 200, r.text
                assert r.headers["traceparent"].startswith(f"00-{TRACE_ID}-")
                assert r.headers["traceparent"].endswith("-01")
                assert r.headers["tracestate"] == "rojo=1"
                untraced = await c.post("/v1/polarity", json={"text": "good"})
                minted = untraced.headers["traceparent"]
                assert TRACE_ID not in minted
        log = nginx.log_path.read_text()
    (traced,) = [line for line in log.splitlines() if f"traceparent={SENT}" in line]
    assert f"upstream_traceparent={r.headers['traceparent']}" in traced
    # a caller without a trace: the log has the one the replica started
    assert f"traceparent=- upstream_traceparent={minted}" in log
