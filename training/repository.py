"""Write one model version into the repository: ``<root>/<name>/<version>/``.

The entry is assembled in a hidden staging folder (``<root>/.<name>-<version>.staging``, which
discovery skips), validated with the service's own :func:`load_manifest`, then renamed into
place, so a reader never sees half an entry.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from service.repository.manifest import (
    DataFile,
    Manifest,
    Preprocessing,
    SplitInfo,
    TensorSpec,
    Variant,
    check_path_component,
    load_manifest,
    sha256_file,
    write_manifest,
)

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CHARS_FILE = "chars.json"
DEFAULT_QUANTILES = (0.5, 0.8, 0.95)
_PACKAGES = ("torch", "onnx", "onnxruntime", "tokenizers", "numpy", "nlpserve")


def next_version(root: Path | str, name: str) -> str:
    """One more than the highest integer version under ``<root>/<name>/`` ("1" if none)."""
    folder = Path(root) / name
    versions = (
        [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    )
    return str(max(versions, default=0) + 1)


def version_folder(out: Path, name: str, version: str) -> Path:
    """``out/name/version``, once both are checked to be one plain folder name each."""
    check_path_component("name", name)
    check_path_component("version", version)
    return Path(out) / name / version


def check_new_version(final: Path, overwrite: bool = False) -> Path:
    """``final`` (a version folder) may be written: it does not exist yet, or ``overwrite``."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(
            f"{final}: model version already exists; choose another --version or --overwrite"
        )
    return final


def move_into_place(staging: Path, final: Path) -> Path:
    """Rename a complete ``staging`` folder to ``final``; an existing ``final`` is renamed
    aside first and deleted last, so there is never a moment with neither version in place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        staging.rename(final)
        return final
    old = staging.parent / f"{staging.name}.replaced"
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def check_writable(root: Path | str) -> Path:
    """Raise the ``OSError`` that writing an entry under ``root`` would meet, without creating
    ``root``: its nearest existing ancestor must be a folder where a folder can be made (probed
    with a hidden folder, removed at once). For checking ``--out`` before hours of training."""
    root = Path(root)
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{existing}: not a folder")
    Path(tempfile.mkdtemp(prefix=".nlpserve-write-check-", dir=existing)).rmdir()
    return root


def bucket_edges(
    lengths: Iterable[int], max_length: int, quantiles: Sequence[float] = DEFAULT_QUANTILES
) -> list[int]:
    """Bucket upper edges from the token-length distribution: the given quantiles, rounded up
    to a multiple of 8, below ``max_length``; the last edge is always ``max_length``."""
    arr = np.asarray(list(lengths), dtype=np.float64)
    edges: set[int] = set()
    if arr.size:
        for q in quantiles:
            e = int(np.ceil(np.quantile(arr, q) / 8.0) * 8)
            if 0 < e < max_length:
                edges.add(e)
    return sorted(edges) + [max_length]


def framework_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def repository_root() -> Path | None:
    """The nlpserve checkout this package runs from (None for an installed package)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def portable_path(value: str) -> str:
    """An absolute path relative to the working directory (``../shared/data``); anything
    else as given. What a manifest records of a path: never this machine's absolute one."""
    return os.path.relpath(value) if os.path.isabs(value) else value


def command_line(
    argv: Sequence[str] | None = None, implied: Mapping[str, str | Path] | None = None
) -> str:
    """The command that produced an entry, free of this machine's absolute paths.

    The program is recorded by name (``nlpserve``, not a venv path) and absolute path
    arguments relative to the working directory (e.g. ``../shared/data``). It runs from the
    repository root: a run started in a folder below it records ``cd <folder> && `` first
    (relative to the root), so the relative paths stay valid; one started outside the
    checkout is valid from the directory it was started in. ``implied``: options the run took
    from elsewhere (``--data`` from NLPSERVE_DATA_DIR), recorded when the command line lacks
    them.
    """
    args = list(sys.argv if argv is None else argv)
    if not args:
        return ""
    for flag, value in (implied or {}).items():
        if not any(a == flag or a.startswith(flag + "=") for a in args[1:]):
            args += [flag, str(value)]

    def portable(arg: str) -> str:
        flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        return f"{flag}{eq}{portable_path(value)}"

    prog = Path(args[0]).name
    if prog == "cli.py":  # `python -m service.cli`, how machines without the script run it
        prog = "nlpserve"
    line = shlex.join([prog, *map(portable, args[1:])])
    root, cwd = repository_root(), Path.cwd().resolve()
    if root is not None and cwd != root and cwd.is_relative_to(root):
        line = f"cd {shlex.quote(cwd.relative_to(root).as_posix())} && {line}"
    return line


