"""What every ``nlpserve train …``/``pretrain`` command shares: the common options, where the
data is, the command line a manifest records, and the checks on the output made before any
data is read or any training done.

torch is not imported here: registering the commands costs nothing without it.
"""

from __future__ import annotations

import functools
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


OutOpt = Annotated[Path, typer.Option("--out", help="Model repository root.")]
VersionOpt = Annotated[
    str | None, typer.Option(help="Version folder name (default: next integer).")
]
# numpy's seed must lie in [0, 2**32)
SeedOpt = Annotated[
    int, typer.Option(min=0, max=2**32 - 1, help="Seed for the data split and training.")
]
DeviceOpt = Annotated[Device, typer.Option(help="Training device.")]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        min=1, help="torch CPU threads (default torch's; 1 is faster on busy shared cores)."
    ),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace the version folder if it exists.")
]
WorkOpt = Annotated[
    Path | None,
    typer.Option(
        help="The run's working folder: its resumable checkpoint (and a transformer's "
        "best-dev checkpoint, best/). Default: runs/<name>."
    ),
]
CHECKPOINT_EVERY_HELP = (
    "Also write the resumable checkpoint every N optimizer steps (a number) or every so long "
    "(10m, 90s, 2h); 0: only at each epoch end, at the end of training and when interrupted "
    "by Ctrl-C/SIGTERM. It replaces the last one atomically and is removed once the entry is "
    "published."
)
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class CheckpointEvery:
    """``--checkpoint-every``: a step count or a time. Time is the default because the cost of
    a write is fixed (a transformer's checkpoint: ~1.6 s for MiniLM-L6 here) while a step
    costs 8 s on a CPU and 0.05 s on a GPU: every 10 minutes is under 0.3% on either, and an
    interruption loses at most 10 minutes. When checkpoints are written never changes the
    result (the state saved is the state a step leaves)."""

    steps: int = 0
    seconds: float = 0.0
    text: str = "0"

    def __str__(self) -> str:  # --help's [default: ...]
        return self.text


def parse_checkpoint_every(value: str | CheckpointEvery) -> CheckpointEvery:
    if isinstance(value, CheckpointEvery):
        return value
    text = value.strip()
    if text.isdigit():
        return CheckpointEvery(steps=int(text), text=text)
    if (m := _DURATION.fullmatch(text)) and (seconds := float(m[1]) * _UNIT_S[m[2]]) > 0:
        return CheckpointEvery(seconds=seconds, text=text)
    raise typer.BadParameter(
        f"{value!r} is neither a number of steps (e.g. 200; 0: epoch ends only) nor a time "
        "(e.g. 10m, 90s, 2h)"
    )


CHECKPOINT_EVERY_DEFAULT = parse_checkpoint_every("10m")
CheckpointEveryOpt = Annotated[
    CheckpointEvery,
    typer.Option(parser=parse_checkpoint_every, metavar="N|TIME", help=CHECKPOINT_EVERY_HELP),
]
ResumeOpt = Annotated[
    Path | None,
    typer.Option(
        help="Continue an interrupted run from its checkpoint (a work dir or its "
        "checkpoint.pt), to the result the run would have had. Give the options the run "
        "was started with: one that changes the result is refused if it differs (where "
        "the run writes, --checkpoint-every, --progress and the --data path may differ; "
        "the data files' contents may not)."
    ),
]
ProgressOpt = Annotated[
    bool | None,
    typer.Option(
        "--progress/--no-progress",
        help="Progress bars on stderr (default: on when stderr is a terminal).",
        show_default=False,
    ),
]


