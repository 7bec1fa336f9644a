"""The shared training loop (training/transformer/common.py ``fit``): mixed precision."""

from __future__ import annotations

import pytest

from tests.builders_bert import _tiny_bert

pytestmark = pytest.mark.train


def _fit_recording_dtypes(amp: bool) -> tuple[set, set, list[float], str | None]:
    """Train a tiny QA BERT on one repeated batch for a few steps; return the dtypes the
    first encoder layer's dense projection produced in training, the parameter dtypes, the
    losses and the precision the run reports (``FitResult.autocast``)."""
    import torch

    from training.transformer.common import FitConfig, fit

    model = _tiny_bert(100, "qa")
    seen: set = set()
    layer = model.bert.encoder.layer[0].intermediate.dense
    handle = layer.register_forward_hook(lambda m, i, o: seen.add(o.dtype) if m.training else None)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(5, 100, (4, 16), generator=g),
        "attention_mask": torch.ones(4, 16, dtype=torch.long),
        "start_positions": torch.tensor([1, 2, 3, 4]),
        "end_positions": torch.tensor([2, 3, 4, 5]),
    }
    losses: list[float] = []

    def loss_fn(m, b):
        loss = m(**b).loss
        losses.append(float(loss.detach()))
        return loss

    cfg = FitConfig(max_steps=12, lr=1e-2, warmup_ratio=0.0, device="cpu", amp=amp, log_every=100)
    result = fit(model, lambda epoch: iter([batch] * 12), 12, None, cfg, loss_fn=loss_fn)
    handle.remove()
    return seen, {p.dtype for p in model.parameters()}, losses, result.autocast


def test_fit_without_amp_trains_in_fp32():
    import torch

    seen, params, losses, autocast = _fit_recording_dtypes(amp=False)
    assert seen == {torch.float32} and params == {torch.float32}
    assert losses[-1] < losses[0]
    assert autocast is None


def test_fit_autocasts_to_bf16_on_a_cpu_with_native_bf16():
    import torch

    from training.transformer.common import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16/AMX): autocast stays off")
    seen, params, losses, autocast = _fit_recording_dtypes(amp=True)
    assert seen == {torch.bfloat16}  # the matmuls ran in bf16 ...
    assert autocast == "bfloat16"
    assert params == {torch.float32}  # ... on fp32 master weights, so export is unchanged
    assert losses[-1] < losses[0]


def test_fit_reports_the_precision_it_really_trained_in():
    """--amp is a request: a CPU without native bf16 trains in fp32 anyway. The committed
    detector-en/1 recorded amp true yet trained in fp32 (before CPU autocast existed); the
    same command on an AVX512-BF16 CPU today trains in bf16. Manifests record what ran."""
    import torch

    seen, _, _, autocast = _fit_recording_dtypes(amp=True)
    assert len(seen) == 1
    ran = seen.pop()
    assert autocast == (None if ran == torch.float32 else str(ran).removeprefix("torch."))


def test_transformer_manifests_record_the_precision_they_trained_in(model_repo):
    from service.repository import load_manifest
    from training.transformer.common import cpu_has_native_bf16

    expected = "bfloat16" if cpu_has_native_bf16() else None  # the builders train with amp on
    for name in ("detector-en", "qa-zh"):
        if not (model_repo / name / "1").is_dir():
            pytest.skip(f"no tiny {name} (see the session's build errors)")
        hp = load_manifest(model_repo / name / "1").hyperparameters
        assert hp["steps"] > 0 and hp["amp"] is True
        assert "autocast" in hp and hp["autocast"] == expected, hp.get("autocast")


def test_fit_on_an_empty_split_is_an_error_not_an_endless_loop():
    """`train qa` on a file with no trainable question looped forever in an empty epoch."""
    from training.data.common import DataError
    from training.transformer.common import FitConfig, fit

    cfg = FitConfig(epochs=1, device="cpu", amp=False)
    with pytest.raises(DataError, match="nothing to train on"):
        fit(_tiny_bert(100, "qa"), lambda epoch: iter([]), 0, None, cfg)


def test_fit_never_reloads_a_checkpoint_it_did_not_write(tmp_path):
    """An earlier run's best checkpoint in the same work dir was reloaded, and published under
    this run's manifest, when this run saved none (a NaN dev score at every evaluation)."""
    import torch

    from training.transformer.common import FitConfig, fit

    stale = _tiny_bert(100, "qa", seed=1)
    stale.save_pretrained(str(tmp_path / "best"))
    model = _tiny_bert(100, "qa", seed=2)
    batch = {
        "input_ids": torch.randint(5, 100, (4, 16)),
        "attention_mask": torch.ones(4, 16, dtype=torch.long),
        "start_positions": torch.tensor([1, 2, 3, 4]),
        "end_positions": torch.tensor([2, 3, 4, 5]),
    }
    cfg = FitConfig(max_steps=3, lr=1e-2, warmup_ratio=0.0, device="cpu", amp=False)
    result = fit(model, lambda e: iter([batch] * 3), 3, lambda m: float("nan"), cfg,
                 tmp_path / "best")  # fmt: skip
    assert result.best_step == 0 and result.history  # never a usable score
    w = "qa_outputs.weight"
    assert not torch.equal(model.state_dict()[w], stale.state_dict()[w])


def test_a_diverged_loss_stops_training_with_a_clear_error():
    import torch

    from training.data.common import TrainingError
    from training.transformer.common import FitConfig, fit

    batch = {"input_ids": torch.randint(5, 100, (2, 8)),
             "attention_mask": torch.ones(2, 8, dtype=torch.long)}  # fmt: skip
    cfg = FitConfig(max_steps=5, device="cpu", amp=False)
    with pytest.raises(TrainingError, match="training diverged: the loss is nan at step 1"):
        fit(_tiny_bert(100, "qa"), lambda e: iter([batch] * 5), 5, None, cfg,
            loss_fn=lambda m, b: m(**b).start_logits.sum() * float("nan"))  # fmt: skip


def test_parity_refuses_a_nan_export_and_a_failed_run_leaves_no_staging(tmp_path):
    """`diff > 1e-3` let NaN through: a diverged model was published and served NaN scores."""
    import numpy as np
    import torch

    from training.data.common import TrainingError
    from training.transformer import export as ex
    from training.transformer.common import discard_staging_on_error, staging_dir

    model = _tiny_bert(100, "qa").eval()
    with torch.no_grad():
        model.qa_outputs.weight.fill_(float("nan"))
    onnx = tmp_path / "m.onnx"
    ex.export_onnx(model, onnx, "qa", ex.example_batch(100))
    batch = {"input_ids": np.full((1, 6), 7, dtype=np.int64),
             "attention_mask": np.ones((1, 6), dtype=np.int64),
             "token_type_ids": np.zeros((1, 6), dtype=np.int64)}  # fmt: skip
    with pytest.raises(TrainingError, match="training diverged"):
        ex.check_parity(model, onnx, batch, "qa")

    final = tmp_path / "models" / "qa-zh" / "1"
    with pytest.raises(TrainingError), discard_staging_on_error(final):
        staging = staging_dir(final)
        (staging / "model.onnx").write_bytes(b"x" * 100)
        raise TrainingError("export failed")
    assert not staging.exists() and not final.exists()
