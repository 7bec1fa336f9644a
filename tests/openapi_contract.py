"""The HTTP API's contract: ``docs/openapi.json``, the OpenAPI document the service serves under
default settings, and a comparison of two such documents that lists the changes which break
existing clients apart from the additive ones.

    python -m tests.openapi_contract           # the live document against the committed one
    python -m tests.openapi_contract --write   # the same, then commit-ready (`make openapi`)

The document is built from the routes and the settings (the limits it announces:
NLPSERVE_MAX_TEXT_CHARS, _MAX_BATCH_ITEMS, _MAX_QUEUE_DEPTH, _EXPLAIN_MAX_EVALS_LIMIT), not
from the models loaded: the one written here is ``/openapi.json`` of ``make run`` (every
model in models/, default settings), whatever NLPSERVE_* the shell sets.

Breaking is judged from a client's side: a request it sends that the server may now refuse,
or an answer it may now fail to read. In a request: an operation, parameter, field, enum value
or union choice removed, a field or parameter newly required, a type changed (not widened),
a limit tightened (maxLength, maxItems, maximum, minimum, pattern...), unknown fields newly
refused. In an answer: an operation or success status removed, a field removed or no longer
always there, a type changed (not narrowed), an enum value removed or added (generated
clients reject a value they do not know), a new union choice, a required header removed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = ROOT / "docs" / "openapi.json"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
REQUEST, RESPONSE = "request", "response"
# Limits a request must keep to: lowering an upper one or raising a lower one refuses requests
# that passed before.
UPPER = ("maxLength", "maxItems", "maxProperties", "maximum", "exclusiveMaximum")
LOWER = ("minLength", "minItems", "minProperties", "minimum", "exclusiveMinimum")

Schema = dict[str, Any]


@contextmanager
def _without_nlpserve_env() -> Iterator[None]:
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("NLPSERVE_")}
    try:
        yield
    finally:
        os.environ.update(saved)


def live_document() -> Schema:
    """What ``make run`` serves at /openapi.json (default settings, models/)."""
    from service.api.app import create_app
    from service.config import Settings

    with _without_nlpserve_env():
        app = create_app(Settings(model_dir=ROOT / "models"))
    return json.loads(json.dumps(app.openapi()))  # a copy: the app caches its own


def render(document: Schema) -> str:
    """The committed form: stable key order (the app's), readable diffs."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


@dataclass
class Changes:
    breaking: list[str] = field(default_factory=list)
    additive: list[str] = field(default_factory=list)
    # Neither: a client keeps working but may want to know (an error status no longer
    # documented, an answer's type narrowed).
    other: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = []
        for title, items in (
            ("BREAKING (clients of the committed contract may fail)", self.breaking),
            ("additive", self.additive),
            ("other", self.other),
        ):
            if items:
                lines.append(f"{title}:")
                lines += [f"  - {item}" for item in items]
        return "\n".join(lines) if lines else "no change to requests or answers"


def compare(old: Schema, new: Schema) -> Changes:
    """The changes from ``old`` (what clients were written against) to ``new``."""
    comparer = _Comparer(old, new)
    comparer.run()
    return comparer.changes


def _operations(document: Schema) -> dict[str, Schema]:
    return {
        f"{method.upper()} {path}": op
        for path, item in document.get("paths", {}).items()
        for method, op in item.items()
        if method in METHODS
    }


def _ref_name(schema: Schema) -> str | None:
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None


def _types(schema: Schema) -> frozenset[str] | None:
    """The JSON types a schema allows, where it says so plainly (``type``, or a union of
    plain choices: ``anyOf: [{type: integer}, {type: null}]``); None otherwise."""
    declared = schema.get("type")
    if isinstance(declared, str):
        return frozenset([declared])
    if isinstance(declared, list):
        return frozenset(declared)
    choices = schema.get("anyOf") or schema.get("oneOf")
    if choices:
        parts = [_types(c) for c in choices]
        if all(p is not None for p in parts):
            return frozenset().union(*(p for p in parts if p is not None))
    return None


def _enum(schema: Schema) -> list[Any] | None:
    if "enum" in schema:
        return list(schema["enum"])
    if "const" in schema:
        return [schema["const"]]
    return None


def _choice_key(schema: Schema, index: int) -> str:
    """Which choice of a union this is, to pair old and new: its component, else its type."""
    if name := _ref_name(schema):
        return name
    if (types := _types(schema)) is not None:
        return "|".join(sorted(types))
    return f"choice {index}"


class _Comparer:
    def __init__(self, old: Schema, new: Schema) -> None:
        self.old, self.new = old, new
        self.changes = Changes()
        self._seen: set[tuple[str, str, str]] = set()

    def _breaking(self, where: str, what: str) -> None:
        self.changes.breaking.append(f"{where}: {what}")

    def _additive(self, where: str, what: str) -> None:
        self.changes.additive.append(f"{where}: {what}")

    def _other(self, where: str, what: str) -> None:
        self.changes.other.append(f"{where}: {what}")

    def _resolve(self, document: Schema, schema: Schema) -> Schema:
        name = _ref_name(schema)
        if name is None:
            return schema
        resolved: Schema = document.get("components", {}).get("schemas", {}).get(name, {})
        return resolved

    def run(self) -> None:
        old_ops, new_ops = _operations(self.old), _operations(self.new)
        for key in old_ops.keys() - new_ops.keys():
            self._breaking(key, "operation removed")
        for key in new_ops.keys() - old_ops.keys():
            self._additive(key, "new operation")
        for key in sorted(old_ops.keys() & new_ops.keys()):
            self._operation(key, old_ops[key], new_ops[key])
        for items in (self.changes.breaking, self.changes.additive, self.changes.other):
            items.sort()

    def _operation(self, where: str, old: Schema, new: Schema) -> None:
        self._parameters(where, old.get("parameters", []), new.get("parameters", []))
        self._request_body(where, old.get("requestBody"), new.get("requestBody"))
        old_res, new_res = old.get("responses", {}), new.get("responses", {})
        for status in old_res.keys() - new_res.keys():
            if str(status).startswith("2"):
                self._breaking(where, f"answer {status} removed")
            else:
                self._other(where, f"answer {status} no longer documented")
        for status in new_res.keys() - old_res.keys():
            self._additive(where, f"new answer {status}")
        for status in sorted(old_res.keys() & new_res.keys()):
            self._response(f"{where} answer {status}", old_res[status], new_res[status])

    def _parameters(self, where: str, old: list[Schema], new: list[Schema]) -> None:
        def by_key(params: list[Schema]) -> dict[str, Schema]:
            return {f"{p.get('in')} parameter {p.get('name')}": p for p in params}

        olds, news = by_key(old), by_key(new)
        for key in sorted(olds.keys() - news.keys()):
            self._breaking(where, f"{key} removed")
        for key in sorted(news.keys() - olds.keys()):
            if news[key].get("required"):
                self._breaking(where, f"new required {key}")
            else:
                self._additive(where, f"new optional {key}")
        for key in sorted(olds.keys() & news.keys()):
            o, n = olds[key], news[key]
            if n.get("required") and not o.get("required"):
                self._breaking(where, f"{key} now required")
            self._schema(f"{where} {key}", o.get("schema", {}), n.get("schema", {}), REQUEST)

    def _request_body(self, where: str, old: Schema | None, new: Schema | None) -> None:
        if old is None and new is None:
            return
        if old is None:
            assert new is not None
            if new.get("required"):
                self._breaking(where, "a request body is now required")
            else:
                self._additive(where, "accepts a request body")
            return
        if new is None:
            self._breaking(where, "request body removed")
            return
        if new.get("required") and not old.get("required"):
            self._breaking(where, "the request body is now required")
        self._content(f"{where} request", old, new, REQUEST)

    def _response(self, where: str, old: Schema, new: Schema) -> None:
        old_h, new_h = old.get("headers", {}), new.get("headers", {})
        for name in sorted(old_h.keys() - new_h.keys()):
            if old_h[name].get("required"):
                self._breaking(where, f"header {name} removed")
            else:
                self._other(where, f"optional header {name} removed")
        for name in sorted(new_h.keys() - old_h.keys()):
            self._additive(where, f"new header {name}")
        for name in sorted(old_h.keys() & new_h.keys()):
            if old_h[name].get("required") and not new_h[name].get("required"):
                self._breaking(where, f"header {name} no longer always sent")
            o_schema, n_schema = old_h[name].get("schema", {}), new_h[name].get("schema", {})
            self._schema(f"{where} header {name}", o_schema, n_schema, RESPONSE)
        self._content(where, old, new, RESPONSE)

    def _content(self, where: str, old: Schema, new: Schema, direction: str) -> None:
        old_c, new_c = old.get("content", {}), new.get("content", {})
        for media in sorted(old_c.keys() - new_c.keys()):
            self._breaking(where, f"{media} removed")
        for media in sorted(new_c.keys() - old_c.keys()):
            self._additive(where, f"new media type {media}")
        for media in sorted(old_c.keys() & new_c.keys()):
            o_schema, n_schema = old_c[media].get("schema", {}), new_c[media].get("schema", {})
            self._schema(where, o_schema, n_schema, direction)

    def _schema(self, where: str, old: Schema, new: Schema, direction: str) -> None:
        old_ref, new_ref = _ref_name(old), _ref_name(new)
        if old_ref or new_ref:
            seen = (direction, old_ref or where, new_ref or where)
            if seen in self._seen:  # shared and recursive components: once per direction
                return
            self._seen.add(seen)
            # A component's changes are named after it (many operations may use it).
            if old_ref == new_ref:
                where = f"{direction} {old_ref}"
            old, new = self._resolve(self.old, old), self._resolve(self.new, new)
        self._type(where, old, new, direction)
        self._enums(where, old, new, direction)
        if direction == REQUEST:
            self._limits(where, old, new)
        self._properties(where, old, new, direction)
        for key in ("items",):
            if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
                self._schema(f"{where}[]", old[key], new[key], direction)
        o_extra, n_extra = old.get("additionalProperties"), new.get("additionalProperties")
        if direction == REQUEST and o_extra is not False and n_extra is False:
            self._breaking(where, "fields it does not know are now refused")
        if isinstance(o_extra, dict) and isinstance(n_extra, dict):
            self._schema(f"{where}{{}}", o_extra, n_extra, direction)
        self._choices(where, old, new, direction)

    def _type(self, where: str, old: Schema, new: Schema, direction: str) -> None:
        o, n = _types(old), _types(new)
        if o is None or n is None or o == n:
            return
        change = f"type {'|'.join(sorted(o))} -> {'|'.join(sorted(n))}"
        widened, narrowed = n > o, n < o
        if direction == REQUEST and widened:
            self._additive(where, change)
        elif direction == RESPONSE and narrowed:
            self._other(where, change)
        else:
            self._breaking(where, change)

    def _enums(self, where: str, old: Schema, new: Schema, direction: str) -> None:
        o, n = _enum(old), _enum(new)
        if o is None and n is None:
            return
        if o is None:
            assert n is not None
            (self._breaking if direction == REQUEST else self._other)(
                where, f"now restricted to {n}"
            )
            return
        if n is None:
            (self._additive if direction == REQUEST else self._breaking)(
                where, f"no longer restricted to {o}"
            )
            return
        for value in [v for v in o if v not in n]:
            self._breaking(where, f"enum value {value!r} removed")
        for value in [v for v in n if v not in o]:
            if direction == REQUEST:
                self._additive(where, f"new enum value {value!r}")
            else:
                self._breaking(where, f"new enum value {value!r} (clients may not know it)")

    def _limits(self, where: str, old: Schema, new: Schema) -> None:
        for key in UPPER + LOWER:
            o, n = old.get(key), new.get(key)
            if o == n:
                continue
            if n is None:
                self._additive(where, f"{key} {o} lifted")
            elif o is None or (n < o if key in UPPER else n > o):
                self._breaking(where, f"{key} {o} -> {n}")
            else:
                self._additive(where, f"{key} {o} -> {n}")
        if old.get("pattern") != new.get("pattern"):
            if new.get("pattern") is None:
                self._additive(where, "pattern lifted")
            else:
                self._breaking(where, f"pattern {old.get('pattern')!r} -> {new['pattern']!r}")

    def _properties(self, where: str, old: Schema, new: Schema, direction: str) -> None:
        o_props, n_props = old.get("properties", {}), new.get("properties", {})
        o_req, n_req = set(old.get("required", [])), set(new.get("required", []))
        for name in sorted(o_props.keys() - n_props.keys()):
            self._breaking(where, f"field {name!r} removed")
        for name in sorted(n_props.keys() - o_props.keys()):
            if direction == REQUEST and name in n_req:
                self._breaking(where, f"new required field {name!r}")
            else:
                optional = " optional" if direction == REQUEST else ""
                self._additive(where, f"new{optional} field {name!r}")
        for name in sorted(o_props.keys() & n_props.keys()):
            if direction == REQUEST and name in n_req - o_req:
                self._breaking(where, f"field {name!r} now required")
            elif direction == RESPONSE and name in o_req - n_req:
                self._breaking(where, f"field {name!r} no longer always there")
            self._schema(f"{where}.{name}", o_props[name], n_props[name], direction)

    def _choices(self, where: str, old: Schema, new: Schema, direction: str) -> None:
        for key in ("anyOf", "oneOf", "allOf"):
            o_list, n_list = old.get(key), new.get(key)
            if not isinstance(o_list, list) or not isinstance(n_list, list):
                continue
            olds = {_choice_key(c, i): c for i, c in enumerate(o_list)}
            news = {_choice_key(c, i): c for i, c in enumerate(n_list)}
            for choice in sorted(olds.keys() - news.keys()):
                if direction == REQUEST or key == "allOf":
                    self._breaking(where, f"choice {choice} removed")
                else:
                    self._other(where, f"choice {choice} no longer answered")
            for choice in sorted(news.keys() - olds.keys()):
                if direction == RESPONSE or key == "allOf":
                    self._breaking(where, f"new choice {choice} (clients may not read it)")
                else:
                    self._additive(where, f"new choice {choice}")
            for choice in sorted(olds.keys() & news.keys()):
                self._schema(where, olds[choice], news[choice], direction)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.openapi_contract", description=__doc__)
    parser.add_argument(
        "--write", action="store_true", help=f"write the live document to {DOCUMENT.name}"
    )
    args = parser.parse_args(argv)
    live = live_document()
    where = DOCUMENT.relative_to(ROOT)
    if DOCUMENT.exists():
        committed = json.loads(DOCUMENT.read_text("utf-8"))
        print(f"{where} -> the live API:\n{compare(committed, live).report()}")
        same = DOCUMENT.read_text("utf-8") == render(live)
    else:
        print(f"{where}: none yet")
        same = False
    if args.write:
        DOCUMENT.write_text(render(live), "utf-8")
        if not same:
            print(f"wrote {where}: review `git diff {where}` before committing it")
        return 0
    if not same:
        print(f"{where} is out of date: `make openapi` writes it", file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
