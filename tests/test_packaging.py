"""The package as users install it: the sdist and wheel built from a clean copy of the tree
(what a clone holds), their file lists, and the installed wheel serving from outside the
checkout, with nothing of the source tree on its path (the dev venv's editable install
included).

Offline: the builds use this interpreter's setuptools (``--no-build-isolation``), which
satisfies ``[build-system]``; the Dockerfile's ``pip install .`` builds the same wheel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path, PurePosixPath

import httpx
import pytest

from tests.redis_support import free_port
from tests.service_support import POS_MODEL, require_model

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "training")
# Files inside the packages that only the repository uses (make runs them from the tree).
REPOSITORY_ONLY = {"training/gpu_session.sh"}
# An sdist's top level: what builds the wheel again, and setuptools' own metadata.
SDIST_TOP = {
    "PKG-INFO",
    "setup.cfg",
    "nlpserve.egg-info",
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "MANIFEST.in",
    *PACKAGES,
}


def _git_files(*paths: str) -> list[str]:
    """The files a clone of this checkout holds: tracked ones, and new ones not ignored."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (its file list is what a clone builds from)")
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *paths],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(f for f in out.split("\0") if f and (ROOT / f).is_file())  # not deleted ones


def _clean_copy(dest: Path) -> Path:
    """The tree as a clone has it: no build/, *.egg-info, caches or venvs of this checkout
    (setuptools would reuse a stale build/lib)."""
    for name in _git_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(ROOT / name, target)  # the models are 40+ MB; nothing writes these files
        except OSError:
            shutil.copy2(ROOT / name, target)
    return dest


