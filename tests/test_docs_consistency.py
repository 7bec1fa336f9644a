"""The docs' tables agree with the code: error codes (docs/service.md "Errors") and setting
defaults (every table that gives one). Read from the source, so a new code or a changed
default fails here until the docs say it."""

from __future__ import annotations

import re
from pathlib import Path

from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]

# Codes in the source that no client sees: base classes' defaults (every raise is of a
# subclass), an explanation's cancellation (only its own gone client or a joiner that
# recomputes gets it), and the name of a bare 400 (the fast path's body that could not be
# read: a broken connection, not a request to fix).
INTERNAL_CODES = {"queue_error", "explain_failed", "cancelled"}


def _emitted_codes() -> set[str]:
    src = "\n".join(p.read_text("utf-8") for p in (ROOT / "service").rglob("*.py"))
    codes: set[str] = set()
    for pattern in (
        r'\b[45]\d\d[:,]\s*"([a-z][a-z_]+)"',  # ApiError(404, "x"), (422, "x", ...), {400: "x"}
        r'\bcode = "([a-z_]+)"',  # exception classes
        r'(?:InputError|PydanticCustomError)\(\s*"([a-z_]+)"',
    ):
        codes |= set(re.findall(pattern, src))
    errors = (ROOT / "service/api/errors.py").read_text("utf-8")
    code_for = errors.split("def _code_for", 1)[1].split("\ndef ", 1)[0]
    return codes | set(re.findall(r'return "([a-z_]+)"', code_for))


def _documented_codes() -> set[str]:
    doc = (ROOT / "docs/service.md").read_text("utf-8")
    table = doc.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in table.splitlines() if re.match(r"\| \d{3} \|", line)]
    return {code for row in rows for code in re.findall(r"`([a-z_]+)`", row[2])}


def test_error_codes_in_the_docs_are_the_ones_the_service_emits():
    emitted, documented = _emitted_codes() - INTERNAL_CODES, _documented_codes()
    assert sorted(emitted - documented) == [], "emitted, not in docs/service.md's table"
    assert sorted(documented - emitted) == [], "in docs/service.md's table, never emitted"


def _split_top_level(cell: str) -> list[str]:
    """A table cell's comma-separated parts, commas inside parentheses kept."""
    parts, depth, cur = [], 0, ""
    for ch in cell:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in [*parts, cur]]


def _documented_defaults() -> list[tuple[str, str, str]]:
    """(file, setting, default as written) from the settings tables: rows `| NLPSERVE_A`,
    `NLPSERVE_B` | a, b | ...` (README, docs/service.md, docs/explain.md) and cells
    `` `A` [a], `B` [b] `` (docs/scale-out.md). docs/deploy.md's table is of Compose's own
    variables (tests/test_compose.py)."""
    out = []
    docs = sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "deploy.md")
    for path in [ROOT / "README.md", *docs]:
        for line in path.read_text("utf-8").splitlines():
            cells = [c.strip() for c in line.split("|")[1:-1]]
            if not cells:
                continue
            for name, default in re.findall(r"`([A-Z][A-Z0-9_]+)` \[([^\]]*)\]", cells[0]):
                out.append((path.name, name, default))
            names = re.findall(r"`NLPSERVE_([A-Z0-9_]+)`", cells[0])
            if names and len(cells) > 2 and not re.sub(r"[`NLPSERVE_A-Z0-9, ]", "", cells[0]):
                defaults = _split_top_level(cells[1])
                if len(defaults) == len(names):
                    out.extend((path.name, n, d) for n, d in zip(names, defaults, strict=True))
    return out


def _as_written(value: object) -> str | None:
    """How the docs write a literal default; None for a default they describe in words."""
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def test_documented_defaults_are_the_settings_defaults():
    fields = Settings.model_fields
    rows = _documented_defaults()
    assert len({name for _, name, _ in rows}) > 40  # the tables were found and parsed
    wrong = []
    for file, name, written in rows:
        field = fields.get(name.lower())
        assert field is not None, f"{file}: {name} is no setting"
        want = _as_written(field.get_default(call_default_factory=True))
        got = written.strip("`").strip()
        if want is None:
            continue
        try:
            same = float(got) == float(want)
        except ValueError:
            same = got == want
        if not same:
            wrong.append(f"{file}: {name} documented {written!r}, default {want!r}")
    assert wrong == []
