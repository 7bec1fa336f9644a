"""Properties of manifest parsing (service/repository/manifest.py), from the committed
pos-en manifest: what is written loads back equal; a manifest whose buckets, name, version
or file names break the rules is a ManifestError naming the field (never another error);
an accepted file or folder name stays one plain entry of its folder."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.repository.manifest import (
    MANIFEST_FILE,
    Manifest,
    ManifestError,
    load_manifest,
    write_manifest,
)

POS = Path(__file__).resolve().parents[1] / "models/pos-en/1"
BASE = json.loads((POS / MANIFEST_FILE).read_text("utf-8"))

buckets = st.lists(st.integers(-2, 300), max_size=5)
names = st.text(st.sampled_from("aZ09._-/\\ \n:~é"), max_size=6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pos-en's manifest with empty stand-ins for the files it names."""
    out = tmp_path_factory.mktemp("pos")
    manifest = Manifest.model_validate(BASE)
    files = [manifest.preprocessing.tokenizer_file, manifest.preprocessing.chars_file]
    for f in filter(None, files + [v.file for v in manifest.variants.values()]):
        (out / f).touch()
    shutil.copy(POS / MANIFEST_FILE, out / MANIFEST_FILE)
    return out


def _load(folder: Path, raw: dict) -> Manifest:
    (folder / MANIFEST_FILE).write_text(json.dumps(raw), "utf-8")
    return load_manifest(folder, check_files=False)


@given(buckets, st.integers(1, 300))
def test_buckets_load_only_when_ascending_positive_and_ending_at_max_length(
    folder, edges, max_length
) -> None:
    valid = bool(edges) and edges == sorted(set(edges)) and edges[0] > 0
    valid = valid and edges[-1] == max_length
    raw = BASE | {"buckets": edges, "max_length": max_length}
    if valid:
        m = _load(folder, raw)
        assert (m.buckets, m.max_length) == (edges, max_length)
        write_manifest(folder, m)  # and what is written reads back the same
        assert load_manifest(folder, check_files=False) == m
    else:
        with pytest.raises(ManifestError, match="buckets"):
            _load(folder, raw)


@given(names, names, names)
def test_names_and_files_are_one_plain_entry_of_their_folder(folder, name, version, file) -> None:
    raw = BASE | {"name": name, "version": version}
    raw["preprocessing"] = BASE["preprocessing"] | {"tokenizer_file": file}
    try:
        m = _load(folder, raw)
    except ManifestError:
        return
    for value in (m.name, m.version, m.preprocessing.tokenizer_file):
        for path in (PurePosixPath(value), PureWindowsPath(value)):
            assert path.parts == (value,) and value not in (".", "..")
        assert not value.startswith(".") and re.fullmatch(r"[\w.-]+", value, re.ASCII)
