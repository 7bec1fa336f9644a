"""Are /v1/detect/explain's SHAP values right? Additivity, deletion faithfulness, determinism.

On real HC3 answers (``--data``, human and ChatGPT alternately, a fixed sample), against the
committed detector served in-process (the app driven through httpx's ASGI transport: no
port, the explanation cache off, the model's default CPU variant unless ``--variant``):

* **additivity**: ``|base_value + sum(values) - output|`` per text (SHAP's local accuracy);
* **prediction**: ``output`` and ``label`` against ``/v1/detect`` for the same text;
* **offsets**: every ``text[start:end] == token``;
* **determinism**: the same request explained twice (cache off): largest value difference;
* **deletion**: the k tokens with the largest values hidden the way SHAP hides them (its
  own Text masker, the served mask token), scored by ``/v1/detect``, against k random
  tokens (``--random-draws`` draws); the curve is the machine probability at k = 0, 5%,
  10%, 20%, 30%, 50% of the tokens, its AUC the trapezoid over that fraction axis,
  normalised by 0.5 (lower = the score falls faster = more faithful).

    python bench/explain_faithfulness.py --texts 60 --max-evals 300 --out /tmp/faith.json

Prints a summary and writes the per-text rows and the summary as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


def hc3_texts(data: Path, n: int, seed: int, min_words: int) -> list[dict[str, str]]:
    """``n`` answers from the English HC3 files, human and ChatGPT alternately."""
    pools: dict[str, list[tuple[str, str]]] = {"human": [], "machine": []}
    for path in sorted((data / "hc3" / "en").glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                for source, key in (("human", "human_answers"), ("machine", "chatgpt_answers")):
                    for ans in row.get(key) or []:
                        if ans and len(ans.split()) >= min_words:
                            pools[source].append((path.name, ans.strip()))
    rng = random.Random(seed)
    picked = {k: rng.sample(v, (n + 1) // 2) for k, v in pools.items()}
    out = []
    for i in range(n):
        source = ("human", "machine")[i % 2]
        name, text = picked[source][i // 2]
        out.append({"source": source, "file": name, "text": text})
    return out


def masking_check(tokenizer_file: Path, texts: list[dict[str, str]], max_tokens: int) -> dict:
    """Hide each token alone the way SHAP does (the served masker, as text) and re-encode:
    how often is the result the text's ids with just that one replaced by the mask id?
    (A hidden word piece re-tokenizes the rest of its word.) No model runs."""
    import shap

    from service.explain.segmenters import WordPieceSegmenter, cut_to_tokens
    from service.preprocess.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_file)
    seg = WordPieceSegmenter(tok)
    masker = shap.maskers.Text(seg, mask_token=seg.mask_token + " ", collapse_mask_token=False)
    mask_id = tok.token_to_id(seg.mask_token)
    hides = exact = longer = texts_changed = skipped = 0
    for item in texts:
        text, _ = cut_to_tokens(item["text"], seg.offsets(item["text"]), max_tokens)
        ids = tok.encode(text, add_special_tokens=False).ids
        n = len(seg(text)["input_ids"])
        if n != len(ids):  # characters split into several tokens: features are not tokens
            skipped += 1
            continue
        changed = False
        for i in range(n):
            keep = np.ones(n, dtype=bool)
            keep[i] = False
            got = tok.encode(str(masker(keep, text)[0][0]), add_special_tokens=False).ids
            hides += 1
            exact += got == ids[:i] + [mask_id] + ids[i + 1 :]
            longer += len(got) > n
            changed |= got != ids[:i] + [mask_id] + ids[i + 1 :]
        texts_changed += changed
    return {
        "single_token_hides": hides,
        "exact": exact,
        "exact_fraction": exact / hides if hides else None,
        "longer": longer,
        "texts_with_a_changed_neighbour": texts_changed,
        "texts_skipped": skipped,
    }


def auc(curve: list[float]) -> float:
    x = np.asarray(FRACTIONS)
    y = np.asarray(curve)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import shap

    from service.api.app import create_app
    from service.explain.segmenters import WordPieceSegmenter
    from service.preprocess.tokenizer import load_tokenizer
    from tests.service_support import make_settings

    settings = make_settings(
        args.models,
        explain_cache_size=0,
        default_deadline_ms=300_000,
        explain_max_evals_limit=max(1000, args.max_evals),
        variant=args.variant,
        intra_op_threads=args.threads,
    )
    app = create_app(settings)
    texts = hc3_texts(args.data, args.texts, args.seed, args.min_words)
    rng = np.random.default_rng(args.seed)
    rows = []
    async with app.router.lifespan_context(app):
        task = app.state.service.tasks[args.model]
        seg = WordPieceSegmenter(
            load_tokenizer(task.entry.path / task.manifest.preprocessing.tokenizer_file)
        )
        masker = shap.maskers.Text(seg, mask_token=seg.mask_token + " ", collapse_mask_token=False)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://x", timeout=600) as c:

            async def machine_p(text: str) -> float:
                r = await c.post(f"/v1/detect?model={args.model}", json={"text": text})
                r.raise_for_status()
                return float(r.json()["machine_probability"])

            for i, item in enumerate(texts):
                text = item["text"]
                pred = (await c.post(f"/v1/detect?model={args.model}", json={"text": text})).json()
                body = {"text": text, "max_evals": args.max_evals}
                t0 = time.perf_counter()
                r1 = await c.post(f"/v1/detect/explain?model={args.model}", json=body)
                secs = time.perf_counter() - t0
                r2 = await c.post(f"/v1/detect/explain?model={args.model}", json=body)
                row: dict[str, Any] = {**item, "status": r1.status_code}
                if r1.status_code != 200 or r2.status_code != 200:
                    row["error"] = r1.text[:300]
                    rows.append(row)
                    print(f"{i:3d} {item['source']:7s} explain {r1.status_code}: {r1.text[:120]}")
                    continue
                e1, e2 = r1.json(), r2.json()
                values = np.asarray(e1["values"])
                n = len(values)
                explained = text[: e1["offsets"][-1][1]] if e1["truncated"] else text
                curve_top, curve_rand = [], []
                for frac in FRACTIONS:
                    k = round(frac * n)
                    if k == 0:  # the text as explained, hidden nothing
                        curve_top.append(await machine_p(explained))
                        curve_rand.append(curve_top[-1])
                        continue
                    keep = np.ones(n, dtype=bool)
                    keep[np.argsort(-values, kind="stable")[:k]] = False
                    curve_top.append(await machine_p(str(masker(keep, explained)[0][0])))
                    draws = []
                    for _ in range(args.random_draws):
                        keep = np.ones(n, dtype=bool)
                        keep[rng.choice(n, size=k, replace=False)] = False
                        draws.append(await machine_p(str(masker(keep, explained)[0][0])))
                    curve_rand.append(float(np.mean(draws)))
                row.update(
                    tokens=n,
                    truncated=e1["truncated"],
                    seconds=round(secs, 2),
                    evals=e1["evals"],
                    output=e1["output"],
                    base_value=e1["base_value"],
                    predicted=pred["machine_probability"],
                    label=e1["label"],
                    predicted_label=pred["label"],
                    additivity_error=abs(e1["base_value"] + float(values.sum()) - e1["output"]),
                    output_vs_predict=abs(e1["output"] - pred["machine_probability"]),
                    offsets_ok=all(
                        text[s:e] == t
                        for t, (s, e) in zip(e1["tokens"], e1["offsets"], strict=True)
                    ),
                    rerun_max_diff=float(np.max(np.abs(values - np.asarray(e2["values"]))))
                    if len(e2["values"]) == n
                    else float("inf"),
                    rerun_output_diff=abs(e1["output"] - e2["output"]),
                    curve_top=curve_top,
                    curve_random=curve_rand,
                    auc_top=auc(curve_top),
                    auc_random=auc(curve_rand),
                )
                rows.append(row)
                print(
                    f"{i:3d} {item['source']:7s} n={n:3d} p={pred['machine_probability']:.3f} "
                    f"add={row['additivity_error']:.1e} vs_pred={row['output_vs_predict']:.1e} "
                    f"rerun={row['rerun_max_diff']:.1e} auc top/rand={row['auc_top']:.3f}/"
                    f"{row['auc_random']:.3f} {secs:.1f}s",
                    flush=True,
                )
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return {"settings": options, "summary": summarise(rows), "rows": rows}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r.get("status") == 200]
    if not ok:
        return {"explained": 0, "failed": len(rows)}

    def stats(key: str, subset: list[dict[str, Any]]) -> dict[str, float]:
        xs = [r[key] for r in subset]
        return {"max": max(xs), "mean": statistics.fmean(xs)} if xs else {}

    def deletion(subset: list[dict[str, Any]]) -> dict[str, Any]:
        if not subset:
            return {}
        top = np.array([r["curve_top"] for r in subset])
        rnd = np.array([r["curve_random"] for r in subset])
        return {
            "texts": len(subset),
            "auc_top_mean": float(np.mean([r["auc_top"] for r in subset])),
            "auc_random_mean": float(np.mean([r["auc_random"] for r in subset])),
            "top_below_random": sum(r["auc_top"] < r["auc_random"] for r in subset),
            "curve_top_mean": [round(float(v), 4) for v in top.mean(axis=0)],
            "curve_random_mean": [round(float(v), 4) for v in rnd.mean(axis=0)],
        }

    machine = [r for r in ok if r["predicted_label"] == "machine"]
    return {
        "explained": len(ok),
        "failed": len(rows) - len(ok),
        "truncated": sum(r["truncated"] for r in ok),
        "tokens_mean": statistics.fmean(r["tokens"] for r in ok),
        "seconds_median": statistics.median(r["seconds"] for r in ok),
        "additivity_error": stats("additivity_error", ok),
        "output_vs_predict": stats("output_vs_predict", ok),
        "label_disagreements": sum(r["label"] != r["predicted_label"] for r in ok),
        "offsets_wrong": sum(not r["offsets_ok"] for r in ok),
        "rerun_max_diff": stats("rerun_max_diff", ok),
        "rerun_identical": sum(r["rerun_max_diff"] == 0.0 for r in ok),
        "fractions": list(FRACTIONS),
        "deletion_all": deletion(ok),
        "deletion_predicted_machine": deletion(machine),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--models", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="detector-en")
    p.add_argument("--variant", default=None, help="model variant (default: the CPU default)")
    p.add_argument("--texts", type=int, default=60)
    p.add_argument("--min-words", type=int, default=20)
    p.add_argument("--max-evals", type=int, default=300)
    p.add_argument("--random-draws", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--masking-only", action="store_true", help="only the masking check (no model)")
    args = p.parse_args()
    if args.masking_only:
        from service.repository import discover_models

        entry = next(e for e in discover_models(args.models) if e.manifest.name == args.model)
        texts = hc3_texts(args.data, args.texts, args.seed, args.min_words)
        print(json.dumps(masking_check(
            entry.path / entry.manifest.preprocessing.tokenizer_file, texts,
            entry.manifest.max_length - 2,  # [CLS] and [SEP]
        ), indent=2))  # fmt: skip
        return
    result = asyncio.run(run(args))
    print(json.dumps(result["summary"], indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
