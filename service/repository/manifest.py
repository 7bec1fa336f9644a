"""The manifest contract of one model version (``manifest.json``).

``service`` owns this schema; ``training`` writes it. Every file named here is relative to
the version folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1

Task = Literal["pos", "polarity", "qa", "detect"]
DType = Literal["int64", "int32", "float32", "float16", "bool"]


class ManifestError(ValueError):
    """A manifest that is missing or invalid; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _in_folder(value: str) -> str:
    """A file the manifest names is in its version folder: a plain file name, so a manifest
    cannot point the server at files elsewhere (``../../x.onnx``, ``/etc/...``)."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", value):
        raise ValueError(
            f"file {value!r}: name a file in the version folder (letters, digits, '.', '_', "
            "'-'; no folder, not starting with '.')"
        )
    return value


FileName = Annotated[str, AfterValidator(_in_folder)]


class TensorSpec(_Strict):
    name: str
    dtype: DType
    # Symbolic names ("batch", "sequence") mark dynamic axes; ints are fixed sizes.
    shape: list[int | str]


class Variant(_Strict):
    """One ONNX file of the model (fp32, int8-quantised, fp16...)."""

    file: FileName
    precision: Literal["fp32", "int8", "fp16"] = "fp32"
    # Providers this variant is meant for, in preference order.
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    sha256: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    # The execution provider ``metrics`` were measured with (an fp16 variant for CUDA may have
    # been evaluated on a machine without a GPU). Training and ``evaluate --record`` write it
    # for every variant; None (older manifests): the first of ``providers``.
    measured_with: str | None = None


class DataFile(_Strict):
    path: str  # relative to the data directory the training ran on
    sha256: str
    bytes: int | None = None


class SplitInfo(_Strict):
    seed: int
    ratios: dict[str, float]  # e.g. {"train": 0.8, "dev": 0.1, "test": 0.1}
    sizes: dict[str, int]  # examples per split
    unit: str = "sentence"  # what was split: sentence, question, article...


class Preprocessing(_Strict):
    """How raw requests become model inputs (the contract shared with training)."""

    kind: Literal["words", "wordpiece"]
    tokenizer_file: FileName = "tokenizer.json"
    # words: character vocabulary for char features (None when the model has none)
    chars_file: FileName | None = None
    max_word_length: int | None = None
    lowercase: bool = True
    # wordpiece/QA windows
    doc_stride: int | None = None  # QA: context tokens shared by consecutive windows
    max_answer_length: int | None = None  # QA: longest answer span, in tokens
    max_query_length: int | None = None  # QA: questions are cut to this many tokens


_PATH_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_path_component(kind: str, value: str) -> str:
    """A model name or version is one folder of the repository: letters, digits, ``.``,
    ``_``, ``-``, not starting with a dot (``../x`` would write outside it, ``a/b`` nest)."""
    if not _PATH_COMPONENT.fullmatch(value):
        raise ValueError(
            f"{kind} {value!r}: use letters, digits, '.', '_', '-' (one folder name, not "
            "starting with '.')"
        )
    return value


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: Annotated[str, AfterValidator(lambda v: check_path_component("name", v))]
    version: Annotated[str, AfterValidator(lambda v: check_path_component("version", v))]
    task: Task
    architecture: str
    description: str = ""
    created_at: datetime
    framework_versions: dict[str, str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    labels: list[str]
    max_length: int = Field(gt=0, description="Longest token sequence the model accepts.")
    preprocessing: Preprocessing
    buckets: list[int] = Field(
        description="Upper edges (tokens) of the length buckets, ascending; last == max_length."
    )
    variants: dict[str, Variant]
    metrics: dict[str, float]
    split: SplitInfo | None = None
    data: list[DataFile] = Field(default_factory=list)
    command: str
    hyperparameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("buckets")
    @classmethod
    def _ascending(cls, v: list[int]) -> list[int]:
        if not v or any(b <= 0 for b in v) or v != sorted(set(v)):
            raise ValueError("must be a non-empty ascending list of positive token counts")
        return v

    @field_validator("variants")
    @classmethod
    def _has_fp32(cls, v: dict[str, Variant]) -> dict[str, Variant]:
        if not v:
            raise ValueError("must name at least one ONNX file")
        return v

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Files already found to match their checksum, by path, mtime, size and expected digest.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def verify_variant(folder: Path | str, name: str, variant: Variant) -> None:
    """Raise :class:`ManifestError` when the variant's file is not the one its manifest
    recorded (a truncated copy, a file swapped by hand): serving it would answer wrongly or
    fail at the first request."""
    if variant.sha256 is None:
        return
    path = Path(folder) / variant.file
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, variant.sha256)
    if key in _VERIFIED:  # `nlpserve serve` checks the repository, then loads the session
        return
    actual = sha256_file(path)
    if actual != variant.sha256:
        raise ManifestError(
            f"{Path(folder) / MANIFEST_FILE}: variant {name!r}: {variant.file} has sha256 "
            f"{actual[:12]}..., the manifest records {variant.sha256[:12]}... (a damaged or "
            "replaced file: re-export it, or restore the one the manifest describes)"
        )
    _VERIFIED.add(key)


def load_manifest(folder: Path | str, check_files: bool = True) -> Manifest:
    """Read and validate ``<folder>/manifest.json``; check that every file it names exists
    (unless ``check_files`` is False: a record of a version whose files stayed elsewhere)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc']) or '<root>'}': {err['msg']}"
            for err in e.errors()
        )
        raise ManifestError(f"{path}: {problems}") from e
    if manifest.buckets[-1] != manifest.max_length:
        raise ManifestError(
            f"{path}: field 'buckets': last edge {manifest.buckets[-1]} "
            f"must equal max_length {manifest.max_length}"
        )
    named = [manifest.preprocessing.tokenizer_file, manifest.preprocessing.chars_file]
    named += [v.file for v in manifest.variants.values()]
    for rel in filter(None, named if check_files else []):
        if not (Path(folder) / rel).is_file():
            raise ManifestError(f"{path}: names file '{rel}', which does not exist in {folder}")
    return manifest


def write_manifest(folder: Path | str, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST_FILE
    path.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path
