"""ONNX export of the LSTM models and the parity checks against PyTorch.

Uses the legacy TorchScript exporter (``dynamo=False``, opset 17), which maps
``pack_padded_sequence`` + ``nn.LSTM`` to an ONNX ``LSTM`` node with ``sequence_lens``.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

OPSET = 17

# Largest |PyTorch - ONNX Runtime| difference in the logits a published LSTM may show, on the
# parity batch (up to 64 test sentences, padded together). Measured fp32 exports differ by
# 1e-6..1e-5: polarity-en/1 1.4e-6, pos-en/1 1.1e-5 (30 epochs on the PTB sample), tiny runs
# 0.7e-6..2e-6, the tests' random models < 1e-4 (their bound, tests/test_lstm_export.py).
# 1e-3 (also the transformer trainers' bound) leaves ~90x headroom over the largest of these
# for bigger configs, longer sentences and other CPUs, and changes no prediction; an export
# that mishandles lengths or padding, or drops a direction, moves logits by 0.1 or more.
PARITY_TOLERANCE = 1e-3


class ParityError(RuntimeError):
    """The exported ONNX model does not compute what the PyTorch model does."""


def check_parity(diff: float, tolerance: float = PARITY_TOLERANCE, what: str = "model") -> float:
    """``diff`` (a max |PyTorch - ORT|) if it is within ``tolerance``; else (NaN included)
    :class:`ParityError` naming both, so the model is not published."""
    if not diff <= tolerance:  # NaN fails too
        raise ParityError(
            f"{what}: ONNX Runtime and PyTorch outputs differ by max |diff| {diff:.3g} > "
            f"tolerance {tolerance:g}; the export is not published"
        )
    return diff


POS_INPUTS = ["word_ids", "char_ids", "lengths"]
POS_OUTPUTS = ["logits"]
POS_AXES = {
    "word_ids": {0: "batch", 1: "sequence"},
    "char_ids": {0: "batch", 1: "sequence", 2: "word"},
    "lengths": {0: "batch"},
    "logits": {0: "batch", 1: "sequence"},
}
POLARITY_INPUTS = ["word_ids", "lengths"]
POLARITY_OUTPUTS = ["logits"]
POLARITY_AXES = {
    "word_ids": {0: "batch", 1: "sequence"},
    "lengths": {0: "batch"},
    "logits": {0: "batch"},
}


# What torch's C++ ONNX shape inference prints, straight to file descriptor 2 (no Python
# warning a filter could catch), once per pack_padded_sequence/pad_packed_sequence node: the
# exporter has no shape rule for them. Harmless here: the LSTM node's outputs get their shapes
# from dynamic_axes, and the parity check compares the outputs themselves.
_PACKED_SHAPE_WARNING = re.compile(
    rb"Warning: The shape inference of prim::(PackPadded|PadPacked) type is missing"
)


@contextmanager
def without_packed_shape_warnings() -> Iterator[None]:
    """Drop exactly the :data:`_PACKED_SHAPE_WARNING` lines from what is written to file
    descriptor 2 inside the block; every other line written there meanwhile is written back
    when the block ends, raising or not (in order, after the block). A file, not a pipe: a
    pipe drained by a Python thread hangs when C++ code fills it while holding the GIL."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no fd 2 to redirect: print as they come
        yield
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [ln for ln in caught.read().splitlines(keepends=True)
                    if not _PACKED_SHAPE_WARNING.search(ln)]  # fmt: skip
            if kept:
                os.write(2, b"".join(kept))


def export_onnx(
    model: torch.nn.Module,
    example: Mapping[str, np.ndarray],
    path: Path | str,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
) -> Path:
    """Export ``model`` (moved to CPU, eval mode) traced on ``example`` to ``path``."""
    path = Path(path)
    model = model.cpu().eval()
    args = tuple(torch.from_numpy(np.asarray(example[n])) for n in input_names)
    with warnings.catch_warnings(), torch.no_grad(), without_packed_shape_warnings():
        # The tracer warns about pack_padded_sequence and lengths.cpu(); the ONNX LSTM
        # takes the lengths as sequence_lens, which the parity tests check.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    import onnx

    onnx.checker.check_model(str(path))
    return path


def ort_session(path: Path | str, threads: int = 1, providers: list[str] | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def torch_outputs(model: torch.nn.Module, inputs: Mapping[str, np.ndarray], names: Sequence[str]):
    model = model.cpu().eval()
    with torch.no_grad():
        out = model(*(torch.from_numpy(np.asarray(inputs[n])) for n in names))
    return out.numpy()


def max_abs_diff(
    model: torch.nn.Module,
    session,
    inputs: Mapping[str, np.ndarray],
    input_names: Sequence[str],
    mask: np.ndarray | None = None,
) -> float:
    """Largest |PyTorch - ONNX Runtime| over the output (positions where ``mask`` is true)."""
    ref = torch_outputs(model, inputs, input_names)
    got = session.run(None, {n: np.asarray(inputs[n]) for n in input_names})[0]
    if ref.shape != got.shape:
        raise AssertionError(f"output shapes differ: torch {ref.shape} vs onnx {got.shape}")
    diff = np.abs(ref - got)
    if mask is not None:
        diff = diff[mask]
    return float(diff.max()) if diff.size else 0.0


def pad_batch(
    encodings: Sequence, with_chars: bool, max_length: int | None = None
) -> dict[str, np.ndarray]:
    """Stack WordEncodings into padded ``word_ids``/``char_ids``/``lengths`` (int64)."""
    lens = [min(len(e), max_length) if max_length else len(e) for e in encodings]
    t = max(max(lens), 1)
    word_ids = np.zeros((len(encodings), t), dtype=np.int64)
    out: dict[str, np.ndarray] = {"word_ids": word_ids}
    if with_chars:
        w = encodings[0].char_ids.shape[1]
        out["char_ids"] = np.zeros((len(encodings), t, w), dtype=np.int64)
    for i, (e, n) in enumerate(zip(encodings, lens, strict=True)):
        word_ids[i, :n] = e.word_ids[:n]
        if with_chars:
            out["char_ids"][i, :n] = e.char_ids[:n]
    out["lengths"] = np.asarray(lens, dtype=np.int64)
    return out
