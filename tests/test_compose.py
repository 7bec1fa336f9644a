"""docker-compose.yml checked against what the code actually reads.

There is no Docker engine on the development and CI machines, so the compose topology is
validated statically here (and run as plain processes in ``tests/e2e``): service names,
``NLPSERVE_*`` variables (each one a ``Settings`` field, or a documented gateway/healthcheck
variable), ports, health checks, Redis' eviction policy, the GPU reservation, and the files
it mounts. ``docker compose config`` runs too where a Docker client with compose exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is in the dev extra")

from bench import procs  # noqa: E402
from service.config import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
TEMPLATE = procs.GATEWAY_TEMPLATE

# Variables no Settings field reads, each with the code that does read it.
HEALTHCHECK_VARS = {"NLPSERVE_HEALTH_URL"}  # service/healthcheck.py
# Compose-file interpolation (``${VAR:-default}``), read by docker compose itself.
INTERPOLATION_DEFAULTS = {
    "NLPSERVE_GATEWAY_PUBLISH": "8080",
    "NLPSERVE_GATEWAY_GRPC_PUBLISH": "8081",
    "NLPSERVE_CPU_WORKERS": "1",
    "NLPSERVE_CPU_WORKER_MODELS": "",  # empty: every model
    "NLPSERVE_GPU_WORKER_MODELS": "",
    "NLPSERVE_CORS_ALLOW_ORIGINS": "",  # empty: no CORS headers
    "NLPSERVE_API_KEYS_FILE": "",  # empty: no authentication
    "NLPSERVE_CLIENT_MAX_IN_FLIGHT": "",  # empty: no per-client limit
    "NLPSERVE_CLIENT_RATE": "",  # empty: no per-client rate limit
    "NLPSERVE_CLIENT_BURST": "",  # empty: the rate's own
    "NLPSERVE_RESPONSE_CACHE_MB": "0",  # off
}
NLPSERVE_IMAGE_SERVICES = ("api", "worker", "worker-gpu")
# The measured memory (python -m bench.memory): docs/deploy.md's Sizing quotes its table, and
# compose's limits must hold its peaks with room to spare.
MEMORY_REPORT = ROOT / "bench" / "results" / "memory-cpu-2core.json"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
# A limit at least this many times the measured peak: the burst was measured on 2 cores, and
# a host with more runs more batches at once (one inference thread per core).
MEMORY_HEADROOM = 1.5


def _interpolate(text: str) -> str:
    """``${VAR:-default}`` -> default (compose does this before parsing)."""
    return re.sub(r"\$\{([A-Z0-9_]+):-([^}]*)\}", lambda m: m.group(2), text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(_interpolate(COMPOSE.read_text()))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...] form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _settings_env_names() -> set[str]:
    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def test_services_exist(services: dict[str, Any]) -> None:
    for name in ("gateway", "api", "worker", "redis"):
        assert name in services, f"service {name!r} missing from docker-compose.yml"
    assert "gpu" in services["worker-gpu"].get("profiles", []), "GPU worker only in `gpu` profile"


def test_roles_are_cli_commands(services: dict[str, Any]) -> None:
    from service.cli import app

    names: set[str] = set()
    for c in app.registered_commands:
        assert c.callback is not None, c  # @app.command() always sets one
        names.add(c.name or c.callback.__name__.replace("_", "-"))
    for svc in NLPSERVE_IMAGE_SERVICES:
        cmd = services[svc]["command"]
        role = cmd[0] if isinstance(cmd, list) else cmd.split()[0]
        assert role in names, f"{svc}: `nlpserve {role}` is not a CLI command ({sorted(names)})"


def test_every_nlpserve_variable_is_read_by_the_code(services: dict[str, Any]) -> None:
    known = _settings_env_names() | HEALTHCHECK_VARS
    assert "NLPSERVE_HEALTH_URL" in (ROOT / "service" / "healthcheck.py").read_text()
    for svc in NLPSERVE_IMAGE_SERVICES:
        unknown = {k for k in _env(services[svc]) if k.startswith("NLPSERVE_")} - known
        assert not unknown, f"{svc}: {sorted(unknown)} are read by nothing (typo?)"
    # The gateway's variables are exactly the ones its template uses.
    gw = {k for k in _env(services["gateway"]) if k.startswith("NLPSERVE_")}
    assert gw == procs.template_variables(TEMPLATE.read_text())
    assert gw == set(procs.GATEWAY_VARS)


def test_settings_accept_the_compose_values(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The values must validate too (a non-integer port would crash the container)."""
    for svc in NLPSERVE_IMAGE_SERVICES:
        for key in [k for k in os.environ if k.startswith("NLPSERVE_")]:
            monkeypatch.delenv(key)
        for key, value in _env(services[svc]).items():
            monkeypatch.setenv(key, value)
        s = Settings()
        assert s.queue == "redis", f"{svc} must use the Redis queue in compose"
        host = urlparse(s.redis_url).hostname
        assert host in services, f"{svc}: NLPSERVE_REDIS_URL host {host!r} is not a service"
        assert (urlparse(s.redis_url).port or 6379) == 6379
        assert str(s.model_dir) == "/models"
        assert s.model_selection() is None  # by default every service loads every model


