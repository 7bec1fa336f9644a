"""``nlpserve --help``: docstrings are wrapped in the source, the help is wrapped to the
terminal, never both (a command's line in the list broken mid-sentence)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def help_text(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env=os.environ | {"PYTHONPATH": str(ROOT), "COLUMNS": "300", "NO_COLOR": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_wrapped_summary_is_one_line_in_the_command_list() -> None:
    import typer
    from typer.testing import CliRunner

    from service.cli import _unwrap_help

    app, group = typer.Typer(), typer.Typer()

    @group.command()
    def inner() -> None:
        """A summary long enough that the source
        wraps it."""

    @app.command()
    def outer() -> None:
        """Another summary that the source
        wraps.

        A second paragraph,
        wrapped as well."""

    app.add_typer(group, name="group")
    _unwrap_help(app)
    env = {"COLUMNS": "300", "NO_COLOR": "1"}
    out = CliRunner().invoke(app, ["--help"], env=env).output
    assert "Another summary that the source wraps." in out
    out = CliRunner().invoke(app, ["outer", "--help"], env=env).output
    assert "A second paragraph, wrapped as well." in out
    out = CliRunner().invoke(app, ["group", "--help"], env=env).output
    assert "A summary long enough that the source wraps it." in out


def test_a_commands_later_paragraphs_are_joined_too() -> None:
    text = help_text("models")
    joined = (
        "Every manifest, file and variant checksum is checked; a broken one ends the command"
        " with a line naming it (exit status 2)."
    )
    assert any(joined in line for line in text.splitlines())
