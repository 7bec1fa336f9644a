"""Resumable training checkpoints, shared by the LSTM and transformer loops.

One file per run, ``<work dir>/checkpoint.pt``, replaced atomically (written beside it, then
renamed over it), so a kill at any moment leaves the previous checkpoint or the new one, never
half of one. It holds what the loop needs to continue as if never stopped: the weights, the
optimizer (and scheduler, grad scaler), every random generator, the position in the data
order, the best weights so far and the early-stopping counters, plus the run's identity: the
command, the options that shape the result, the data's sha256, and the command line that
started it (the manifest records that one).

torch is imported inside the functions: the training commands register without it.
"""

from __future__ import annotations

import logging
import os
import random
import shlex
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.data.common import DataError
from training.options import CheckpointEvery, Terminated

log = logging.getLogger(__name__)

FORMAT = "nlpserve-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(DataError):
    """A checkpoint that cannot be resumed (corrupt, another command's, other options), or a
    work dir whose unfinished run a new one would overwrite: one line, exit status 2."""


# ------------------------------------------------------------------ random generators
def rng_state() -> dict[str, Any]:
    """Python's, numpy's, torch's (and CUDA's) generator states, in types ``torch.load``
    reads with ``weights_only`` (numpy's key array as a list)."""
    import torch

    # the tuple form (legacy=True, the default; numpy's stubs say a dict)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, np.asarray(keys).tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    import torch

    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples where a round trip may give lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def restore_random(rng: random.Random, state: Any) -> None:
    rng.setstate(_tuples(state))


# ------------------------------------------------------------------ file
def write_atomically(path: Path, payload: Mapping[str, Any]) -> None:
    """``torch.save`` to a hidden file beside ``path``, flushed to disk, renamed over it, and
    the rename made durable (the folder fsynced). A failed write removes its hidden file."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def checkpoint_file(path: Path) -> Path:
    """``--resume``'s argument: a work dir (its checkpoint.pt) or the file itself."""
    return path / CHECKPOINT_FILE if path.is_dir() else path


def read(path: Path, command: str) -> dict[str, Any]:
    """The checkpoint at ``path`` (a work dir or file) for ``command`` (``train pos``); a
    clear :class:`CheckpointError` for a missing, corrupt or truncated file, or another
    command's checkpoint."""
    import torch

    file = checkpoint_file(path)
    if not file.is_file():
        raise CheckpointError(f"--resume {path}: no checkpoint there (expected {file})")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (pickle, zip and torch errors alike: not loadable)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(
            f"--resume {file}: not a readable checkpoint (truncated or corrupt?): {why}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"--resume {file}: not an nlpserve training checkpoint")
    if payload["run"]["command"] != command:
        raise CheckpointError(
            f"--resume {file}: a checkpoint of `nlpserve {payload['run']['command']}`, "
            f"not of `nlpserve {command}`"
        )
    return payload


def differing_options(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The options (by flag) whose values differ between a checkpoint's run and this one."""
    return sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))


