"""NLPSERVE_LOAD_MODELS / ``--load``: which models (and versions) a process loads.

Workers split by hardware and versions held back in a rollout both rest on it: a name or
version the repository lacks must stop the process with one line, never load something else.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings
from service.repository import SelectionError, discover_models, parse_selection
from tests.service_support import live_server, make_settings


@pytest.fixture
def repo(model_repo: Path, tmp_path: Path) -> Path:
    """pos-en at versions 1 and 2 (the same files), polarity-en at 1."""
    root = tmp_path / "models"
    for name in ("pos-en", "polarity-en"):
        shutil.copytree(model_repo / name / "1", root / name / "1")
    shutil.copytree(root / "pos-en" / "1", root / "pos-en" / "2")
    manifest = root / "pos-en" / "2" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": "2"}))
    return root


def _loaded(root: Path, select: dict[str, str | None] | None) -> dict[str, str]:
    return {e.name: e.manifest.version for e in discover_models(root, select=select)}


def test_selection_picks_models_and_versions(repo: Path) -> None:
    assert _loaded(repo, None) == {"pos-en": "2", "polarity-en": "1"}  # highest versions
    assert _loaded(repo, {"polarity-en": None}) == {"polarity-en": "1"}
    assert _loaded(repo, {"pos-en": "1"}) == {"pos-en": "1"}  # held back
    assert _loaded(repo, parse_selection(" pos-en=2 , polarity-en ")) == {
        "pos-en": "2",
        "polarity-en": "1",
    }
    # `*`: every model, the named ones at their pinned versions (one held back in a rollout)
    assert _loaded(repo, parse_selection("*,pos-en=1")) == {"pos-en": "1", "polarity-en": "1"}
    assert _loaded(repo, parse_selection("*")) == _loaded(repo, None)


def test_selection_of_what_the_repository_lacks_is_refused(repo: Path) -> None:
    with pytest.raises(SelectionError, match=r"names qa-zh, which .* holds: polarity-en, pos-en"):
        discover_models(repo, select={"qa-zh": None, "pos-en": None})
    with pytest.raises(SelectionError, match=r"names pos-en=3, but .* holds versions 1, 2"):
        discover_models(repo, select={"pos-en": "3"})
    with pytest.raises(SelectionError, match=r"names qa-zh, which"):
        discover_models(repo, select=parse_selection("*,qa-zh=1"))
    # a folder without any manifest is not a model: selecting it is refused like a typo
    (repo / "empty" / "1").mkdir(parents=True)
    with pytest.raises(SelectionError, match=r"names empty, which .* holds: polarity-en, pos-en\)"):
        discover_models(repo, select={"empty": None})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (" , ", "names no model"),
        ("pos-en=", "version ''"),
        ("=1", "model name ''"),
        ("../etc", "model name '../etc'"),
        ("pos-en,pos-en=1", "named twice"),
        ("*=1", "takes no version"),
        ("*,*", "named twice"),
    ],
)
def test_bad_selection_is_a_setting_error(text: str, message: str) -> None:
    with pytest.raises(ValidationError, match="load_models") as e:
        Settings(load_models=text)
    assert message in str(e.value)


def test_empty_selection_means_every_model() -> None:
    """``NLPSERVE_LOAD_MODELS=`` (what compose's ``${VAR:-}`` gives) is unset, not an error."""
    for empty in ("", "  "):
        assert Settings(load_models=empty).model_selection() is None


def test_cli_refuses_an_unknown_selection_in_one_line(cli, repo: Path) -> None:
    for command in ("serve", "worker"):
        res = cli(command, "--models", repo, "--load", "pos-en=9")
        assert res.exit_code != 0 and "pos-en=9" in str(res.exception or res.output)


def test_buckets_for_a_model_the_repository_lacks_stop_the_command(
    cli, repo: Path, monkeypatch
) -> None:
    """NLPSERVE_BUCKETS naming a model the repository does not hold (a typo: `pos_en`) was
    ignored without a word, and the model kept its manifest's edges. A model the repository
    holds but this process does not load (NLPSERVE_LOAD_MODELS) is fine: workers share one
    environment and load different models."""
    started: list[str] = []  # were the command to go on, it must not serve (nor on 8000)
    monkeypatch.setattr("service.server.run_server", lambda s: started.append("serve"))
    monkeypatch.setattr("service.worker.run_worker", lambda s: started.append("worker"))
    monkeypatch.setenv("NLPSERVE_BUCKETS", '{"pos_en": [8], "polarity-en": [8]}')
    for command in ("serve", "worker"):
        res = cli(command, "--models", repo, "--load", "pos-en")
        assert res.exit_code == 2, res.output
        assert "invalid setting: NLPSERVE_BUCKETS names pos_en, which" in res.output
        assert "(it holds: polarity-en, pos-en)" in res.output
    monkeypatch.setenv("NLPSERVE_BUCKETS", '{"pos-en": [0, 8]}')
    res = cli("serve", "--models", repo)
    assert res.exit_code == 2
    assert "NLPSERVE_BUCKETS: Value error, pos-en: bucket edges are sequence" not in res.output
    assert "NLPSERVE_BUCKETS: pos-en: bucket edges are sequence lengths in tokens" in res.output
    assert started == []


def test_main_reports_a_selection_error_as_such(repo: Path, capsys, monkeypatch) -> None:
    from service.cli import main

    monkeypatch.setattr("sys.argv", ["nlpserve", "serve", "--models", str(repo), "--load", "x"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("nlpserve: invalid model selection: ")
    assert "names x, which" in err and "Traceback" not in err


async def test_service_serves_only_the_selection(repo: Path) -> None:
    settings = make_settings(repo, load_models="pos-en=1")
    async with live_server(settings) as srv, srv.client() as c:
        models = (await c.get("/v1/models")).json()
        r = await c.post("/v1/polarity", json={"text": "a fine film"})
        tagged = await c.post("/v1/pos", json={"text": "the dog runs"})
    assert [(m["name"], m["version"]) for m in models["models"]] == [("pos-en", "1")]
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_loaded"
    message = r.json()["error"]["message"]
    assert "NLPSERVE_LOAD_MODELS names none" in message and "pos-en=1" not in message
    assert tagged.status_code == 200
