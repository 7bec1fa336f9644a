"""MLM pretraining of a compact Chinese BERT, from a character-level vocabulary built on the
corpus (``nlpserve pretrain``). The output folder is an ordinary HF checkpoint
(``config.json``, ``model.safetensors``, tokenizer files): ``--base-model <folder>`` loads it
through ``AutoTokenizer``/``AutoModelFor...`` like any hub model.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers import decoders as tok_decoders
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer

log = logging.getLogger("nlpserve.pretrain")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_char_tokenizer(
    texts: Iterable[str], vocab_size: int = 9000, min_frequency: int = 3, limit_alphabet: int = 6000
) -> Tokenizer:
    """BERT-Chinese-style WordPiece: every CJK character is its own token (the BERT normalizer
    puts spaces around CJK characters), Latin words and numbers become word pieces. NFKC first,
    so full-width letters/digits (ＡＢＣ１２３) share the ids of their ASCII forms; offsets
    still point into the original text."""
    tok = Tokenizer(WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.BertNormalizer(
                clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=True
            ),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIALS,
        limit_alphabet=limit_alphabet,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = tok_decoders.WordPiece(prefix="##")
    return tok


def save_hf_tokenizer(tok: Tokenizer, folder: Path, model_max_length: int = 512) -> None:
    """Save as a fast HF tokenizer folder (``AutoTokenizer.from_pretrained`` loads it)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )
    hf.save_pretrained(str(folder))


