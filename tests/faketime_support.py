"""Child processes whose wall clock is wrong, through libfaketime (Debian package
``faketime``; .ci/run installs it).

libfaketime is preloaded into the child and shifts what ``clock_gettime`` (and ``time``,
``gettimeofday``) return for the wall clock. Its monotonic clock is left alone
(``FAKETIME_DONT_FAKE_MONOTONIC``): a host whose NTP is broken has a wrong wall clock and a
normal monotonic one. Its own default fakes CLOCK_MONOTONIC too, and with a relative offset
that clock then reads like the faked wall clock.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# the multi-threaded build: a server's threads read the clock concurrently
_CANDIDATES = (
    "/usr/lib/*/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
)


def libfaketime() -> str | None:
    for pattern in _CANDIDATES:
        if found := sorted(glob.glob(pattern)):
            return found[0]
    return None


def require_libfaketime() -> str:
    """The library's path, checked to shift a Python child's wall clock only; else skip."""
    lib = libfaketime()
    if lib is None:
        pytest.skip("libfaketime is not installed (apt-get install faketime; .ci/run does)")
    code = "import time; print(time.time(), time.monotonic())"

    def clocks(env: dict[str, str] | None) -> tuple[float, float]:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
        try:
            out = proc.communicate(timeout=30)[0].split()
        finally:
            release(proc)
        return float(out[0]), float(out[1])

    wall, mono = clocks({**os.environ, **skewed_env(1000.0, lib=lib)})
    real_wall, real_mono = clocks(None)
    if not (900 < wall - real_wall < 1100 and abs(mono - real_mono) < 100):
        pytest.skip(f"libfaketime at {lib} does not shift the wall clock alone here")
    return lib


def release(proc: subprocess.Popen[Any]) -> None:
    """Delete what libfaketime left in /dev/shm for ``proc`` once it has ended: every process
    it is preloaded into creates a semaphore and a segment named after its pid, and leaves them
    when it ends (a later process given the same pid then fails in libfaketime)."""
    if proc.poll() is None:
        return
    for name in (f"faketime_shm_{proc.pid}", f"sem.faketime_sem_{proc.pid}"):
        Path("/dev/shm", name).unlink(missing_ok=True)


def skewed_env(offset_s: float, *, lib: str) -> dict[str, str]:
    """Environment of a child whose wall clock runs ``offset_s`` seconds off."""
    return {
        "LD_PRELOAD": lib,
        "FAKETIME": f"{offset_s:+.0f}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def stepping_env(offset_file: Path, *, lib: str) -> dict[str, str]:
    """Environment of a child whose wall clock offset is read from ``offset_file`` (e.g.
    ``+3600``), at most a second old: write the file to step the clock of a running child."""
    return {
        "LD_PRELOAD": lib,
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_CACHE_DURATION": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
