"""deploy/constraints.txt: the images install pinned versions, and they are the ones tested.

``make install`` installs the dev environment under these pins, so in CI the versions found
installed here are the versions an image build installs; a dependency added or upgraded
without re-pinning fails here, not in a container.
"""

from __future__ import annotations

import importlib.util
import platform
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _pinner() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "pin_image_deps", ROOT / "deploy" / "pin_image_deps.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pin = _pinner()


@pytest.mark.skipif(
    (platform.system(), platform.machine(), sys.version_info[:2]) != ("Linux", "x86_64", (3, 11)),
    reason="the pins are the images' (Linux x86_64, Python 3.11); make install applies them there",
)
def test_every_runtime_package_is_pinned_at_the_installed_version() -> None:
    pins = pin.read_pins()
    closure = pin.runtime_closure()
    assert {"onnxruntime", "numpy", "fastapi", "shap", "tokenizers"} <= set(closure)
    unpinned = sorted(set(closure) - set(pins))
    assert not unpinned, f"not in deploy/constraints.txt: {unpinned} (run deploy/pin_image_deps.py)"
    drifted = {n: (pins[n], v) for n, v in closure.items() if pins[n] != v}
    assert not drifted, (
        f"installed here vs pinned (pinned, installed): {drifted}; `make install` installs the "
        "pins, or re-pin with deploy/pin_image_deps.py after an upgrade"
    )
    # Nothing pinned that no image installs (a left-over from a dropped dependency).
    assert set(pins) - set(closure) == {pin.GPU_RUNTIME}
    assert pin.render(pins) == pin.CONSTRAINTS.read_text(), "hand-edited: regenerate it"


def test_pins_satisfy_the_declared_requirements() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in (*pin.IMAGE_EXTRAS, "gpu"):
        declared += project["optional-dependencies"][extra]
    pins = pin.read_pins()
    assert pin.GPU_RUNTIME in pins
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = pins[canonicalize_name(req.name)]
        assert req.specifier.contains(version, prereleases=True), (text, version)


def test_closure_follows_extras_and_markers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk takes an extra's requirements only where that extra is asked for, and skips
    requirements whose marker is false here (what a pin list for this platform needs)."""
    site = tmp_path / "site"

    def dist(name: str, version: str, *requires: str) -> None:
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        lines += [f"Requires-Dist: {r}" for r in requires]
        (info / "METADATA").write_text("\n".join(lines) + "\n")

    dist("toy", "1.0", "base-dep>=1", "opt-dep; extra == 'fancy'", "never; sys_platform == 'nope'")
    dist("base-dep", "2.0", "deep-dep[x]")
    dist("deep-dep", "3.0", "deep-extra; extra == 'x'", "deep-other; extra == 'y'")
    dist("deep-extra", "4.0")
    dist("opt-dep", "5.0")
    monkeypatch.syspath_prepend(str(site))
    assert pin.runtime_closure("toy", ()) == {
        "base-dep": "2.0",
        "deep-dep": "3.0",
        "deep-extra": "4.0",
    }
    with_extra = pin.runtime_closure("toy", ("fancy",))
    assert with_extra["opt-dep"] == "5.0" and "never" not in with_extra


def test_every_image_install_uses_the_pins() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = [st for st in re.split(r"^FROM ", text, flags=re.M) if "pip install" in st]
    assert len(stages) == 2  # build (cpu) and gpu
    for stage in stages:
        assert "COPY deploy/constraints.txt" in stage
        installs = re.findall(r"pip install ([^&\n\\]*)", stage)
        assert installs and all(i.startswith("-c constraints.txt ") for i in installs), installs
    assert "deploy" not in (ROOT / ".dockerignore").read_text().split()
    makefile = (ROOT / "Makefile").read_text()
    assert "-c deploy/constraints.txt" in makefile
    assert "$(PIP_INSTALL) -e '.[train,dev]'" in makefile
    assert re.search(r"^\$\(BIN\)/\.installed:.*deploy/constraints\.txt", makefile, re.M)