def _port_of(url: str) -> int:
    return urlparse(url).port or 80


def test_ports_agree(services: dict[str, Any]) -> None:
    defaults = Settings()
    api, worker, gw = services["api"], services["worker"], services["gateway"]
    api_port = int(_env(api).get("NLPSERVE_PORT", defaults.port))
    assert api_port == defaults.port == 8000
    assert str(api_port) in [str(p) for p in api.get("expose", [])]
    assert _port_of(_env(api)["NLPSERVE_HEALTH_URL"]) == api_port
    assert api["labels"]["prometheus.io/port"] == str(api_port)
    # The gateway reaches every replica on that port.
    assert re.search(rf"server\s+api:{api_port}\b", _env(gw)["NLPSERVE_UPSTREAMS"])

    for name in ("worker", "worker-gpu"):
        w = services[name]
        mport = int(_env(w).get("NLPSERVE_METRICS_PORT", defaults.metrics_port))
        assert mport == defaults.metrics_port
        assert str(mport) in [str(p) for p in w.get("expose", [])]
        assert _port_of(_env(w)["NLPSERVE_HEALTH_URL"]) == mport
        assert w["labels"]["prometheus.io/port"] == str(mport)
    assert worker["labels"]["prometheus.io/path"] == "/metrics"

    gport = int(_env(gw)["NLPSERVE_GATEWAY_PORT"])
    published = [str(p) for p in gw.get("ports", [])]
    assert any(p.endswith(f":{gport}") for p in published), published
    assert f":{gport}/" in " ".join(map(str, gw["healthcheck"]["test"]))

    # gRPC: each replica serves it, the gateway reaches every replica there and publishes
    # its own HTTP/2 listener.
    grpc_port = int(_env(api)["NLPSERVE_GRPC_PORT"])
    assert grpc_port not in (0, api_port), "compose serves gRPC on a port of its own"
    assert str(grpc_port) in [str(p) for p in api.get("expose", [])]
    assert re.search(rf"server\s+api:{grpc_port}\b", _env(gw)["NLPSERVE_GRPC_UPSTREAMS"])
    grpc_gport = int(_env(gw)["NLPSERVE_GATEWAY_GRPC_PORT"])
    assert grpc_gport != gport
    assert any(p.endswith(f":{grpc_gport}") for p in published), published

    exposed = set(re.findall(r"^EXPOSE\s+(.+)$", DOCKERFILE.read_text(), re.M)[0].split())
    assert {str(api_port), str(grpc_port), str(defaults.metrics_port)} <= exposed


def test_gateway_refuses_every_body_the_api_would(services: dict[str, Any]) -> None:
    """nginx's body limit at most the API's: a body between the two (1m = 1,048,576 against
    1,000,000) reached a replica, which answered 413 from Content-Length and closed mid-body;
    nginx counted that as a failed upstream and took every replica out of rotation."""
    api_limit = int(_env(services["api"]).get("NLPSERVE_MAX_BODY_BYTES", Settings().max_body_bytes))
    gateway_limit = _env(services["gateway"])["NLPSERVE_MAX_BODY"]
    assert gateway_limit.isdigit(), f"NLPSERVE_MAX_BODY in bytes, not {gateway_limit!r}"
    assert int(gateway_limit) <= api_limit


