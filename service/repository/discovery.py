"""Find model versions in a repository folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.repository.manifest import MANIFEST_FILE, Manifest, ManifestError, load_manifest


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name


def _version_key(p: Path) -> tuple[int, str]:
    return (int(p.name), p.name) if p.name.isdigit() else (-1, p.name)


def discover_models(root: Path | str, *, latest_only: bool = True) -> list[ModelEntry]:
    """Every ``<root>/<name>/<version>/manifest.json``; by default the highest version of each.

    A folder that holds a broken manifest raises :class:`ManifestError`: serving half a
    repository silently is worse than refusing to start.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: model repository folder not found")
    entries: list[ModelEntry] = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = sorted(
            (v for v in model_dir.iterdir() if (v / MANIFEST_FILE).exists()), key=_version_key
        )
        if latest_only:
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
