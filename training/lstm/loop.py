"""Training-loop pieces shared by the LSTM models: batching, word dropout, early stopping."""

from __future__ import annotations

import copy
import logging
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm.auto import tqdm

from service.preprocess.words import PAD_ID, UNK_ID
from training.checkpoint import Checkpointing, StepGuard, restore_random, restore_rng
from training.options import bar_disable

log = logging.getLogger(__name__)


def length_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random, *, pool: int = 50
) -> list[list[int]]:
    """Shuffled batches of indices; inside pools of ``pool`` batches, examples are sorted by
    length so a batch pads little."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    chunk = batch_size * pool
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def eval_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def word_dropout(word_ids: torch.Tensor, p: float) -> torch.Tensor:
    """Replace real (non-pad) word ids by <unk> with probability ``p``."""
    if p <= 0:
        return word_ids
    drop = (torch.rand(word_ids.shape, device=word_ids.device) < p) & (word_ids != PAD_ID)
    return word_ids.masked_fill(drop, UNK_ID)


@dataclass
class FitResult:
    best_score: float
    best_epoch: int
    epochs_run: int
    seconds: float  # training time, an interrupted run's before its resume included
    history: list[dict[str, float]] = field(default_factory=list)
    earlier_seconds: float = 0.0  # of those, the time before the resume


@dataclass
class _Position:
    """Where the loop is: ``batch`` batches of ``epoch`` done (their loss summed in
    ``loss_sum``), the shuffle generator's state before that epoch's batches were drawn."""

    epoch: int
    batch: int
    order_rng: object
    loss_sum: float = 0.0
    step: int = 0
    finished: bool = False


def fit(
    model: torch.nn.Module,
    *,
    train_step: Callable[[list[int]], torch.Tensor],
    make_batches: Callable[[int], list[list[int]]],
    evaluate: Callable[[], float],
    epochs: int,
    patience: int,
    lr: float,
    weight_decay: float = 0.0,
    clip: float = 5.0,
    progress: bool | None = None,
    desc: str = "train",
    order_rng: random.Random | None = None,
    checkpointing: Checkpointing | None = None,
) -> FitResult:
    """Adam, gradient clipping, early stopping on ``evaluate()`` (higher is better); the best
    weights are restored into ``model`` before returning.

    ``make_batches(epoch)`` draws the epoch's batch order from ``order_rng`` (its state is
    part of a checkpoint; None: from no generator). ``checkpointing``: write a resumable
    checkpoint at each epoch end, every ``checkpointing.every`` steps and when interrupted,
    and continue from ``checkpointing.resume``: the result is bit-identical to an
    uninterrupted run's.

    ``progress``: the per-epoch bar on stderr; None (``--progress``/``--no-progress`` not
    given) shows it only when stderr is a terminal. Each epoch's line is written once: under
    the bar when there is one, else logged at INFO (the training commands log to stderr)."""
    order_rng = order_rng or random.Random(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_epoch, best_state, bad = -1.0, 0, None, 0
    history: list[dict[str, float]] = []
    at = _Position(1, 0, order_rng.getstate())
    earlier = 0.0
    ck = checkpointing
    if ck is not None and ck.resume is not None:
        s = ck.resume["loop"]
        model.load_state_dict(s["model"])
        opt.load_state_dict(s["optimizer"])
        best, best_epoch, best_state, bad = s["best"], s["best_epoch"], s["best_state"], s["bad"]
        history, earlier = s["history"], s["seconds"]
        at = _Position(**s["position"])
        restore_rng(ck.resume["rng"])
    start = time.perf_counter()

    def save() -> None:
        assert ck is not None
        ck.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "best": best,
                "best_epoch": best_epoch,
                "best_state": best_state,
                "bad": bad,
                "history": history,
                "seconds": earlier + time.perf_counter() - start,
                "position": asdict(at),
            },
            step=at.step,
            epoch=at.epoch,
        )

    guard = StepGuard()
    with guard, guard.saving_on_interrupt(save if ck is not None else None):
        while not at.finished and at.epoch <= epochs:
            epoch = at.epoch
            model.train()
            restore_random(order_rng, at.order_rng)
            batches = make_batches(epoch)
            bar = tqdm(
                batches[at.batch :],
                desc=f"{desc} epoch {epoch}/{epochs}",
                disable=bar_disable(progress),
                leave=False,
                initial=at.batch,
                total=len(batches),
            )
            shown = not bar.disable  # close() sets disable: read it now
            for batch in bar:
                with guard.step():
                    opt.zero_grad()
                    loss = train_step(batch)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                    opt.step()
                    at = replace(at, batch=at.batch + 1, step=at.step + 1,
                                 loss_sum=at.loss_sum + float(loss.detach()))  # fmt: skip
                if at.batch % 20 == 0:
                    bar.set_postfix(loss=f"{at.loss_sum / at.batch:.4f}")
                if ck is not None and ck.due(at.step):
                    with guard.step():
                        save()
            bar.close()
            model.eval()
            with torch.no_grad():
                score = evaluate()
            with guard.step():  # the epoch's bookkeeping, whole or not at all
                mean = at.loss_sum / max(at.batch, 1)
                history = [*history, {"epoch": epoch, "loss": mean, "dev": score}]
                if score > best:
                    best, best_epoch, bad = score, epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad += 1
                at = _Position(epoch + 1, 0, order_rng.getstate(), step=at.step,
                               finished=bad >= patience or epoch >= epochs)  # fmt: skip
                msg = f"{desc} epoch {epoch}: loss {mean:.4f} dev {score:.4f}"
                if not shown:
                    log.info(msg)  # the training commands log to stderr
                else:  # under the bar (stderr: stdout holds only the JSON report), once
                    tqdm.write(msg, file=sys.stderr)
                    log.debug(msg)
                if ck is not None:
                    save()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    seconds = earlier + time.perf_counter() - start
    return FitResult(best, best_epoch, len(history), seconds, history, earlier)
