"""Child processes for the benchmark and the end-to-end tests: spawn, wait ready, stop.

Shared by ``bench/run.py`` and ``tests/e2e``: both start real ``redis-server``, ``nginx``,
``nlpserve serve`` and ``nlpserve worker`` processes on loopback ports. Every process gets
its own session (``start_new_session``) so that stopping it also stops anything it forked,
and its output goes to a log file that is shown when it fails to become ready.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it; small race accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nlpserve_bin() -> str:
    """The ``nlpserve`` entry point of the running interpreter's environment."""
    cand = Path(sys.executable).parent / "nlpserve"
    if cand.exists():
        return str(cand)
    found = shutil.which("nlpserve")
    if found is None:
        raise FileNotFoundError("nlpserve entry point not found (pip install -e .)")
    return found


@dataclass
class Proc:
    """One child process with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL, no grace: what a crash or an OOM kill looks like."""
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s`` (graceful shutdown gets its chance)."""
        if self.popen is None:
            return
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(5)
        # Reap a group leader that exited on its own but left children behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


def start(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, **(env or {})}
    # Children must not inherit a debugger/coverage hook that slows them unevenly.
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    proc = Proc(name=name, argv=list(argv), log_path=log_path, env=dict(env or {}))
    with open(log_path, "wb") as log:
        proc.popen = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=str(cwd or REPO_ROOT),
            start_new_session=True,
        )
    return proc


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_http(proc: Proc, url: str, timeout_s: float = 120.0) -> None:
    """Block until ``url`` answers 200; raise with the log tail if the process dies first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited ({proc.popen and proc.popen.returncode}):\n{proc.log_tail()}"
            )
        if http_ok(url):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name}: {url} not ready after {timeout_s:.0f}s:\n{proc.log_tail()}")


def wait_port(proc: Proc, port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{proc.name}: port {port} not open after {timeout_s:.0f}s")


def start_redis(
    log_dir: Path, port: int | None = None, ready_timeout_s: float = 20.0
) -> tuple[Proc, str]:
    """A throw-away ``redis-server`` on a free loopback port, configured like compose's:
    no persistence, ``noeviction`` (queue data must never be dropped)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError("redis-server not on PATH (apt-get install redis-server)")
    port = port or free_port()
    argv = [
        exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--maxmemory", "256mb", "--maxmemory-policy", "noeviction", "--dir", str(log_dir),
    ]  # fmt: skip
    proc = start("redis", argv, log_dir)
    _ready_or_stopped(proc, port, ready_timeout_s)
    return proc, f"redis://127.0.0.1:{port}/0"


def _ready_or_stopped(proc: Proc, port: int, timeout_s: float) -> None:
    """``wait_port``, stopping ``proc`` when it never opens the port: the caller gets no
    handle to stop it with, so a slow start must not leave it running."""
    try:
        wait_port(proc, port, timeout_s)
    except BaseException:
        proc.stop(grace_s=5.0)
        raise


@contextlib.contextmanager
def stopping(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Stop every process in ``procs`` (in reverse start order) however the block exits."""
    try:
        yield procs
    finally:
        for p in reversed(procs):
            with contextlib.suppress(Exception):
                p.stop(grace_s=5.0)


# ---------------------------------------------------------------------------- nginx gateway

GATEWAY_TEMPLATE = REPO_ROOT / "deploy" / "nginx" / "gateway.conf.template"
GATEWAY_VARS = (
    "NLPSERVE_UPSTREAMS",
    "NLPSERVE_GATEWAY_PORT",
    "NLPSERVE_RATE_LIMIT",
    "NLPSERVE_MAX_BODY",
    "NLPSERVE_GRPC_UPSTREAMS",
    "NLPSERVE_GATEWAY_GRPC_PORT",
)


def no_grpc_upstream() -> dict[str, str]:
    """The gRPC variables of a gateway whose callers use REST only: a listener on a free
    port, in front of a port nothing listens on (every gRPC call: UNAVAILABLE)."""
    return {
        "NLPSERVE_GRPC_UPSTREAMS": f"server 127.0.0.1:{free_port()};",
        "NLPSERVE_GATEWAY_GRPC_PORT": str(free_port()),
    }


def template_variables(text: str) -> set[str]:
    """``NLPSERVE_*`` names a template references (``$NAME`` or ``${NAME}``)."""
    import re

    return set(re.findall(r"\$\{?(NLPSERVE_[A-Z0-9_]+)\}?", text))


def render_template(text: str, env: Mapping[str, str]) -> str:
    """envsubst as the nginx image runs it: only the given variables are replaced, so
    nginx's own ``$variables`` survive. A referenced ``NLPSERVE_*`` variable missing from
    ``env`` is an error here (in the image it would reach nginx verbatim and fail there)."""
    import re

    missing = template_variables(text) - set(env)
    if missing:
        raise KeyError(f"gateway template needs {sorted(missing)}")

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return env[name] if name in env else m.group(0)

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", sub, text)


def nginx_wrapper(workdir: Path, include: Path) -> str:
    """A main nginx.conf around the http-context gateway file: everything nginx writes (pid,
    logs, temp files) under ``workdir``, in the foreground, one worker."""
    tmp = workdir.resolve()
    # As root the workers would drop to `nobody`, who cannot write our temp dirs.
    user = "user root;\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
    temps = "\n".join(
        f"    {kind}_temp_path {tmp}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}daemon off;\nworker_processes 1;\npid {tmp}/nginx.pid;\n"
        f"error_log {tmp}/error.log warn;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"    access_log {tmp}/access.log;\n{temps}\n"
        f"    include {include.resolve()};\n"
        "}\n"
    )


def write_nginx_conf(workdir: Path, env: Mapping[str, str]) -> Path:
    """Render the repository's gateway template into ``workdir``; returns the main conf."""
    workdir.mkdir(parents=True, exist_ok=True)
    gateway = workdir / "gateway.conf"
    gateway.write_text(render_template(GATEWAY_TEMPLATE.read_text(), env))
    main = workdir / "nginx.conf"
    main.write_text(nginx_wrapper(workdir, gateway))
    return main


def nginx_exe() -> str:
    exe = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if exe is None:
        raise FileNotFoundError("nginx not found (Debian: apt-get install nginx)")
    return exe


def nginx_argv(workdir: Path, conf: Path, test: bool = False) -> list[str]:
    # -e: the early error log, before the config is read (else /var/log/nginx, maybe unwritable)
    argv = [nginx_exe(), "-p", str(workdir.resolve()), "-e", str(workdir.resolve() / "error.log")]
    return [*argv, "-c", str(conf.resolve()), *(["-t", "-q"] if test else [])]


def start_nginx(workdir: Path, env: Mapping[str, str], ready_timeout_s: float = 20.0) -> Proc:
    conf = write_nginx_conf(workdir, env)
    proc = start("nginx", nginx_argv(workdir, conf), workdir)
    _ready_or_stopped(proc, int(env["NLPSERVE_GATEWAY_PORT"]), ready_timeout_s)
    return proc