def test_health_checks(services: dict[str, Any]) -> None:
    for name in ("gateway", "api", "worker", "worker-gpu", "redis"):
        hc = services[name].get("healthcheck")
        assert hc and hc.get("test"), f"{name} has no health check"
    for name in NLPSERVE_IMAGE_SERVICES:
        assert services[name]["healthcheck"]["test"][-1] == "service.healthcheck"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["gateway"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert "HEALTHCHECK" in DOCKERFILE.read_text()


def test_redis_never_evicts_queue_data(services: dict[str, Any]) -> None:
    redis = services["redis"]
    cmd = redis["command"]
    args = cmd if isinstance(cmd, list) else cmd.split()
    args = [str(a) for a in args]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--maxmemory" in args, "a Redis without maxmemory grows until the kernel kills it"
    assert redis["deploy"]["resources"]["limits"]["memory"]


def test_gpu_profile_reserves_a_device(services: dict[str, Any]) -> None:
    gpu = services["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    assert gpu["build"]["target"] == "gpu"
    assert _env(gpu)["NLPSERVE_PROVIDERS"].startswith("CUDAExecutionProvider")
    assert _env(gpu).get("NLPSERVE_REQUIRE_GPU") in ("1", "true", "True")
    # No GPU reservation anywhere else: CPU replicas must start on machines without one.
    for name in ("api", "worker"):
        res = (services[name].get("deploy") or {}).get("resources", {})
        assert "devices" not in res.get("reservations", {})  # memory only


def test_workers_may_finish_their_drain_before_docker_kills_them(
    services: dict[str, Any],
) -> None:
    s = Settings()
    needed = s.worker_drain_timeout_s + s.redis_block_ms / 1000 + 1.0
    for name in ("worker", "worker-gpu"):
        grace = re.fullmatch(r"(\d+)s", services[name]["stop_grace_period"])
        assert grace and int(grace.group(1)) > needed, (name, needed)


def test_build_targets_exist(services: dict[str, Any]) -> None:
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), re.M | re.I))
    for svc in NLPSERVE_IMAGE_SERVICES:
        build = services[svc].get("build")
        if build:
            assert build["target"] in stages, f"{svc}: no Dockerfile stage {build['target']!r}"


def test_gateway_drops_idle_connections_before_the_api_does() -> None:
    """nginx reusing a connection the API is closing is a 502 (and a failure counted against
    that replica): its upstream keep-alive must end first."""
    from service.server import KEEP_ALIVE_S

    upstream = re.search(r"^upstream nlpserve_api \{(.*?)^\}", TEMPLATE.read_text(), re.S | re.M)
    assert upstream is not None
    found = re.search(r"keepalive_timeout\s+(\d+)s;", upstream.group(1))
    assert found and int(found.group(1)) < KEEP_ALIVE_S


