"""The docs' tables agree with the code: error codes (docs/service.md "Errors") and setting
defaults (every table that gives one). Read from the source, so a new code or a changed
default fails here until the docs say it. And what a newcomer runs from the docs: every
shell block parses, every option a documented command passes exists, every link between the
docs (file and heading) resolves."""

from __future__ import annotations

import re
import shlex
import subprocess
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


def test_the_limit_names_in_the_docs_are_the_ones_the_service_sends():
    """docs/service.md's table of an error's ``limit`` names them all, the OpenAPI schema's
    description too, and the Python client cuts requests by names the service sends."""
    from service.api.errors import LIMIT_NAMES
    from service.api.schemas import ErrorLimit
    from service.client._calls import _ITEM_LIMITS

    doc = (ROOT / "docs/service.md").read_text("utf-8")
    table = doc.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z_]+)` \| ", table, flags=re.M)
    assert sorted(documented) == sorted(LIMIT_NAMES)
    described = ErrorLimit.model_fields["name"].description or ""
    assert sorted(set(re.findall(r"`([a-z_]+)`", described))) == sorted(LIMIT_NAMES)
    assert _ITEM_LIMITS.issubset(LIMIT_NAMES)


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


# The documents a newcomer runs commands from.
RUN_DOCS = ["README.md", "docs/service.md", "docs/scale-out.md", "docs/deploy.md",
            "docs/explain.md", "bench/README.md"]  # fmt: skip


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, paired fence by fence."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def test_shell_blocks_in_the_docs_parse():
    """A shell block is commands only: prose left inside one (a closing fence misplaced)
    does not parse, and a reader pasting the block runs it."""
    broken = []
    for name in RUN_DOCS:
        for lang, body in _fenced_blocks((ROOT / name).read_text("utf-8")):
            if lang not in ("bash", "sh"):
                continue
            proc = subprocess.run(["bash", "-n"], input=body, text=True, capture_output=True)
            if proc.returncode != 0:
                broken.append(f"{name}: {body.splitlines()[0]!r}: {proc.stderr.strip()}")
    assert broken == []


def test_promql_blocks_in_the_docs_parse():
    """Each query of a promql block (queries apart by a blank or comment line) parses: two
    run together are one query Prometheus refuses, and a reader pastes them one by one."""
    import promql_parser

    broken = []
    for name in RUN_DOCS:
        for lang, body in _fenced_blocks((ROOT / name).read_text("utf-8")):
            if lang != "promql":
                continue
            for query in re.split(r"\n(?:\s*(?:#.*)?\n)+", "\n" + body + "\n"):
                if query.strip():
                    try:
                        promql_parser.parse(query)
                    except ValueError as e:
                        broken.append(f"{name}: {query.strip().splitlines()[0]!r}: {e}")
    assert broken == []


def _documented_commands(text: str) -> list[list[str]]:
    """The words of every command line in shell blocks and in inline code spans."""
    lines = [
        line
        for lang, body in _fenced_blocks(text)
        if lang in ("bash", "sh", "")
        # a usage line's options may go on below it, indented ("    [--init-from ...]")
        for line in re.sub(r"\\\n|\n\s+(?=\[)", " ", body).splitlines()
    ]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    lines += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    out = []
    for line in lines:
        # a pipe between commands has spaces around it; "pos|polarity" is a usage alternative
        for part in re.split(r"\s(?:&&|\|\|?)\s|;", line.split(" #")[0]):
            try:
                words = shlex.split(part)
            except ValueError:  # a placeholder with a quote in it
                words = part.split()
            for word in words:  # make bench BENCH_ARGS="--requests ..."
                if word.startswith("BENCH_ARGS="):
                    words = ["python", "-m", "bench.run", *shlex.split(word.split("=", 1)[1])]
            out.append(words)
    return out


def _nlpserve_options() -> dict[tuple[str, ...], set[str]]:
    import typer.main
    from typer.core import TyperCommand, TyperGroup

    from service.cli import app
    from training.cli import register

    if not any(g.name == "train" for g in app.registered_groups):
        register(app)
    options: dict[tuple[str, ...], set[str]] = {}

    # typer's commands: click's classes as typer carries them (0.2x: its own copy of click)
    def walk(cmd: TyperCommand | TyperGroup, path: tuple[str, ...]) -> None:
        options[path] = {o for p in cmd.params for o in [*p.opts, *p.secondary_opts]}
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, (*path, name))

    root = typer.main.get_command(app)
    assert isinstance(root, TyperGroup)
    walk(root, ())
    return options


def _argparse_options(path: Path) -> set[str]:
    """The options a script's argparse parser declares (literal add_argument names; a
    BooleanOptionalAction's --no- form too)."""
    names = set(re.findall(r'"(--[a-z0-9][a-z0-9-]*)"', path.read_text("utf-8")))
    return names | {"--no-" + n[2:] for n in names} | {"--help"}


def _commands_and_options(words: list[str], nlpserve: dict) -> list[tuple[str, list[str], set]]:
    """(command, its arguments, the options it declares) for a documented command line; one
    per alternative of a usage line (`nlpserve train pos|polarity ...`)."""
    for i, word in enumerate(words):
        if word.endswith("nlpserve") or (i == 0 and word in ("train", "pretrain", "evaluate")):
            j = i + 1 if word.endswith("nlpserve") else i
            paths: list[tuple[str, ...]] = [()]
            while j < len(words):
                longer = [(*p, alt) for p in paths for alt in words[j].split("|")]
                if not all(p in nlpserve for p in longer):
                    break
                paths, j = longer, j + 1
            return [("nlpserve " + " ".join(p), words[j:], nlpserve[p]) for p in paths if p]
        module = words[i + 1] if word == "-m" and i + 1 < len(words) else None
        if module and module.startswith(("bench.", "training.", "deploy.")):
            script = ROOT / (module.replace(".", "/") + ".py")
            return [(module, words[i + 2 :], _argparse_options(script))]
        if re.fullmatch(r"(bench|deploy|training)/[\w/]+\.py", word) and "python" in words[0]:
            return [(word, words[i + 1 :], _argparse_options(ROOT / word))]
    return []


def test_options_in_documented_commands_exist():
    """Every --option a doc passes to nlpserve or to a bench/deploy/training script is one
    that command declares (the help lists it)."""
    nlpserve, checked, unknown = _nlpserve_options(), set(), []
    for name in RUN_DOCS:
        for words in _documented_commands((ROOT / name).read_text("utf-8")):
            for command, args, declared in _commands_and_options(words, nlpserve):
                checked.add(command)
                for arg in args:
                    option = arg.strip("[]").split("=", 1)[0]
                    if re.fullmatch(r"--[a-z][a-z0-9-]*", option) and option not in declared:
                        unknown.append(f"{name}: {command} {option}")
    assert {"nlpserve worker", "nlpserve train polarity", "nlpserve train qa"} <= checked
    assert {"nlpserve pretrain", "nlpserve evaluate", "bench.run", "bench.overload"} <= checked
    assert {"nlpserve predict", "bench.predict_loop"} <= checked
    assert unknown == []


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#+ (.+)$", path.read_text("utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_between_the_docs_resolve():
    broken = []
    for name in RUN_DOCS:
        doc = ROOT / name
        prose = re.sub(r"^```.*?^```", "", doc.read_text("utf-8"), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file) if file else doc
            if not dest.exists():
                broken.append(f"{name}: {target} (no such file)")
            elif anchor and anchor not in _anchors(dest):
                broken.append(f"{name}: {target} (no such heading)")
    assert broken == []


def test_the_docs_say_what_make_run_sets():
    """README and docs/service.md describe `make run` as `nlpserve serve`: a setting its
    recipe adds (NLPSERVE_EXPLAIN_WARMUP=1) behaves otherwise than the documented default,
    so the docs name it where they say what `make run` is."""
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, "no run target in the Makefile"
    settings = set(re.findall(r"\b(NLPSERVE_\w+)=", recipe.group(1)))
    for doc in ("README.md", "docs/service.md"):
        paragraphs = (ROOT / doc).read_text("utf-8").split("\n\n")
        said = [p for p in paragraphs if "`make run`" in p and "nlpserve serve" in p]
        assert said, f"{doc} does not say what `make run` runs"
        for paragraph in said:
            assert [v for v in sorted(settings) if v not in paragraph] == [], (doc, paragraph)


def _registered_metrics() -> set[str]:
    """Every series the service and the worker register: the name a Counter, Gauge or
    Histogram is created with (service/metrics.py and the modules of later features)."""
    src = "\n".join(p.read_text("utf-8") for p in (ROOT / "service").rglob("*.py"))
    return set(re.findall(r'\b(?:Counter|Gauge|Histogram)\(\s*"(nlpserve_[a-z_]+)"', src))


def test_metrics_in_the_docs_are_the_ones_the_service_exports():
    """Each registered metric has its row (docs/service.md "Metrics", docs/scale-out.md
    "Worker metrics" and its replica gauges), and no doc, alert or panel names a series
    that nothing exports (a renamed metric leaves its old name behind)."""
    registered = _registered_metrics()
    assert {"nlpserve_requests_total", "nlpserve_response_cache_hits_total"} <= registered
    service_md = (ROOT / "docs/service.md").read_text("utf-8")
    scale_out = (ROOT / "docs/scale-out.md").read_text("utf-8")
    tables = (
        service_md.split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
        + scale_out.split("\n## Settings", 1)[1].split("\n## Tests", 1)[0]
    )
    assert sorted(m for m in registered if f"`{m}" not in tables) == []
    # nginx's own names in the gateway's template: its upstreams and its rate-limit zone
    nginx = {"nlpserve_api", "nlpserve_grpc", "nlpserve_per_client"}
    named = set()
    for path in [*(ROOT / p for p in RUN_DOCS), *(ROOT / "deploy").rglob("*.y*ml"),
                 ROOT / "deploy/grafana/nlpserve.json"]:  # fmt: skip
        names = re.findall(r"\bnlpserve_[a-z_]+", path.read_text("utf-8"))
        named |= {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}
    assert sorted(named - registered - nginx) == []