def bar_disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for ``--progress/--no-progress``: neither given (None) lets tqdm
    turn the bar off when stderr is not a terminal (a redirected log gets no ``\\r`` updates)."""
    return None if progress is None else not progress


def bars_shown(progress: bool | None) -> bool:
    """Whether bars show under ``--progress/--no-progress``: as asked, else when stderr is a
    terminal (what tqdm decides for :func:`bar_disable`'s None)."""
    return sys.stderr.isatty() if progress is None else progress


class Terminated(BaseException):
    """SIGTERM arrived during a training command (``timeout``, ``docker stop``, a scheduler).
    A ``BaseException``, like ``KeyboardInterrupt``: what cleans up after Ctrl-C (the staging
    folder's removal) runs for it too, and no ``except Exception`` swallows it."""


SIGTERM_EXIT = 128 + signal.SIGTERM  # 143, what a shell reports for a process SIGTERM ended
SIGINT_EXIT = 128 + signal.SIGINT  # 130, Ctrl-C's

_P = ParamSpec("_P")
_R = TypeVar("_R")


def handles_sigterm(
    command: Callable[_P, _R],
    left: str = "its unpublished files were removed",
    say_interrupt: bool = False,
) -> Callable[_P, _R]:
    """Run ``command`` with SIGTERM handled like Ctrl-C: it raises :class:`Terminated` in the
    main thread, so the run unwinds through its cleanup (no staging folder is left behind),
    then ends with one line on stderr (``left``: what the run leaves, and how to resume when
    the run saved a checkpoint) and exit status 143 (130 for a Ctrl-C that saved one). A
    second SIGTERM during that cleanup is ignored. (SIGKILL cannot be handled: see README,
    "Command line".) ``say_interrupt``: a Ctrl-C ends in that line too, without a resume hint
    (a command that saves no checkpoint, whose Ctrl-C otherwise ends silently)."""

    @functools.wraps(command)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        def terminate(signum: int, _frame: object) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise Terminated(signum)

        try:
            previous = signal.signal(signal.SIGTERM, terminate)
        except ValueError:  # not the main thread: signals cannot be handled here
            return command(*args, **kwargs)
        try:
            return command(*args, **kwargs)
        except Terminated as e:
            fail(f"terminated by SIGTERM: the run stopped; {left}{_resume(e)}", SIGTERM_EXIT)
        except KeyboardInterrupt as e:
            if not (say_interrupt or hasattr(e, "resume_hint")):
                raise
            fail(f"interrupted: the run stopped; {left}{_resume(e)}", SIGINT_EXIT)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return run


def _resume(interrupt: BaseException) -> str:
    """The resume hint a checkpointing run put on the exception (training.checkpoint)."""
    hint = getattr(interrupt, "resume_hint", None)
    return f"; {hint}" if hint else ""


def fail(message: object, code: int = 1) -> NoReturn:
    """One line on stderr and exit status ``code``: 2 for what the user's input causes, 1 for
    a run that trained but must not publish (ONNX parity; the same command would fail again)."""
    typer.echo(f"nlpserve: {message}", err=True)
    raise typer.Exit(code)


def resolve_data(data: Path | None) -> Path:
    """``--data`` or the NLPSERVE_DATA_DIR setting; a clear error when it does not exist."""
    from service.config import Settings

    path = data if data is not None else Settings().data_dir
    if not path.exists():
        how = "--data" if data is not None else "NLPSERVE_DATA_DIR (setting data_dir)"
        raise typer.BadParameter(
            f"data path '{path}' (from {how}) does not exist; pass --data PATH or set "
            "NLPSERVE_DATA_DIR to the shared data folder"
        )
    return path


def recorded_command(data: Path | None, root: Path) -> str:
    """The command line a manifest records, with ``--data`` even where the run took it from
    NLPSERVE_DATA_DIR (the command must reproduce the run as written)."""
    from training.repository import command_line

    return command_line(implied={"--data": root.resolve()} if data is None else None)


def check_output(out: Path, name: str, version: str | None, overwrite: bool) -> str:
    """Everything writing the entry would refuse, checked before any data is read or any
    training done: name and version are plain folder names, the version folder does not
    exist yet (unless ``--overwrite``), and ``--out`` can be written. Returns the version to
    write (the next integer when ``--version`` is not given)."""
    from training.repository import (
        check_new_version,
        check_writable,
        next_version,
        version_folder,
    )

    try:
        folder = version_folder(out, name, version or next_version(out, name))
    except ValueError as e:  # a name/version that is not one folder name
        hint = "'--name'" if str(e).startswith("name ") else "'--version'"
        raise typer.BadParameter(str(e), param_hint=hint) from None
    try:
        check_new_version(folder, overwrite)
    except FileExistsError as e:  # what `main` makes of it, also where the app runs alone
        fail(f"FileExistsError: {e}", 2)
    try:
        check_writable(out)
    except OSError as e:
        raise typer.BadParameter(
            f"cannot write the model repository {out}: {e.strerror or e}", param_hint="'--out'"
        ) from None
    return folder.name


# What a resume may change: where the run writes, how it looks, when it checkpoints; never
# what it computes. --data is compared by its files' sha256 instead of its path.
NOT_RESULT_OPTIONS = frozenset(
    {"out", "name", "version", "overwrite", "work_dir", "checkpoint_every", "resume",
     "progress", "log_file", "variants", "data"}
)  # fmt: skip


def result_options(**computed: Any) -> dict[str, Any]:
    """The running command's options that shape its result, by flag (``--hidden``), as
    JSON-like values; ``computed`` adds or replaces entries (the data's sha256, the thread
    count in effect). A checkpoint records them and a resume must match them."""
    try:  # typer 0.2x carries its own click
        from typer._click.globals import get_current_context
    except ImportError:
        from click import get_current_context  # type: ignore[no-redef]  # same function

    ctx = get_current_context()
    flags = {p.name: p.opts[0] for p in ctx.command.params if p.name}
    out: dict[str, Any] = {}
    for name, value in ctx.params.items():
        if name in NOT_RESULT_OPTIONS:
            continue
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, Path):
            value = str(value)
        out[flags.get(name, name)] = value
    out.update(computed)
    return out