# ------------------------------------------------------------------ interrupts
class StepGuard:
    """SIGINT (Ctrl-C) and SIGTERM that arrive inside a guarded block (a training step, the
    bookkeeping after an evaluation, a checkpoint write) wait for the block's end, then raise
    as they would have (``KeyboardInterrupt``, :class:`Terminated`): the state an interrupted
    loop saves is then whole, never half an optimizer update. A second Ctrl-C inside a block
    raises at once, and ``safe`` turns False (the state is not saved)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.inside = False
        self.ignoring = False
        self.safe = True
        self.pending: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StepGuard:
        try:
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: no handlers here, and nothing deferred
            self.previous.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            # not where the previous handler changed it (handles_sigterm ignores a second
            # SIGTERM while the run cleans up)
            if signal.getsignal(s) == self._handle:
                signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.ignoring:
            return
        if self.inside:
            if self.pending is None:
                self.pending = signum
                return
            if signum == signal.SIGTERM:
                return  # already stopping
            self.safe = False
        self._raise(signum, frame)

    def _raise(self, signum: int, frame: Any) -> None:
        handler = self.previous.get(signum)
        if callable(handler):
            handler(signum, frame)  # Terminated (handles_sigterm), KeyboardInterrupt
        if handler == signal.SIG_IGN:
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    @contextmanager
    def step(self) -> Iterator[None]:
        self.inside = True
        try:
            yield
        finally:
            self.inside = False
        if self.pending is not None:
            signum, self.pending = self.pending, None
            self._raise(signum, None)

    @contextmanager
    def saving_on_interrupt(self, save: Callable[[], None] | None) -> Iterator[None]:
        """Ctrl-C or SIGTERM in the block: ``save`` the last checkpoint (unless a second
        signal inside a step left the state half updated), then let the interruption go on."""
        try:
            yield
        except (KeyboardInterrupt, Terminated):
            if save is not None and self.safe:
                with self.quiet():
                    save()
            raise

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """Signals are ignored while the interrupted run writes its last checkpoint."""
        self.ignoring = True
        try:
            yield
        finally:
            self.ignoring = False


# ------------------------------------------------------------------ a run's checkpoints
@dataclass
class Checkpointing:
    """Where and when a run writes its checkpoint, what identifies the run, and (``resume``)
    the checkpoint it continues from. ``every``: also every N optimizer steps or every so
    many seconds (neither: at each epoch end, the end of training and an interruption only)."""

    command: str  # "train pos"
    path: Path
    every: CheckpointEvery
    options: dict[str, Any]
    command_line: str  # the command that started the run (a resume keeps the original)
    resume_line: str = ""  # this process's command line, when it resumes
    resume: dict[str, Any] | None = None
    resumed: list[dict[str, Any]] = field(default_factory=list)  # earlier resumes
    logs: dict[str, list[Any]] = field(default_factory=dict)
    step: int = 0  # the step of the latest checkpoint written

    saved_at: float = field(default_factory=time.monotonic)  # the last write (or the start)

    def due(self, step: int) -> bool:
        if self.every.steps > 0:
            return step % self.every.steps == 0
        return self.every.seconds > 0 and time.monotonic() - self.saved_at >= self.every.seconds

    def keep(self, name: str, values: list[Any]) -> list[Any]:
        """A list the caller fills during the run (its evaluations' figures): saved with each
        checkpoint, and on a resume refilled with what the checkpoint holds."""
        self.logs[name] = values
        if self.resume is not None:
            values[:] = self.resume["logs"].get(name, [])
        return values

    def save(self, loop: dict[str, Any], *, step: int, epoch: int) -> None:
        write_atomically(
            self.path,
            {
                "format": FORMAT,
                "run": {
                    "command": self.command,
                    "options": self.options,
                    "command_line": self.command_line,
                    "resumed": self.history(),
                },
                "position": {"step": step, "epoch": epoch},
                "loop": loop,
                "rng": rng_state(),
                "logs": {k: list(v) for k, v in self.logs.items()},
            },
        )
        self.step = step
        self.saved_at = time.monotonic()

    def history(self) -> list[dict[str, Any]]:
        """Every resume of this run so far, this one last: what the manifest records."""
        if self.resume is None:
            return list(self.resumed)
        pos = self.resume["position"]
        now = {"from_step": pos["step"], "from_epoch": pos["epoch"], "command": self.resume_line}
        return [*self.resumed, now]

    def record(self) -> dict[str, Any]:
        """The manifest's ``hyperparameters`` fields of a resumed run (none otherwise)."""
        return {"resumed": self.history()} if self.resume is not None else {}

    def hint(self) -> str:
        """How to continue, for the message of an interrupted run."""
        where = self.path.parent if self.path.name == CHECKPOINT_FILE else self.path
        line = self.command_line.split(" && ")[-1]
        return (
            f"its checkpoint of step {self.step} is {self.path}; continue with: "
            f"{line} --resume {shlex.quote(str(where))}"
        )

    def finish(self) -> None:
        """The entry is published: the checkpoint is no longer needed, nor its work dir if
        nothing else is in it (a transformer's best/ stays there)."""
        self.path.unlink(missing_ok=True)
        with suppress(OSError):  # not empty (or already gone)
            self.path.parent.rmdir()

    @contextmanager
    def hint_on_interrupt(self) -> Iterator[None]:
        """An interrupted run (Ctrl-C, SIGTERM) whose checkpoint exists says how to resume:
        the hint rides on the exception to :func:`training.options.handles_sigterm`."""
        try:
            yield
        except (KeyboardInterrupt, Terminated) as e:
            if self.path.is_file():
                e.resume_hint = self.hint()  # type: ignore[union-attr]
                log.warning("interrupted: %s", e.resume_hint)  # type: ignore[union-attr]
            raise


def start(
    command: str,
    work_dir: Path,
    every: CheckpointEvery,
    resume: Path | None,
    options: dict[str, Any],
    command_line: str,
) -> Checkpointing:
    """The run's :class:`Checkpointing`, checked before any training: a resume must be of the
    same command with the same result-shaping ``options`` (else :class:`CheckpointError`
    naming them); a new run must not overwrite an unfinished run's checkpoint."""
    path = work_dir / CHECKPOINT_FILE
    if resume is None:
        if path.exists():
            raise CheckpointError(
                f"{path} holds the checkpoint of an unfinished run: continue it with "
                f"--resume {work_dir}, or remove it (or give another --work-dir) to start over"
            )
        return Checkpointing(command, path, every, options, command_line)
    payload = read(resume, command)
    if path.exists() and path.resolve() != checkpoint_file(resume).resolve():
        raise CheckpointError(
            f"{path} holds the checkpoint of another unfinished run: give another --work-dir "
            f"to resume {checkpoint_file(resume)}"
        )
    run = payload["run"]
    differ = differing_options(run["options"], options)
    if differ:
        shown = "; ".join(_difference(k, run["options"].get(k), options.get(k)) for k in differ)
        raise CheckpointError(
            f"--resume {checkpoint_file(resume)}: the run was started with other options, "
            f"which would change its result ({shown}); resume with the options it was "
            f"started with: {run['command_line']}"
        )
    log.info("resuming %s from step %d (epoch %d)", checkpoint_file(resume),
             payload["position"]["step"], payload["position"]["epoch"])  # fmt: skip
    return Checkpointing(
        command,
        path,
        every,
        options,
        run["command_line"],
        resume_line=command_line,
        resume=payload,
        resumed=list(run["resumed"]),
        step=payload["position"]["step"],
    )


def _difference(option: str, then: Any, now: Any) -> str:
    if isinstance(then, list) or isinstance(now, list):  # the data files' sha256
        return f"{option}: other files or contents"
    shown = ["unset" if v is None else str(v) for v in (then, now)]
    return f"{option} {shown[0]} then, {shown[1]} now"
