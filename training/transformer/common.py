"""Shared pieces of the transformer trainers: seeding, devices, base-model loading, the
training loop (AdamW + linear warmup/decay + clipping + AMP + best-dev checkpoint), length
buckets and the repository-entry writer."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.data.common import DataError, TrainingError

if TYPE_CHECKING:  # for annotations: the functions import numpy where they use it
    import numpy as np

    from training.checkpoint import Checkpointing

log = logging.getLogger("nlpserve.transformer")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    return device


def setup_logging(log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    # INFO from this project only: ONNX Runtime's quantizer logs dozens of "Quantization
    # parameters ..." lines at INFO on the root logger.
    for name in ("nlpserve", "training", "service"):
        logging.getLogger(name).setLevel(logging.INFO)


class BaseModelError(DataError):
    """A --base-model (or --init-from) that is neither a usable local folder nor a checkpoint
    the Hugging Face cache holds; the message says which and what to do."""


_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_base_model(base_model: str, *, weights: bool = True, what: str = "base model") -> None:
    """Fail before any data is read when ``base_model`` cannot load: a local folder must hold
    config.json, a tokenizer and (unless ``weights`` is False) weights; a hub id must be in
    the local cache, or reachable when HF_HUB_OFFLINE=0. ``what``: how the messages name it
    (``import`` says "checkpoint")."""
    path = Path(base_model).expanduser()
    looks_local = base_model.startswith(("/", ".", "~")) or base_model.count("/") > 1
    if path.exists() or looks_local:
        if not path.is_dir():
            problem = "is a file" if path.exists() else "no such folder"
            raise BaseModelError(
                f"{what} {base_model}: {problem}; expected a Hugging Face model folder"
            )
        needed = [("config.json",), _TOKENIZER_FILES] + ([_WEIGHT_FILES] if weights else [])
        missing = [names for names in needed if not any((path / n).is_file() for n in names)]
        if missing:
            lacks = "; ".join(" or ".join(names) for names in missing)
            raise BaseModelError(
                f"{what} {base_model}: not a Hugging Face model folder (no {lacks}); "
                "save one with save_pretrained() of the model and its tokenizer"
            )
        _check_base_tokenizer(base_model, what)
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(base_model)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "false", "False", "")
        how = (
            "it is not in the local Hugging Face cache and nlpserve loads nothing from the hub "
            "unless HF_HUB_OFFLINE=0; pass a local folder (save_pretrained / "
            "huggingface-cli download on a machine with network)"
            if offline
            else str(e).splitlines()[0]
        )
        raise BaseModelError(f"{what} {base_model}: {how}") from e
    _check_base_tokenizer(base_model, what)


def _check_base_tokenizer(base_model: str, what: str) -> None:
    """The checkpoint's tokenizer loads as a fast tokenizer and fits its embedding table."""
    from transformers import AutoConfig

    try:
        vocab_size = AutoConfig.from_pretrained(base_model).vocab_size
        _, backend = load_fast_tokenizer(base_model)
    except (OSError, ValueError, TypeError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BaseModelError(f"{what} {base_model}: cannot load its tokenizer: {why}") from e
    check_tokenizer_fits(backend, vocab_size, base_model, what)


# Real checkpoints match config.vocab_size within a few padding rows; a tokenizer this far
# under it lost its vocabulary (a folder with tokenizer_config.json but no vocab.txt or
# tokenizer.json loads with the 5 special tokens only, and every word becomes [UNK]).
MIN_VOCAB_FRACTION = 0.1
# Over this share of [UNK] among the training texts' (non-special) tokens, the tokenizer does
# not cover the data (another language's vocabulary, or none).
MAX_UNKNOWN_RATE = 0.5


def check_tokenizer_fits(
    tokenizer, vocab_size: int | None, base_model: str, what: str = "base model"
) -> None:
    """Refuse a ``tokenizers.Tokenizer`` that does not fit a model of ``vocab_size`` embedding
    rows (config.json ``vocab_size``): ids past the table (an ``IndexError`` mid-training), or
    a vocabulary missing (far fewer tokens than rows)."""
    if not vocab_size:
        return
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    top = max(vocab.values(), default=-1)
    if top >= vocab_size:
        raise BaseModelError(
            f"{what} {base_model}: the tokenizer has token ids up to {top} but the model's "
            f"embedding table has {vocab_size} rows (config.json vocab_size): the tokenizer is "
            "not this checkpoint's"
        )
    if len(vocab) < MIN_VOCAB_FRACTION * vocab_size:
        raise BaseModelError(
            f"{what} {base_model}: the tokenizer has {len(vocab)} tokens for an embedding "
            f"table of {vocab_size} (config.json vocab_size): its vocabulary is missing "
            "(vocab.txt or tokenizer.json), every word would be [UNK]"
        )


def check_unknown_rate(
    tokenizer, id_rows: Iterable[Sequence[int] | np.ndarray], base_model: str
) -> float:
    """Share of [UNK] among the non-special token ids of ``id_rows`` (the encoded training
    texts); refuses (BaseModelError) over MAX_UNKNOWN_RATE. Returns the share."""
    import numpy as np

    unk_token = getattr(tokenizer.model, "unk_token", None)
    unk = tokenizer.token_to_id(unk_token) if unk_token else None
    if unk is None:
        return 0.0
    special = [i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special]
    special = [i for i in special if i != unk]
    n_unk = n_all = 0
    for row in id_rows:
        ids = np.asarray(row)
        ids = ids[~np.isin(ids, special)]
        n_unk += int((ids == unk).sum())
        n_all += ids.size
    rate = n_unk / n_all if n_all else 0.0
    if rate > MAX_UNKNOWN_RATE:
        raise BaseModelError(
            f"base model {base_model}: {100 * rate:.0f}% of the training texts' tokens are "
            f"{unk_token} (the tokenizer has {tokenizer.get_vocab_size()} tokens): its "
            "vocabulary does not cover this data"
        )
    return rate


def load_head_model(auto_cls, base_model: str, num_labels: int, **kwargs):
    """``auto_cls.from_pretrained(base_model)`` with a ``num_labels``-output head. A head the
    checkpoint already carries with another shape (a 3-class classifier, say) is replaced by
    a fresh one, and the log says so."""
    from transformers import AutoConfig

    before = AutoConfig.from_pretrained(str(base_model))
    model, info = auto_cls.from_pretrained(
        str(base_model),
        num_labels=num_labels,
        ignore_mismatched_sizes=True,
        output_loading_info=True,
        **kwargs,
    )
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        names = sorted({m[0] if isinstance(m, (tuple, list)) else str(m) for m in mismatched})
        log.warning(
            "base model %s: its head has another shape (%s); replaced with a new %d-output "
            "head", base_model, ", ".join(names), num_labels,
        )  # fmt: skip
    elif before.num_labels != num_labels:
        log.warning(
            "base model %s: its config has %d labels (%s); the %s head is new, with %d outputs",
            base_model, before.num_labels, ", ".join(before.architectures or []) or "no head",
            type(model).__name__, num_labels,
        )  # fmt: skip
    return model


def load_fast_tokenizer(base_model: str | Path):
    """``AutoTokenizer`` (fast) of a hub id or local folder, and its ``tokenizers.Tokenizer``
    with padding/truncation off (the service encoders pad and cut themselves)."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(base_model))
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{base_model}: no fast (tokenizers) tokenizer; tokenizer.json needed")
    backend.no_padding()
    backend.no_truncation()
    return hf_tok, backend


def lowercases(tokenizer) -> bool:
    """Whether a ``tokenizers.Tokenizer`` lowercases text (the manifest's ``lowercase``): a
    ``BertNormalizer(lowercase=True)`` or a ``Lowercase`` step (ALBERT's), not RoBERTa's."""
    norm = str(tokenizer.normalizer)
    return "lowercase=True" in norm or "Lowercase()" in norm


def save_tokenizer_json(backend, folder: Path) -> Path:
    backend.no_padding()
    backend.no_truncation()
    path = folder / "tokenizer.json"
    backend.save(str(path))
    return path


# --------------------------------------------------------------------------- batching
def length_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    shuffle: bool,
    rng: random.Random | None = None,
    pool: int = 50,
) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding).

    Shuffled: random pools of ``pool * batch_size`` items are sorted by length, cut into
    batches, and the batches are shuffled. Not shuffled: sorted by length.
    """
    idx = list(range(len(lengths)))
    if not shuffle:
        idx.sort(key=lambda i: lengths[i])
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    rng = rng or random.Random(0)
    rng.shuffle(idx)
    batches: list[list[int]] = []
    span = pool * batch_size
    for p in range(0, len(idx), span):
        chunk = sorted(idx[p : p + span], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def buckets_from_lengths(lengths: Iterable[int], max_length: int) -> list[int]:
    """Bucket edges from the training token-length quantiles (10/25/50/75/90%, rounded up to
    a multiple of 8); the last edge is ``max_length`` (``training.repository.bucket_edges``).
    Lower quantiles than the LSTM models use: many texts/windows are cut at max_length."""
    from training.repository import bucket_edges

    return bucket_edges(lengths, max_length, BUCKET_QUANTILES)


BUCKET_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


# --------------------------------------------------------------------------- training loop
@dataclass
class FitConfig:
    epochs: float = 2.0
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    eval_every: int | None = None  # steps; default: once per epoch
    max_minutes: float | None = None  # safety stop (the schedule still follows max_steps)
    # Fit the LR schedule to a wall-clock budget (a GPU run whose speed is not known in
    # advance): see StepBudget. The step count never exceeds max_steps / epochs.
    time_budget_minutes: float | None = None
    device: str = "cpu"
    amp: bool = True  # autocast: bf16 (fp16 where unsupported) on CUDA, bf16 on bf16 CPUs
    log_every: int = 50


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run in hardware (measured on a 2-core AMD EPYC with
    AVX512-BF16: a 6-layer, hidden-384 BERT QA step of 16x256 took 1.9 s instead of 4.0 s on
    one thread). Elsewhere oneDNN emulates bf16, which is slower than fp32."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def autocast_settings(device: str, amp: bool):
    """(device type, dtype, enabled) for ``torch.autocast`` in training."""
    import torch

    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return "cuda", dtype, amp
    return "cpu", torch.bfloat16, amp and cpu_has_native_bf16()


BUDGET_PROBE_STEPS = 30  # steps timed before a time budget sets the schedule's length


def steps_within_budget(
    done: int, elapsed_s: float, probe_s: float, probe_steps: int, budget_s: float
) -> int:
    """Total steps that fit ``budget_s``: ``done`` already taken in ``elapsed_s``, the later
    ones at the pace of the last ``probe_steps`` steps (``probe_s``; the first steps pay
    one-off costs such as CUDA kernel selection)."""
    per_step = probe_s / max(probe_steps, 1)
    return done + max(0, int((budget_s - elapsed_s) / max(per_step, 1e-9)))


class StepBudget:
    """A run's step count fitted to a wall-clock budget as it goes. At step
    ``BUDGET_PROBE_STEPS`` the count is set from the pace since step ``BUDGET_PROBE_STEPS // 3``,
    then again each time the step number doubles, from the pace since the last fit (held-out
    evaluations included), between ``step + 1`` and ``planned``. Why refit: a first probe
    can be far off; on an H200 the QA twin run's probe, taken while the other run was still
    starting, was 3x pessimistic and a 3-minute budget ran for 58 s."""

    def __init__(self, planned: int, budget_s: float, t0: float) -> None:
        self.planned, self.budget_s, self.t0 = planned, budget_s, t0
        self.mark_step, self.mark_t = BUDGET_PROBE_STEPS // 3, t0
        self.next_fit = BUDGET_PROBE_STEPS

    def update(self, step: int, total: int, now: float) -> int:
        """The step count after ``step`` steps at time ``now`` (``total`` until then)."""
        if step == self.mark_step and step < self.next_fit:
            self.mark_t = now
        if step != self.next_fit:
            return total
        fits = steps_within_budget(
            step, now - self.t0, now - self.mark_t, step - self.mark_step, self.budget_s
        )
        self.mark_step, self.mark_t, self.next_fit = step, now, 2 * step
        return min(self.planned, max(fits, step + 1))


# --progress/--no-progress of the running command (None: bars on when stderr is a terminal).
# The training commands set it; every bar of the transformer trainers follows it.
PROGRESS: bool | None = None


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any):
    """A tqdm bar on stderr that follows :data:`PROGRESS` (``--progress/--no-progress``)."""
    from tqdm.auto import tqdm

    from training.options import bar_disable

    return tqdm(iterable, disable=bar_disable(PROGRESS), **kwargs)


@dataclass
class FitResult:
    best_score: float
    best_step: int
    steps: int
    seconds: float
    history: list[dict[str, float]]
    # The precision the forward passes really ran in: "bfloat16"/"float16" under autocast,
    # None for fp32. --amp alone does not say it (a CPU without native bf16 trains in fp32).
    autocast: str | None = None
    earlier_seconds: float = 0.0  # of ``seconds``, those before a resume


@dataclass
class _Position:
    """Where the loop is: ``step`` optimizer steps done, ``batch`` of them in ``epoch``;
    ``eval_due``: the evaluation after that step has not run yet; ``finished``: no step
    follows (the last one, or the --max-minutes stop)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    running: float = 0.0  # the smoothed loss in the log
    eval_due: bool = False
    finished: bool = False


def fit(
    model,
    make_batches: Callable[[int], Iterator[dict[str, Any]]],
    batches_per_epoch: int,
    evaluate: Callable[[Any], float] | None,
    cfg: FitConfig,
    checkpoint_dir: Path | None = None,
    loss_fn: Callable[[Any, dict[str, Any]], Any] | None = None,
    checkpointing: Checkpointing | None = None,
) -> FitResult:
    """Train ``model`` and keep the weights with the best ``evaluate(model)`` score.

    ``make_batches(epoch)`` yields dicts of torch tensors (model kwargs, labels included),
    the same ones for the same ``epoch``; ``loss_fn(model, batch)`` defaults to
    ``model(**batch).loss``. The best weights are saved with ``save_pretrained`` to
    ``checkpoint_dir`` (or kept in memory when it is None) and loaded back into ``model`` at
    the end. Without ``evaluate`` the last weights are kept. ``checkpointing``: write a
    resumable checkpoint every ``checkpointing.every`` steps, at each epoch end, at the end
    and when interrupted, and continue from ``checkpointing.resume``.
    """
    import torch
    from transformers import get_linear_schedule_with_warmup

    from training.checkpoint import StepGuard, restore_rng

    device = cfg.device
    model.to(device)
    if not cfg.max_steps and cfg.epochs <= 0:
        # No training (``--epochs 0``): score the model as given, e.g. one trained elsewhere.
        model.eval()
        score = float(evaluate(model)) if evaluate is not None else -math.inf
        scored = [{"step": 0, "score": score, "seconds": 0.0}] if evaluate is not None else []
        return FitResult(score, 0, 0, 0.0, scored, None)
    total = planned = cfg.max_steps or max(1, int(math.ceil(cfg.epochs * batches_per_epoch)))
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [
        {"params": [p for n, p in named if not n.endswith(no_decay)],
         "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
    ]  # fmt: skip
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    amp_device, amp_dtype, use_amp = autocast_settings(device, cfg.amp)
    if use_amp:
        log.info("mixed precision: %s autocast on %s", amp_dtype, amp_device)
    # Loss scaling only for fp16; bf16 has fp32's exponent range.
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    eval_every = cfg.eval_every or batches_per_epoch
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)

    ck = checkpointing
    # The best weights in memory too when a checkpoint must carry them.
    keep_best = checkpoint_dir is None or ck is not None
    best, best_step, best_state, saved = -math.inf, 0, None, False
    history: list[dict[str, float]] = []
    at = _Position()
    earlier = 0.0
    budget_marks: dict[str, float] | None = None
    if ck is not None and ck.resume is not None:
        s = ck.resume["loop"]
        model.load_state_dict(s["model"])
        if s["total"] != total:  # a time budget fitted the schedule to another length
            total = s["total"]
            sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
        opt.load_state_dict(s["optimizer"])
        sched.load_state_dict(s["scheduler"])
        scaler.load_state_dict(s["scaler"])
        best, best_step, best_state = s["best"], s["best_step"], s["best_state"]
        history, earlier, budget_marks = s["history"], s["seconds"], s["budget"]
        at = _Position(**s["position"])
        restore_rng(ck.resume["rng"])
        if best_state is not None and checkpoint_dir is not None:
            model.save_pretrained(str(checkpoint_dir), state_dict=best_state)
            saved = True
    t0 = time.time() - earlier  # the time before a resume counts (budget, --max-minutes)
    budget = (
        StepBudget(planned, 60 * cfg.time_budget_minutes, t0)
        if cfg.time_budget_minutes is not None
        else None
    )
    if budget is not None and budget_marks is not None:
        budget.mark_step, budget.next_fit = int(budget_marks["step"]), int(budget_marks["next"])
        budget.mark_t = t0 + budget_marks["t"]
    guard = StepGuard()

    def save() -> None:
        assert ck is not None
        marks = None
        if budget is not None:
            marks = {"step": budget.mark_step, "next": budget.next_fit, "t": budget.mark_t - t0}
        ck.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "total": total,
                "budget": marks,
                "best": best,
                "best_step": best_step,
                "best_state": best_state,
                "history": history,
                "seconds": time.time() - t0,
                "position": asdict(at),
            },
            step=at.step,
            epoch=at.epoch,
        )

    def _evaluate() -> None:
        nonlocal best, best_step, best_state, saved, at
        if evaluate is None:
            at = replace(at, eval_due=False)
            return
        model.eval()
        score = float(evaluate(model))
        model.train()
        with guard.step():  # the evaluation's bookkeeping, whole or not at all
            step = at.step
            history.append({"step": step, "score": score, "seconds": time.time() - t0})
            log.info("step %d: dev score %.4f (best %.4f)", step, score, max(best, score))
            if math.isnan(score):
                log.warning("step %d: the dev score is NaN (e.g. ROC AUC of a dev sample with "
                            "one class: raise --max-dev-examples); this checkpoint cannot be "
                            "chosen", step)  # fmt: skip
            if score > best:
                best, best_step = score, step
                if checkpoint_dir is not None:
                    model.save_pretrained(str(checkpoint_dir))
                    saved = True
                if keep_best:
                    best_state = {
                        k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                    }
            at = replace(at, eval_due=False)

    model.train()
    bar = progress_bar(total=total, initial=at.step, desc="train", mininterval=5.0)
    with guard, guard.saving_on_interrupt(save if ck is not None else None):
        if at.eval_due:  # interrupted in the evaluation after its last step
            _evaluate()
        while not at.finished:
            for batch in itertools.islice(make_batches(at.epoch), at.batch, None):
                with guard.step():
                    batch = {k: v.to(device) if hasattr(v, "to") else v
                             for k, v in batch.items()}  # fmt: skip
                    with torch.autocast(amp_device, dtype=amp_dtype, enabled=use_amp):
                        loss = loss_fn(model, batch)
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.max_grad_norm)
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
                    sched.step()
                    step = at.step + 1
                    if budget is not None:
                        fitted = budget.update(step, total, time.time())
                        if fitted != total:
                            total = fitted
                            # The same schedule shape over the new length, at this step.
                            sched = get_linear_schedule_with_warmup(
                                opt, int(cfg.warmup_ratio * total), total
                            )
                            for _ in range(step):
                                sched.step()
                            bar.total = total
                            log.info("time budget %.1f min: %d steps (fitted at step %d)",
                                     cfg.time_budget_minutes, total, step)  # fmt: skip
                    lv = float(loss.detach())
                    if not math.isfinite(lv):
                        raise TrainingError(
                            f"training diverged: the loss is {lv} at step {step}; lower "
                            "--lr (or --max-grad-norm)"
                        )
                    running = 0.98 * at.running + 0.02 * lv if step > 1 else lv
                    bar.update(1)
                    if step % cfg.log_every == 0:
                        bar.set_postfix(loss=f"{running:.4f}")
                        log.info(
                            "step %d/%d loss %.4f lr %.2e %.1fs",
                            step, total, running, sched.get_last_lr()[0], time.time() - t0,
                        )  # fmt: skip
                    timed_out = (
                        cfg.max_minutes is not None and time.time() - t0 > 60 * cfg.max_minutes
                    )
                    if timed_out:
                        log.warning("stopping at step %d: --max-minutes reached", step)
                    done = step >= total or timed_out
                    at = _Position(step, at.epoch, at.batch + 1, running,
                                   eval_due=step % eval_every == 0 or done,
                                   finished=done)  # fmt: skip
                if at.eval_due:
                    _evaluate()
                if ck is not None and (ck.due(at.step) or at.finished):
                    with guard.step():
                        save()
                if at.finished:
                    break
            else:
                if at.batch == 0:  # an empty epoch: the loop would never end
                    raise DataError("nothing to train on: the training split gave no batch")
                with guard.step():
                    at = replace(at, epoch=at.epoch + 1, batch=0)
                    if ck is not None:
                        save()
    bar.close()
    if evaluate is not None:
        if saved:  # only weights this run wrote (the folder may hold an earlier run's)
            reloaded = type(model).from_pretrained(str(checkpoint_dir))
            model.load_state_dict(reloaded.state_dict())
        elif best_state is not None:
            model.load_state_dict(best_state)
        elif history:
            log.warning("no evaluation gave a usable dev score: the last weights are kept")
    model.eval()
    autocast = str(amp_dtype).removeprefix("torch.") if use_amp else None
    return FitResult(best, best_step, at.step, time.time() - t0, history, autocast, earlier)


# --------------------------------------------------------------------------- repository entry
def write_entry(
    folder: Path,
    *,
    name: str,
    version: str,
    task: str,
    architecture: str,
    description: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    labels: list[str],
    max_length: int,
    preprocessing: dict[str, Any],
    buckets: list[int],
    variants: dict[str, dict[str, Any]],
    metrics: dict[str, float],
    split: dict[str, Any] | None,
    data: list[Any],
    command: str,
    hyperparameters: dict[str, Any],
    framework_versions: dict[str, str],
) -> Path:
    """Validate and write ``manifest.json`` (sha256 of every variant file filled in).

    ``training.repository.write_entry`` writes single-file ``words`` entries; this one writes
    the wordpiece entries with several variants into a folder the caller filled (a staging
    folder, see :func:`staging_dir`/:func:`publish`).
    """
    from service.repository.manifest import Manifest, load_manifest, write_manifest
    from training.data.checksums import sha256_file

    def finite(d: dict[str, float]) -> dict[str, float]:  # JSON has no NaN: leave them out
        return {k: float(x) for k, x in d.items() if x is not None and math.isfinite(x)}

    metrics = finite(metrics)
    for v in variants.values():
        v["sha256"] = sha256_file(folder / v["file"])
        v["metrics"] = finite(v.get("metrics", {}))
    manifest = Manifest.model_validate(
        {
            "name": name,
            "version": version,
            "task": task,
            "architecture": architecture,
            "description": description,
            "created_at": datetime.now(UTC),
            "framework_versions": framework_versions,
            "inputs": inputs,
            "outputs": outputs,
            "labels": labels,
            "max_length": max_length,
            "preprocessing": preprocessing,
            "buckets": buckets,
            "variants": variants,
            "metrics": metrics,
            "split": split,
            "data": [d.model_dump() if hasattr(d, "model_dump") else d for d in data],
            "command": command,
            "hyperparameters": hyperparameters,
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, manifest)
    load_manifest(folder)  # the same checks the service runs
    return folder / "manifest.json"


def prune_variants(folder: Path, keep: Sequence[str]) -> None:
    """Drop every variant not in ``keep`` from the manifest and delete its file (for the
    committed starter artifacts; the dropped files are reproducible with the same command)."""
    path = folder / "manifest.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    dropped = [k for k in raw["variants"] if k not in keep]
    for k in dropped:
        f = folder / raw["variants"][k]["file"]
        if f.exists():
            f.unlink()
        raw.setdefault("hyperparameters", {}).setdefault("dropped_variants", {})[k] = {
            kk: vv
            for kk, vv in raw["variants"][k].items()
            if kk in ("file", "precision", "providers", "metrics", "measured_with")
        }
        del raw["variants"][k]
    path.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    from service.repository.manifest import load_manifest

    load_manifest(folder)


def staging_path(final: Path) -> Path:
    """Where :func:`staging_dir` builds ``final``: hidden, next to the model folder."""
    final = Path(final)
    return final.parent.parent / f".{final.parent.name}-{final.name}.staging"


@contextmanager
def discard_staging_on_error(final: Path) -> Iterator[None]:
    """A run that fails or is interrupted (Ctrl-C) removes its staging folder: full-size ONNX
    files left behind, hidden, until a later run of the same version."""
    try:
        yield
    except BaseException:
        shutil.rmtree(staging_path(final), ignore_errors=True)
        raise


def fresh_checkpoint_dir(folder: Path) -> None:
    """Empty the best-checkpoint folder of an earlier run in the same work dir: :func:`fit`
    must never find (and reload) weights this run did not write."""
    if folder.exists():
        shutil.rmtree(folder)


def staging_dir(final: Path, overwrite: bool = False) -> Path:
    """A fresh hidden ``.<name>-<version>.staging`` folder next to ``final`` (discovery skips
    it); refuses to replace an existing version unless ``overwrite``."""
    from training.repository import check_new_version

    final = check_new_version(Path(final), overwrite)
    staging = staging_path(final)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, final: Path) -> Path:
    """Move a validated staging folder into place (replacing ``final`` if it exists)."""
    from training.repository import move_into_place

    return move_into_place(staging, Path(final))


def framework_versions() -> dict[str, str]:
    from importlib import metadata

    from training.repository import framework_versions as base

    out = base()
    out["transformers"] = metadata.version("transformers")
    return out
