"""Find model versions in a repository folder."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from service.repository.manifest import (
    MANIFEST_FILE,
    Manifest,
    ManifestError,
    check_path_component,
    load_manifest,
)


class SelectionError(ManifestError):
    """NLPSERVE_LOAD_MODELS names a model or version the repository does not hold."""


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name


def _version_key(p: Path) -> tuple[int, str]:
    return (int(p.name), p.name) if p.name.isdigit() else (-1, p.name)


# In a selection: every model of the repository (those named keep their pinned versions).
EVERY_MODEL = "*"
SELECTION = "NLPSERVE_LOAD_MODELS (or --load)"


def parse_selection(text: str) -> dict[str, str | None]:
    """``"detector-en, qa-zh=1"`` -> ``{"detector-en": None, "qa-zh": "1"}``: which models to
    load, each at its highest version (None) or at the one named (NLPSERVE_LOAD_MODELS).
    ``*`` stands for every model: ``"*, detector-en=1"`` loads them all, detector-en at 1."""
    selection: dict[str, str | None] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, version = (x.strip() for x in part.partition("="))
        if name == EVERY_MODEL and sep:
            raise ValueError("'*' (every model) takes no version")
        if name != EVERY_MODEL:
            check_path_component("model name", name)
        if sep:
            check_path_component("version", version)
        if name in selection:
            raise ValueError(f"model {name!r} is named twice")
        selection[name] = version if sep else None
    if not selection:
        raise ValueError("names no model: use name or name=version, comma-separated")
    return selection


def held_models(root: Path) -> set[str]:
    """Names of the models ``root`` holds: folders with at least one version's manifest."""
    return {
        p.name
        for p in root.iterdir()
        if p.is_dir()
        and not p.name.startswith(".")
        and any((v / MANIFEST_FILE).exists() for v in p.iterdir())
    }


def discover_models(
    root: Path | str,
    *,
    latest_only: bool = True,
    select: Mapping[str, str | None] | None = None,
) -> list[ModelEntry]:
    """Every ``<root>/<name>/<version>/manifest.json``; by default the highest version of each.

    ``select`` (see :func:`parse_selection`) keeps only the models it names (all with ``*``),
    at the version it names if any; a name or version the repository lacks raises
    :class:`SelectionError`, a folder that holds a broken manifest :class:`ManifestError`:
    serving half of what was asked silently is worse than refusing to start.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: model repository folder not found")
    model_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if select is not None:
        held = held_models(root)
        if missing := [n for n in select if n != EVERY_MODEL and n not in held]:
            raise SelectionError(
                f"{SELECTION} names {', '.join(missing)}, which {root} does not hold (it "
                f"holds: {', '.join(sorted(held)) or 'nothing'})"
            )
        if EVERY_MODEL not in select:
            model_dirs = [p for p in model_dirs if p.name in select]
    entries: list[ModelEntry] = []
    for model_dir in model_dirs:
        versions = sorted(
            (v for v in model_dir.iterdir() if (v / MANIFEST_FILE).exists()), key=_version_key
        )
        pinned = select.get(model_dir.name) if select is not None else None
        if pinned is not None:
            chosen = [v for v in versions if v.name == pinned]
            if not chosen:
                raise SelectionError(
                    f"{SELECTION} names {model_dir.name}={pinned}, but {model_dir} holds "
                    f"versions {', '.join(v.name for v in versions) or 'none'}"
                )
            versions = chosen
        elif latest_only:
            versions = versions[-1:]
        for v in versions:
            manifest = load_manifest(v)
            if manifest.name != model_dir.name or manifest.version != v.name:
                raise ManifestError(
                    f"{v / MANIFEST_FILE}: field 'name'/'version' ({manifest.name}/"
                    f"{manifest.version}) does not match its folder {model_dir.name}/{v.name}"
                )
            entries.append(ModelEntry(v, manifest))
    return entries