def pack_sequences(
    token_lists: Iterable[Sequence[int]], max_length: int, cls_id: int, sep_id: int
) -> Iterator[tuple[list[int], list[int]]]:
    """Pack consecutive texts into ``[CLS] a [SEP] b [SEP] ...`` rows of at most
    ``max_length`` tokens (long texts are cut into pieces). Token type 1 after the first
    [SEP], so both segment embeddings are trained."""
    room = max_length - 1  # [CLS]
    buf: list[int] = []

    def emit(seq: list[int]) -> tuple[list[int], list[int]]:
        ids = [cls_id, *seq]
        first_sep = ids.index(sep_id) if sep_id in ids else len(ids)
        types = [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
        return ids, types

    for toks in token_lists:
        toks = list(toks)
        while toks:
            take = toks[: room - len(buf) - 1]
            toks = toks[len(take) :]
            buf.extend([*take, sep_id])
            if len(buf) >= room - 8:  # too little left for a useful piece
                yield emit(buf)
                buf = []
    if buf:
        yield emit(buf)


def mask_tokens(
    input_ids, special_mask, vocab_size: int, n_special: int, prob: float = 0.15, generator=None
):
    """BERT masking: ``prob`` of the non-special tokens are targets; of those 80% -> [MASK],
    10% -> a random non-special token, 10% unchanged. Returns (inputs, labels with -100)."""
    import torch

    labels = input_ids.clone()
    probs = torch.full(labels.shape, prob)
    probs.masked_fill_(special_mask, 0.0)
    targets = torch.bernoulli(probs, generator=generator).bool()
    if not targets.any():
        # No target: the loss is a mean over nothing, NaN, and its NaN gradients would poison
        # every weight. Small batches hit it; one target is drawn then.
        candidates = (~special_mask).nonzero()
        if len(candidates):
            pick = candidates[torch.randint(len(candidates), (1,), generator=generator)[0]]
            targets[tuple(pick.tolist())] = True
    labels[~targets] = -100
    inputs = input_ids.clone()
    replace = torch.bernoulli(torch.full(labels.shape, 0.8), generator=generator).bool() & targets
    inputs[replace] = MASK_ID
    rand = (
        torch.bernoulli(torch.full(labels.shape, 0.5), generator=generator).bool()
        & targets
        & ~replace
    )
    inputs[rand] = torch.randint(
        n_special, vocab_size, labels.shape, generator=generator, dtype=input_ids.dtype
    )[rand]
    return inputs, labels


MASK_ID = SPECIALS.index("[MASK]")


def transplant(source: str, vocab: dict[str, int], seed: int = 0):
    """A ``BertForMaskedLM`` over ``vocab`` whose encoder (every layer, position and segment
    embeddings, the embedding LayerNorm) is the BERT checkpoint ``source``'s.

    Why: a pretrained encoder carries over across languages when it is given new word
    embeddings (Artetxe et al., 2020, "On the cross-lingual transferability of monolingual
    representations"), and MLM steps on CPU are too few to train one from scratch. Rows of
    tokens the source's vocabulary also has (specials, Latin word pieces, digits, the few CJK
    characters an English vocab holds) are copied; the others are drawn from the source
    embeddings' per-dimension mean and spread. The MLM head starts fresh. Returns
    ``(model, {"copied_rows": n, "vocab_size": len(vocab), "source": source})``.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertForMaskedLM

    src_cfg = AutoConfig.from_pretrained(source)
    if src_cfg.model_type != "bert":
        raise ValueError(f"--init-from needs a BERT checkpoint, {source} is {src_cfg.model_type!r}")
    # fp32 whatever the checkpoint's dtype (a half-precision copy travels lighter).
    src = AutoModel.from_pretrained(source).float()
    src_vocab = AutoTokenizer.from_pretrained(source).get_vocab()
    config = BertConfig(**{**src_cfg.to_dict(), "vocab_size": len(vocab), "pad_token_id": 0})
    config.architectures = ["BertForMaskedLM"]
    model = BertForMaskedLM(config)
    # Neither the MLM nor the QA model has BERT's pooler: it is left behind.
    body = {
        k: v
        for k, v in src.state_dict().items()
        if "word_embeddings" not in k and not k.startswith("pooler.")
    }
    missing, unexpected = model.bert.load_state_dict(body, strict=False)
    if unexpected or set(missing) - {"embeddings.word_embeddings.weight"}:
        raise ValueError(f"{source}: encoder weights do not fit ({missing=}, {unexpected=})")
    old = src.get_input_embeddings().weight.detach()
    gen = torch.Generator().manual_seed(seed)
    new = old.mean(0) + old.std(0) * torch.randn(len(vocab), old.shape[1], generator=gen)
    copied = 0
    for token, i in vocab.items():
        j = src_vocab.get(token)
        if j is not None and j < old.shape[0]:
            new[i] = old[j]
            copied += 1
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.copy_(new)
    model.tie_weights()
    return model, {"source": source, "vocab_size": len(vocab), "copied_rows": copied}


@dataclass
class PretrainConfig:
    vocab_size: int = 9000
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    max_length: int = 128
    batch_size: int = 32
    lr: float = 5e-4
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_steps: int = 1000
    max_minutes: float | None = None
    time_budget_minutes: float | None = None
    mlm_probability: float = 0.15
    # An existing BERT checkpoint (hub id or folder) whose encoder starts the model; the
    # architecture fields above are then taken from it (see ``transplant``).
    init_from: str | None = None
    seed: int = 13
    device: str = "cpu"
    amp: bool = True


def pretrain(
    texts: Sequence[str], out: Path, cfg: PretrainConfig, tokenizer: Tokenizer | None = None
) -> dict:
    """Build the vocabulary (unless given), pack, and train BertForMaskedLM; save to ``out``."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from training.seeding import seed_everything
    from training.transformer.common import FitConfig, fit

    seed_everything(cfg.seed)
    t0 = time.time()
    tok = tokenizer or build_char_tokenizer(texts, vocab_size=cfg.vocab_size)
    vocab_size = tok.get_vocab_size()
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, "special tokens must come first"
    tok.no_padding()
    tok.no_truncation()
    encs = tok.encode_batch(list(texts), add_special_tokens=False)
    rows = list(pack_sequences((e.ids for e in encs), cfg.max_length, 2, 3))
    unk = sum(e.ids.count(1) for e in encs)
    total = sum(len(e.ids) for e in encs)
    log.info(
        "vocab %d, %d texts -> %d tokens (%.3f%% [UNK]) -> %d rows of <= %d in %.1fs",
        vocab_size, len(texts), total, 100.0 * unk / max(total, 1), len(rows), cfg.max_length,
        time.time() - t0,
    )  # fmt: skip

    init = None
    if cfg.init_from:
        model, init = transplant(cfg.init_from, tok.get_vocab(), cfg.seed)
        c = model.config  # the summary records the architecture the model really has
        cfg = replace(
            cfg,
            hidden_size=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            intermediate_size=c.intermediate_size,
        )
        log.info("encoder from %s (%d layers, hidden %d); %d of %d embedding rows copied",
                 cfg.init_from, cfg.num_layers, cfg.hidden_size, init["copied_rows"],
                 vocab_size)  # fmt: skip
    else:
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=512,
            type_vocab_size=2,
            pad_token_id=0,
        )
        model = BertForMaskedLM(config)
    n_special = len(SPECIALS)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch = max(1, len(rows) // cfg.batch_size)

    # All rows as one padded tensor, built once: per-batch tensor building in Python kept a
    # GPU two-thirds idle (first H200 run: 78 ms/step at 256 rows, 33% utilisation).
    lens = torch.tensor([len(r[0]) for r in rows], dtype=torch.long)
    all_ids = torch.zeros((len(rows), int(lens.max())), dtype=torch.long)
    all_types = torch.zeros_like(all_ids)
    for j, (r_ids, r_types) in enumerate(rows):
        all_ids[j, : len(r_ids)] = torch.tensor(r_ids)
        all_types[j, : len(r_ids)] = torch.tensor(r_types)

    def batches(epoch: int):
        order = list(range(len(rows)))
        rng.shuffle(order)
        for b in range(per_epoch):
            idx = torch.tensor(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
            width = int(lens[idx].max())
            ids = all_ids[idx, :width]
            types = all_types[idx, :width]
            mask = (torch.arange(width)[None, :] < lens[idx, None]).long()
            inputs, labels = mask_tokens(
                ids, ids < n_special, vocab_size, n_special, cfg.mlm_probability, gen
            )
            yield {"input_ids": inputs, "attention_mask": mask, "token_type_ids": types,
                   "labels": labels}  # fmt: skip

    def mlm_loss(m, batch):
        # The vocabulary projection only on the masked positions (~15%): ~40% faster on CPU.
        labels = batch.pop("labels")
        hidden = m.bert(**batch).last_hidden_state
        sel = labels != -100
        scores = m.cls(hidden[sel])
        return torch.nn.functional.cross_entropy(scores, labels[sel])

    fit_cfg = FitConfig(
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        max_steps=cfg.max_steps,
        max_minutes=cfg.max_minutes,
        time_budget_minutes=cfg.time_budget_minutes,
        device=cfg.device,
        amp=cfg.amp,
        log_every=25,
    )
    # --max-steps 0 with --init-from: the transplanted model as it is (no MLM steps).
    fitted = (
        fit(model, batches, per_epoch, None, fit_cfg, loss_fn=mlm_loss) if cfg.max_steps else None
    )
    steps = fitted.steps if fitted else 0

    # Sanity figure (not held out): MLM loss/accuracy on 20 freshly masked training batches.
    model.eval()
    losses, correct, count = [], 0, 0
    with torch.no_grad():
        for k, batch in enumerate(batches(-1)):
            if k >= 20:
                break
            batch = {key: v.to(cfg.device) for key, v in batch.items()}
            labels = batch.pop("labels")
            hidden = model.bert(**batch).last_hidden_state
            sel = labels != -100
            scores = model.cls(hidden[sel])
            losses.append(float(torch.nn.functional.cross_entropy(scores, labels[sel])))
            correct += int((scores.argmax(-1) == labels[sel]).sum())
            count += int(sel.sum())
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(str(out))
    save_hf_tokenizer(tok, out)
    summary = {
        "config": asdict(cfg),
        "vocab_size": vocab_size,
        "texts": len(texts),
        "tokens": total,
        "rows": len(rows),
        "steps": steps,
        "autocast": fitted.autocast if fitted else None,
        "epochs": steps / per_epoch,
        "seconds": round(time.time() - t0, 1),
        "mlm_loss": float(np.mean(losses)) if losses else float("nan"),
        "mlm_accuracy": correct / max(count, 1),
        "unk_rate": unk / max(total, 1),
        "init": init,
    }
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    log.info("pretraining done: %s", json.dumps(summary))
    return summary