def _pip_wheel(source: Path, out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["--no-cache-dir", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("nlpserve-*.whl")
    return wheel


class Built:
    def __init__(self, root: Path) -> None:
        src = _clean_copy(root / "src")
        dist = root / "dist"
        code = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
        name = subprocess.run(
            [sys.executable, "-c", code, str(dist)],
            cwd=src,
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout.split()[-1]
        self.sdist = dist / name
        with tarfile.open(self.sdist) as tar:
            tar.extractall(root / "unpacked", filter="data")
            self.sdist_files = {
                str(PurePosixPath(*PurePosixPath(m.name).parts[1:])) for m in tar if m.isfile()
            }
        (unpacked,) = (root / "unpacked").iterdir()
        # From the tree, as the Dockerfile's `pip install .` does; and from the sdist, as
        # `python -m build` and a user of the sdist do.
        self.wheel = _pip_wheel(src, root / "wheel-tree")
        self.wheel_from_sdist = _pip_wheel(unpacked, root / "wheel-sdist")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("packaging"))


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {n for n in z.namelist() if not n.endswith("/")}


def test_the_wheel_holds_the_packages_and_their_data_and_nothing_else(built):
    names = _names(built.wheel)
    package_files = {n for n in names if n.split("/")[0] in PACKAGES}
    expected = set(_git_files(*PACKAGES)) - REPOSITORY_ONLY
    assert {f for f in expected if f.startswith("service/static/")}, "no demo page files?"
    assert sorted(expected - package_files) == [], "missing from the wheel (package-data?)"
    assert sorted(package_files - expected) == [], "in the wheel, not in the packages' sources"
    (dist_info,) = {n.split("/")[0] for n in names} - set(PACKAGES)
    assert dist_info == "nlpserve-0.1.0.dist-info"  # no tests/, bench/, models/, .venv/ ...
    for typed in PACKAGES:
        assert f"{typed}/py.typed" in names  # mypy reads their annotations where installed
    with zipfile.ZipFile(built.wheel) as z:
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
    assert "nlpserve = service.cli:main" in entry_points
    # `pip install nlpserve[client]`: the Python client (service/client/) needs httpx alone
    with zipfile.ZipFile(built.wheel) as z:
        metadata = z.read(f"{dist_info}/METADATA").decode()
    assert "Provides-Extra: client" in metadata
    assert re.search(r"^Requires-Dist: httpx>=0\.27; extra == \"client\"$", metadata, re.M)
    assert "service/client/__init__.py" in names
    # pyproject's `license` names Apache-2.0: the text travels with the wheel (PEP 639)
    assert f"{dist_info}/licenses/LICENSE" in names


def test_the_sdist_builds_the_same_wheel_and_holds_no_more(built):
    top = {f.split("/")[0] for f in built.sdist_files}
    assert top <= SDIST_TOP, f"in the sdist, not needed to build it: {sorted(top - SDIST_TOP)}"
    assert {f for f in built.sdist_files if f.split("/")[0] in PACKAGES} == (
        set(_git_files(*PACKAGES)) - REPOSITORY_ONLY
    )
    assert _names(built.wheel_from_sdist) == _names(built.wheel)


def test_the_images_build_from_what_the_sdist_holds(built):
    """Both Dockerfile stages that `pip install` the project copy in every source the sdist
    builds the wheel from (MANIFEST.in aside: it only shapes the sdist), and .dockerignore
    keeps none of them out."""
    generated = {"PKG-INFO", "setup.cfg", "nlpserve.egg-info", "MANIFEST.in"}
    needed = {f.split("/")[0] for f in built.sdist_files} - generated
    assert needed >= {"pyproject.toml", "README.md", "LICENSE", *PACKAGES}
    stages = (ROOT / "Dockerfile").read_text().split("\nFROM ")[1:]
    installing = [s for s in stages if re.search(r'pip install [^\n]*"\.\[', s)]
    assert len(installing) == 2, "the build and gpu stages install the project"
    for stage in installing:
        copied = {
            src.rstrip("/")
            for line in stage.splitlines()
            if line.startswith("COPY ") and "--from" not in line
            for src in line.split()[1:-1]
        }
        assert needed <= copied, (stage.split("\n")[0], sorted(needed - copied))
    ignored = {
        line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
    }
    assert not needed & ignored


def test_the_installed_wheel_serves_from_outside_the_checkout(built, model_repo, tmp_path):
    """``pip install --target``: the scripts and packages land in that folder, which
    PYTHONPATH puts ahead of the dev venv's editable finder (the check below proves it)."""
    require_model(model_repo, POS_MODEL)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile"]
        + ["--target", str(target), str(built.wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NLPSERVE_", "PYTHON"))}
    env.update(PYTHONPATH=str(target), NLPSERVE_INTRA_OP_THREADS="1")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = subprocess.run(
        [sys.executable, "-c", "import service as s, training as t; print(s.__file__, t.__file__)"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(Path(f).is_relative_to(target) for f in where), where

    port = free_port()
    script = target / "bin" / "nlpserve"
    cmd = [sys.executable, str(script), "serve", "--models", str(model_repo), "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the installed server never became ready"
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/v1/pos", json={"text": "The cat sat on the mat."})
            assert r.status_code == 200, r.text
            assert r.json()["tokens"][:2] == ["The", "cat"]
            # The demo page and every file of its folder, as the tree has them.
            assert c.get("/").status_code == 200
            static = ROOT / "service" / "static"
            for f in (f for f in static.rglob("*") if f.is_file()):
                r = c.get(f"/static/{f.relative_to(static).as_posix()}")
                assert r.status_code == 200 and r.content == f.read_bytes(), f
            docs = c.get("/docs")
            assert docs.status_code == 200
            assert c.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
        # The Python client, as the wheel ships it, from outside the checkout.
        code = (
            "import sys; from service.client import Client; "
            "c = Client(sys.argv[1]); print(c.pos('The cat sat.').tags[0], c.readyz().status)"
        )
        said = subprocess.run(
            [sys.executable, "-c", code, url],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert said.returncode == 0 and said.stdout.split()[1] == "ready", said.stderr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
