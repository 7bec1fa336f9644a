"""sha256 checksums of the data files a model was trained on, with paths relative to the data
root, for the manifest's ``data`` list."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from service.repository.manifest import DataFile, sha256_file


def relative_to_root(path: Path, root: Path | None) -> str:
    """``path`` relative to ``root`` (POSIX separators); the bare file name when ``root`` is
    missing or ``path`` lies outside it."""
    path = Path(path).resolve()
    if root is not None:
        root = Path(root).resolve()
        if root.is_file():
            root = root.parent
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return path.name


def data_checksums(files: Iterable[Path], root: Path | None = None) -> list[DataFile]:
    """One :class:`DataFile` per distinct file, in the order given."""
    out: list[DataFile] = []
    seen: set[str] = set()
    for f in files:
        f = Path(f)
        key = os.fspath(f.resolve())
        if key in seen:
            continue
        seen.add(key)
        out.append(
            DataFile(path=relative_to_root(f, root), sha256=sha256_file(f), bytes=f.stat().st_size)
        )
    return out


def compare_checksums(recorded: Iterable[DataFile], current: Iterable[DataFile]) -> list[str]:
    """Human-readable differences between the data a model recorded and the data at hand
    (empty when they match or nothing was recorded)."""
    recorded = list(recorded)
    if not recorded:
        return []
    now = {d.path: d.sha256 for d in current}
    problems = []
    for d in recorded:
        if d.path not in now:
            problems.append(f"{d.path}: recorded in the manifest, not among the files read")
        elif now[d.path] != d.sha256:
            problems.append(
                f"{d.path}: sha256 {now[d.path][:12]}... != recorded {d.sha256[:12]}..."
            )
    return problems