def test_only_api_and_workers_reach_redis(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    """Redis has no password: anything that shares its network can forge or cancel answers.
    Every service names its networks (none falls back to the default one, which all share)."""
    assert compose["networks"]["queue"].get("internal") is True
    for name, svc in services.items():
        assert svc.get("networks"), f"{name} names no network: it would join the default one"
    on_queue = {name for name, svc in services.items() if "queue" in svc["networks"]}
    assert on_queue == {"redis", *NLPSERVE_IMAGE_SERVICES}
    assert "edge" in services["gateway"]["networks"] and "edge" in services["api"]["networks"]
    for name in ("prometheus", *NLPSERVE_IMAGE_SERVICES):  # scraped over edge
        assert "edge" in services[name]["networks"], name


def test_service_containers_are_locked_down(services: dict[str, Any]) -> None:
    """Read-only root file system (only /tmp writable: numba's cache), no capabilities, no
    privilege gain: a compromised replica can change nothing in its container."""
    for name in NLPSERVE_IMAGE_SERVICES:
        svc = services[name]
        assert svc.get("read_only") is True and "/tmp" in svc.get("tmpfs", []), name
        assert svc.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name


def test_both_images_can_explain() -> None:
    """The images installed the service without its explain extra: every /v1/*/explain
    answered 501 in a container (they install the grpc extra too: NLPSERVE_GRPC_PORT).
    shap's numba needs a writable cache for a user with no home and a read-only venv."""
    text = DOCKERFILE.read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)
    installs = [st for st in stages if re.search(r"pip install (?:-c \S+ )?\S*\.", st)]
    assert len(installs) == 2 and all('".[explain,grpc]"' in st for st in installs), installs
    finals = [st for st in stages if st.split()[-1:] and re.search(r"^USER nlpserve", st, re.M)]
    assert len(finals) == 2 and all("NUMBA_CACHE_DIR=/tmp/" in st for st in finals)