# What identifies a local base checkpoint's contents: config, tokenizer and weight files.
_CHECKPOINT_FILES = ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json",
                     "special_tokens_map.json")  # fmt: skip
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def checkpoint_digest(folder: Path | str) -> dict[str, str] | None:
    """sha256 of a local checkpoint folder's config, tokenizer and weight files (file name ->
    digest), so two runs from different contents at the same path are told apart; None for
    what is not a local folder (a hub id)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return None
    return {
        p.name: sha256_file(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and (p.name in _CHECKPOINT_FILES or p.suffix in _WEIGHT_SUFFIXES)
    }


def write_entry(
    root: Path | str,
    name: str,
    *,
    task: str,
    architecture: str,
    onnx_file: Path,
    tokenizer: Tokenizer,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    labels: Sequence[str],
    max_length: int,
    train_lengths: Iterable[int],
    metrics: Mapping[str, float],
    version: str | None = None,
    description: str = "",
    chars: Sequence[str] | None = None,
    max_word_length: int | None = None,
    lowercase: bool = True,
    split: SplitInfo | None = None,
    data: Sequence[DataFile] = (),
    hyperparameters: Mapping[str, Any] | None = None,
    command: str | None = None,
    bucket_quantiles: Sequence[float] = DEFAULT_QUANTILES,
    overwrite: bool = False,
) -> Path:
    """Write tokenizer, chars, ONNX model and manifest; return the version folder.

    An existing version folder is an error unless ``overwrite`` is true, in which case it is
    replaced once the new entry is complete.
    """
    root = Path(root)
    version = version or next_version(root, name)
    check_path_component("name", name)
    check_path_component("version", version)
    final = check_new_version(root / name / version, overwrite)
    staging = root / f".{name}-{version}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        tokenizer.save(str(staging / TOKENIZER_FILE))
        if chars is not None:
            (staging / CHARS_FILE).write_text(
                json.dumps(list(chars), ensure_ascii=False), encoding="utf-8"
            )
        shutil.copyfile(onnx_file, staging / MODEL_FILE)
        manifest = Manifest(
            name=name,
            version=version,
            task=task,
            architecture=architecture,
            description=description,
            created_at=datetime.now(UTC),
            framework_versions=framework_versions(),
            inputs=list(inputs),
            outputs=list(outputs),
            labels=list(labels),
            max_length=max_length,
            preprocessing=Preprocessing(
                kind="words",
                tokenizer_file=TOKENIZER_FILE,
                chars_file=CHARS_FILE if chars is not None else None,
                max_word_length=max_word_length,
                lowercase=lowercase,
            ),
            buckets=bucket_edges(train_lengths, max_length, bucket_quantiles),
            variants={
                "fp32": Variant(
                    file=MODEL_FILE,
                    precision="fp32",
                    sha256=sha256_file(staging / MODEL_FILE),
                    metrics=dict(metrics),
                    measured_with="CPUExecutionProvider",  # the LSTM trainers score on the CPU
                )
            },
            metrics=dict(metrics),
            split=split,
            data=list(data),
            command=command if command is not None else command_line(),
            hyperparameters=dict(hyperparameters or {}),
        )
        write_manifest(staging, manifest)
        load_manifest(staging)  # the service's own validation
        move_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
