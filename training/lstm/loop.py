"""Training-loop pieces shared by the LSTM models: batching, word dropout, early stopping."""

from __future__ import annotations

import copy
import logging
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from service.preprocess.words import PAD_ID, UNK_ID
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
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


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
) -> FitResult:
    """Adam, gradient clipping, early stopping on ``evaluate()`` (higher is better); the best
    weights are restored into ``model`` before returning.

    ``progress``: the per-epoch bar on stderr; None (``--progress``/``--no-progress`` not
    given) shows it only when stderr is a terminal. Each epoch's line is written once: under
    the bar when there is one, else logged at INFO (the training commands log to stderr)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_epoch, best_state, bad = -1.0, 0, None, 0
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    epoch = 0
    for epoch in range(1, epochs + 1):
        model.train()
        batches = make_batches(epoch)
        total, n = 0.0, 0
        bar = tqdm(
            batches,
            desc=f"{desc} epoch {epoch}/{epochs}",
            disable=bar_disable(progress),
            leave=False,
        )
        shown = not bar.disable  # close() sets disable: read it now
        for batch in bar:
            opt.zero_grad()
            loss = train_step(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            total += float(loss.detach())
            n += 1
            if n % 20 == 0:
                bar.set_postfix(loss=f"{total / n:.4f}")
        model.eval()
        with torch.no_grad():
            score = evaluate()
        history.append({"epoch": epoch, "loss": total / max(n, 1), "dev": score})
        msg = f"{desc} epoch {epoch}: loss {total / max(n, 1):.4f} dev {score:.4f}"
        if not shown:
            log.info(msg)  # the training commands log to stderr
        else:  # under the bar (stderr: stdout holds only the command's JSON report), once
            tqdm.write(msg, file=sys.stderr)
            log.debug(msg)
        if score > best:
            best, best_epoch, bad = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(best, best_epoch, epoch, time.perf_counter() - start, history)