def test_mounted_files_exist(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = str(vol).split(":", 1)[0]
            if src.startswith((".", "/")):
                assert (ROOT / src).exists(), f"{name} mounts {src}, which is not in the repo"
    gw_mounts = [str(v) for v in services["gateway"]["volumes"]]
    assert any("gateway.conf.template" in v and "/etc/nginx/templates/" in v for v in gw_mounts)


def test_interpolation_variables_are_documented() -> None:
    text = COMPOSE.read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    assert used <= set(INTERPOLATION_DEFAULTS), used
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for var in used:
        assert var in doc, f"{var} (compose interpolation) is not explained in docs/deploy.md"


def test_prometheus_scrapes_the_metrics_ports(services: dict[str, Any]) -> None:
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    ports = {name: sd["port"] for name, j in jobs.items() for sd in j.get("dns_sd_configs", [])}
    assert ports["nlpserve-api"] == Settings().port
    assert ports["nlpserve-worker"] == Settings().metrics_port


def test_prometheus_keeps_exemplars(services: dict[str, Any]) -> None:
    """The API's latency exemplars (trace ids) are stored, and the command that enables them
    still reads the mounted config."""
    command = services["prometheus"]["command"]
    assert "--enable-feature=exemplar-storage" in command
    config = next(c for c in command if c.startswith("--config.file="))
    mounts = services["prometheus"]["volumes"]
    assert any(m.endswith(":" + config.split("=", 1)[1] + ":ro") for m in mounts), mounts


def _exposed_series() -> set[str]:
    """Every series name an API replica or a worker can expose (counters with _total,
    histograms with _bucket/_count/_sum)."""
    from prometheus_client import CollectorRegistry

    from service.api.auth import AuthMetrics
    from service.metrics import Metrics, WorkerMetrics

    api = Metrics()
    api.workers_alive()  # these three are created on first use, in Redis mode
    api.model_workers_alive()
    api.clock_offset(lambda: 0.0)
    AuthMetrics(api)  # with NLPSERVE_API_KEYS_FILE
    worker = CollectorRegistry()
    WorkerMetrics(worker, in_hand=lambda: 0, connected=lambda: True)
    names: set[str] = set()
    for registry in (api.registry, worker):
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
            names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


def test_alert_rules_are_loaded_and_name_real_series(services: dict[str, Any]) -> None:
    """deploy/prometheus/alerts.yml: mounted, listed in prometheus.yml, every rule complete,
    and every nlpserve_* series it names is one the service exposes (a renamed metric would
    leave an alert that never fires)."""
    folder = ROOT / "deploy" / "prometheus"
    prom = yaml.safe_load((folder / "prometheus.yml").read_text())
    assert "/etc/prometheus/alerts.yml" in prom["rule_files"]
    mounts = services["prometheus"]["volumes"]
    assert any(
        m.startswith("./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml") for m in mounts
    )
    rules = [
        r for g in yaml.safe_load((folder / "alerts.yml").read_text())["groups"] for r in g["rules"]
    ]
    assert len(rules) >= 10
    exposed = _exposed_series()
    import promql_parser

    for rule in rules:
        promql_parser.parse(rule["expr"])  # ValueError on a PromQL syntax error
        assert rule["alert"] and rule["labels"]["severity"] and rule["annotations"]["summary"]
        named = set(re.findall(r"\bnlpserve_[a-z_]+", rule["expr"]))
        assert named <= exposed, (rule["alert"], named - exposed)


def test_grafana_provisions_the_dashboard(services: dict[str, Any]) -> None:
    """The `monitoring` profile's Grafana: a pinned image, off the queue network, its
    provisioning and deploy/grafana/nlpserve.json mounted read-only where the provider
    looks, and a data source that is the compose Prometheus at its scrape interval; both
    published on the host's loopback only."""
    graf, prom_svc = services["grafana"], services["prometheus"]
    assert graf["profiles"] == ["monitoring"] == prom_svc["profiles"]
    assert graf["networks"] == ["edge"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", graf["image"]), graf["image"]
    # Both serve every series unauthenticated (client names included; docs/deploy.md,
    # "Authentication"): on the host's loopback only, as the replicas' /metrics is unpublished.
    for svc in (graf, prom_svc):
        assert all(str(p).startswith("127.0.0.1:") for p in svc["ports"]), "loopback only"
    mounts = dict(str(v).rsplit(":", 1)[0].split(":", 1) for v in graf["volumes"])
    assert all(str(v).endswith(":ro") for v in graf["volumes"]), graf["volumes"]
    folder = ROOT / "deploy" / "grafana"
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    board = Path(mounts["./deploy/grafana/nlpserve.json"])
    providers = yaml.safe_load((folder / "provisioning/dashboards/nlpserve.yml").read_text())
    assert [p["options"]["path"] for p in providers["providers"]] == [str(board.parent)]
    sources = yaml.safe_load((folder / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = sources["datasources"]
    url = urlparse(source["url"])
    assert source["type"] == "prometheus" and url.hostname == "prometheus"
    assert any(str(p).endswith(f":{url.port}") for p in prom_svc["ports"]), prom_svc["ports"]
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())["global"]
    assert source["jsonData"]["timeInterval"] == scrape["scrape_interval"]


# Open-source nginx takes `resolve` on upstream servers (and `resolver` inside an upstream)
# from this version on; before it, `nginx -t` refuses both.
NGINX_RESOLVE_SINCE = (1, 27, 3)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_gateway_re_resolves_the_replicas(services: dict[str, Any]) -> None:
    """Replicas added by ``--scale`` (or restarted under a new address) must reach rotation
    without a gateway restart: nginx re-resolves ``api`` through Docker's DNS, which needs
    a shared-memory zone, a resolver and an nginx image recent enough to take them."""
    gw = services["gateway"]
    zones = []
    for var in ("NLPSERVE_UPSTREAMS", "NLPSERVE_GRPC_UPSTREAMS"):
        upstreams = _env(gw)[var]
        assert re.search(r"server\s+api:\d+\s[^;]*\bresolve\b", upstreams), upstreams
        zones += re.findall(r"\bzone\s+(\w+)\s+\d+k;", upstreams)
        assert re.search(r"\bresolver\s+127\.0\.0\.11\b", upstreams), "Docker's embedded DNS"
    assert len(zones) == len(set(zones)) == 2, f"one zone per upstream: {zones}"
    tag = re.fullmatch(r"nginx:(\d+\.\d+(?:\.\d+)?)(?:-[a-z0-9.-]+)?", gw["image"])
    assert tag, f"pin the gateway image to a version: {gw['image']}"
    pinned = _version(tag.group(1))
    assert pinned + (0,) * (3 - len(pinned)) >= NGINX_RESOLVE_SINCE, gw["image"]


def _local_nginx_version() -> tuple[int, ...]:
    out = subprocess.run([procs.nginx_exe(), "-v"], capture_output=True, text=True).stderr
    found = re.search(r"nginx/(\d+\.\d+\.\d+)", out)
    assert found, out
    return _version(found.group(1))


def test_gateway_template_is_valid_nginx(services: dict[str, Any], tmp_path: Path) -> None:
    """Render the template the way the nginx image does and let nginx itself check it."""
    env = _env(services["gateway"])
    text = procs.render_template(TEMPLATE.read_text(), env)
    assert "$nlpserve_request_id" in text and "${" not in text  # nginx's own $vars survive
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed (Debian: apt-get install nginx)")
    # compose's upstream name `api` does not resolve here: the same line on loopback. An
    # nginx older than the image's (Debian 12 has 1.22, CI's included) checks it without
    # re-resolution: there, `resolve` and the upstream `resolver` are checked only by the
    # test above (nginx's documented syntax), not by nginx itself.
    for var in ("NLPSERVE_UPSTREAMS", "NLPSERVE_GRPC_UPSTREAMS"):
        upstreams = env[var].replace("server api:", "server 127.0.0.1:")
        if _local_nginx_version() < NGINX_RESOLVE_SINCE:
            upstreams = re.sub(r"\bresolver\s[^;]*;\s*", "", upstreams)
            upstreams = re.sub(r"\sresolve\b", "", upstreams)
        env[var] = upstreams
    conf = procs.write_nginx_conf(tmp_path, env)
    r = subprocess.run(procs.nginx_argv(tmp_path, conf, test=True), capture_output=True, text=True)
    log = (tmp_path / "error.log").read_text() if (tmp_path / "error.log").exists() else ""
    assert r.returncode == 0, f"nginx -t failed:\n{r.stderr}\n{log}"


def _docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    return r.returncode == 0


@pytest.mark.skipif(not _docker_compose_available(), reason="no `docker compose` client here")
def test_docker_compose_config() -> None:
    for profile in ([], ["--profile", "gpu"], ["--profile", "monitoring"]):
        r = subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE), *profile, "config", "--quiet"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert r.returncode == 0, r.stderr


def _mib(value: str | int) -> float:
    """A compose memory size (``512m``, ``1g``, ``1536M``, bytes) in MiB."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([bkmg]?)b?", str(value).strip().lower())
    assert m, f"not a compose memory size: {value!r}"
    scale = {"": 1 / 2**20, "b": 1 / 2**20, "k": 1 / 1024, "m": 1.0, "g": 1024.0}[m.group(2)]
    return float(m.group(1)) * scale


def _measured_redis_setup() -> dict[str, Any]:
    report = json.loads(MEMORY_REPORT.read_text())
    return next(r for r in report["results"] if r["mode"] == "redis" and not r["load"])


@pytest.mark.parametrize("svc", ["api", "worker"])
def test_memory_limits_hold_the_measured_peak(services: dict[str, Any], svc: str) -> None:
    """Compose's api and worker carry a memory limit over the peak ``bench.memory`` measured
    for that process in Redis mode (every model; explanations included for the API, which
    imports shap for them), and a reservation of at least its idle footprint."""
    measured = _measured_redis_setup()["memory"][svc]
    peak, idle = measured["overall"]["rss_peak_mib"], measured["idle"]["rss_median_mib"]
    resources = services[svc]["deploy"]["resources"]
    limit = _mib(resources["limits"]["memory"])
    reserved = _mib(resources["reservations"]["memory"])
    assert limit >= MEMORY_HEADROOM * peak, (svc, limit, peak)
    assert idle <= reserved <= limit, (svc, idle, reserved, limit)


def test_deploy_doc_quotes_the_measured_sizing() -> None:
    """docs/deploy.md's Sizing table is the committed report's, row for row, and names the
    command that measured it."""
    from bench import memory

    report = json.loads(MEMORY_REPORT.read_text())
    doc = DEPLOY_DOC.read_text()
    for row in memory.table(report)[2:]:
        assert row in doc, f"docs/deploy.md lacks the measured row:\n{row}"
    assert "python -m bench.memory" in doc and MEMORY_REPORT.name.removesuffix(".json") in doc


def test_compose_memory_sizes_parse() -> None:
    assert _mib("512m") == 512 and _mib("1g") == 1024 and _mib("1536M") == 1536
    assert _mib(2**30) == 1024 and _mib("384m") == 384
