"""The model repository: ``models/<name>/<version>/`` folders with a validated manifest."""

from service.repository.discovery import (
    ModelEntry,
    SelectionError,
    discover_models,
    held_models,
    parse_selection,
)
from service.repository.manifest import (
    MANIFEST_FILE,
    DataFile,
    Manifest,
    ManifestError,
    SplitInfo,
    TensorSpec,
    Variant,
    load_manifest,
    sha256_file,
    verify_variant,
)

__all__ = [
    "MANIFEST_FILE",
    "DataFile",
    "Manifest",
    "ManifestError",
    "ModelEntry",
    "SelectionError",
    "SplitInfo",
    "TensorSpec",
    "Variant",
    "discover_models",
    "held_models",
    "load_manifest",
    "parse_selection",
    "sha256_file",
    "verify_variant",
]
