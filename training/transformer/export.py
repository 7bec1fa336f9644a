"""ONNX export of BERT-family heads, ORT parity, int8 (dynamic) and fp16 variants.

Exporter: ``torch.onnx.export(dynamo=False, opset_version=17)`` (TorchScript tracing). It
exports every BERT-family ``AutoModelFor*`` of transformers 5 cleanly with dynamic batch and
sequence axes, needs no extra package (Optimum is not installed here and pins transformers),
and its graph is what ``onnxruntime.transformers``' BERT fusions and ``quantize_dynamic``
expect. The model is traced from a *padded* example (one row shorter than the other) with
eager attention, so the attention mask stays a live input of the graph.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUT_NAMES = {"qa": ["start_logits", "end_logits"], "detect": ["logits"]}


@dataclass
class Exported:
    """What the export of a version folder gives its manifest: the ``variants`` entries,
    the fp32 file's test ``metrics`` (empty without test data), the ORT-vs-PyTorch
    ``parity`` and a sentence on the fp16 variant for the description."""

    variants: dict[str, dict[str, Any]]
    metrics: dict[str, float]
    parity: float
    fp16_note: str


def model_input_names(model) -> list[str]:
    """The INPUT_NAMES ``model.forward`` takes: all three for BERT, no ``token_type_ids`` for
    DistilBERT (which has no segment embeddings) nor for a model with one segment embedding
    (RoBERTa, XLM-R: ``type_vocab_size`` 1, where a type id of 1 indexes past the table and
    its tokenizer gives none). The ONNX graph and the manifest declare these, and the
    service feeds only what the manifest declares."""
    import inspect

    params = inspect.signature(model.forward).parameters
    segments = getattr(model.config, "type_vocab_size", 2)
    return [
        n
        for n in INPUT_NAMES
        if n == "input_ids" or (n in params and (n != "token_type_ids" or segments > 1))
    ]


def select_inputs(batch: dict[str, Any], names) -> dict[str, Any]:
    """``batch`` (the encoders' three arrays) cut to the inputs ``names`` lists."""
    return {k: v for k, v in batch.items() if k in names}


def onnx_feeds(sess, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``batch`` cut to the inputs the ONNX graph of ``sess`` declares."""
    return select_inputs(batch, {i.name for i in sess.get_inputs()})


def _wrap(model, task: str, names: list[str]):
    import torch

    class _Heads(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            out = self.inner(**dict(zip(names, args, strict=True)))
            if task == "qa":
                return out.start_logits, out.end_logits
            return out.logits

    return _Heads(model).eval()


def example_batch(vocab_size: int, length: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Two rows, the second padded: keeps the attention mask live in the traced graph."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, max(vocab_size, 6), size=(2, length), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, length // 2 :] = 0
    ids[1, length // 2 :] = 0
    types = np.zeros_like(ids)
    types[:, length // 4 :] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def export_onnx(model, path: Path, task: str, example: dict[str, np.ndarray]) -> Path:
    """Export ``model`` (an ``AutoModelFor...``) to ``path`` with the inputs its forward
    takes (:func:`model_input_names`); returns the path."""
    import torch

    model = model.to("cpu").eval()
    names = model_input_names(model)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    wrapped = _wrap(model, task, names)
    outputs = OUTPUT_NAMES[task]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    for n in outputs:
        axes[n] = {0: "batch", 1: "sequence"} if task == "qa" else {0: "batch"}
    args = tuple(torch.from_numpy(example[n]) for n in names)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer chatter about Python-side shape checks in transformers' mask utilities and
        # the legacy-exporter deprecation notice; parity is verified after export instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            args,
            str(path),
            input_names=names,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )
    model.set_attn_implementation(previous)
    model.eval()  # export restores the wrapper's (train) mode on the children
    return path


def torch_outputs(model, batch: dict[str, np.ndarray], task: str) -> list[np.ndarray]:
    import torch

    model = model.to("cpu").eval()
    feeds = select_inputs(batch, model_input_names(model))
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    if task == "qa":
        return [out.start_logits.numpy(), out.end_logits.numpy()]
    return [out.logits.numpy()]


def ort_session(path: Path | str, providers: list[str] | None = None, threads: int | None = None):
    """A CPU session; ``threads`` defaults to torch's intra-op thread count (``--threads``)
    when torch is loaded, else ORT's default."""
    import sys

    import onnxruntime as ort

    if threads is None:
        torch = sys.modules.get("torch")
        threads = torch.get_num_threads() if torch is not None else 0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def parity(model, onnx_path: Path, batch: dict[str, np.ndarray], task: str) -> float:
    """Max |ORT - PyTorch| over the non-padded positions of ``batch``."""
    sess = ort_session(onnx_path)
    got = sess.run(OUTPUT_NAMES[task], onnx_feeds(sess, batch))
    want = torch_outputs(model, batch, task)
    diffs = []
    for g, w in zip(got, want, strict=True):
        d = np.abs(g - w)
        if task == "qa":
            d = d[batch["attention_mask"] == 1]
        diffs.append(float(d.max()))
    return max(diffs)


# fp32 ORT against fp32 PyTorch on the same weights: measured 1e-7 to 1e-6 (logits); 1e-3
# leaves room for kernel differences and fails on a wrong graph (or a NaN model).
PARITY_TOLERANCE = 1e-3


def check_parity(model, onnx_path: Path, batch: dict[str, np.ndarray], task: str) -> float:
    """:func:`parity`, refusing the export (TrainingError) past PARITY_TOLERANCE or on NaN."""
    from training.data.common import TrainingError

    diff = parity(model, onnx_path, batch, task)
    log.info("ORT vs PyTorch max |diff| = %.2e", diff)
    if not diff <= PARITY_TOLERANCE:  # NaN fails too
        raise TrainingError(
            f"the ONNX export does not match PyTorch: max |diff| {diff:.2e} over the "
            f"tolerance {PARITY_TOLERANCE:.0e}"
            + (" (the model's outputs are NaN: training diverged)" if diff != diff else "")
        )
    return diff


def quantize_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantisation (weights int8, activations quantised at run time).

    Per-channel weight scales: with one scale per tensor, qa-zh/1 (6 layers, hidden 384) lost
    2.3 F1 on CMRC dev (48.10 -> 45.78), per channel 0.35 (47.75), at the same speed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    return dst


def convert_fp16(src: Path, dst: Path, num_heads: int, hidden_size: int) -> tuple[Path, bool]:
    """fp16 graph for CUDA, fp32 inputs/outputs kept (``keep_io_types=True``).

    The BERT fusions of ``onnxruntime.transformers`` (fused attention, LayerNorm, GELU) are
    applied first for the GPU; when they fail the plain graph is converted. Returns the path
    and whether the fused path was used.
    """
    import onnx

    try:
        from onnxruntime.transformers.optimizer import optimize_model

        opt = optimize_model(
            str(src),
            model_type="bert",
            num_heads=num_heads,
            hidden_size=hidden_size,
            opt_level=0,
            use_gpu=True,
        )
        opt.convert_float_to_float16(keep_io_types=True)
        opt.save_model_to_file(str(dst))
        return dst, True
    except Exception as e:  # pragma: no cover - depends on the ORT build
        log.warning("BERT fusion for fp16 failed (%s); converting the plain graph", e)
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(model, str(dst))
        return dst, False


def fp16_eval_providers() -> list[str]:
    """Where the fp16 variant's metrics are measured: CUDA (the variant's target) when this
    onnxruntime has it, else the CPU provider, which also runs the fp16 graph (weights and
    activations stored in fp16; some kernels accumulate in fp32, so the drop it measures can
    be slightly smaller than on a GPU)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def fp16_variant(
    src: Path,
    out_dir: Path,
    config,
    evaluate,
    reference: dict[str, float],
    drop_keys: tuple[str, ...],
) -> tuple[dict[str, Any], str]:
    """Write ``model.fp16.onnx`` next to ``src``, measure it with ``evaluate(path, providers)``
    and report each ``drop_keys`` metric's drop from ``reference`` (the fp32 figures).
    Returns the variant's manifest entry and a sentence for the model description."""
    dst, fused = convert_fp16(
        src, out_dir / "model.fp16.onnx", config.num_attention_heads, config.hidden_size
    )
    providers = fp16_eval_providers()
    metrics = dict(evaluate(dst, providers))
    if reference and metrics:
        for key in drop_keys:
            metrics[f"{key}_drop"] = reference[key] - metrics[key]
    entry: dict[str, Any] = {
        "file": dst.name,
        "precision": "fp16",
        "providers": ["CUDAExecutionProvider"],
        "metrics": metrics,
        "measured_with": providers[0],
    }
    drops = ", ".join(
        f"{k} drop {metrics[f'{k}_drop']:+.4f}" for k in drop_keys if f"{k}_drop" in metrics
    )
    note = (
        f" fp16 variant ({'BERT-fused, ' if fused else ''}keep_io_types) for CUDA; measured with "
        f"{providers[0]}: {drops or 'no test data'}."
    )
    return entry, note


def tensor_specs(
    task: str, num_labels: int = 2, input_names: list[str] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    names = INPUT_NAMES if input_names is None else input_names
    inputs = [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in names]
    outputs: list[dict[str, Any]]
    if task == "qa":
        outputs = [
            {"name": n, "dtype": "float32", "shape": ["batch", "sequence"]}
            for n in OUTPUT_NAMES["qa"]
        ]
    else:
        outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", num_labels]}]
    return inputs, outputs
