"""One loaded model that runs padded batches: shared by the in-process queue and workers."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.batching import BatchPolicy, WorkItem, pad_batch, split_outputs
from service.batching.assemble import LENGTHS_INPUT, SEQUENCE_AXIS
from service.batching.buckets import bucket_edges
from service.config import CPU_BATCH_TOKENS, CUDA_SHAPE_MULTIPLE, Settings
from service.metrics import Metrics
from service.repository import Manifest, ModelEntry, discover_models
from service.runtime.session import (
    CPU,
    CUDA,
    LoadedSession,
    create_session,
    resolve_providers,
)

log = logging.getLogger(__name__)


class ModelRunner:
    """Runs batches of :class:`WorkItem` through one ORT session.

    ``run_batch`` is synchronous and thread-safe (ORT sessions are); callers run it off the
    event loop. It pads to the batch's longest sequence (rounded to the shape grid on CUDA,
    see ``Settings.shape_multiple``), runs, and splits the outputs back per item, recording
    batch metrics when ``metrics`` is given.
    """

    def __init__(
        self,
        entry: ModelEntry,
        loaded: LoadedSession,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        self.entry = entry
        self.manifest: Manifest = entry.manifest
        self.name: str = entry.manifest.name
        self.path: Path = entry.path
        self.session: ort.InferenceSession = loaded.session
        self.provider: str = loaded.provider
        self.requested_provider: str = loaded.requested_provider
        self.variant: str = loaded.variant
        self.buckets: list[int] = bucket_edges(self.manifest, settings)
        self.metrics = metrics
        self._output_names = self.manifest.output_names()
        self._use_io_binding = self.provider == CUDA
        default_multiple = CUDA_SHAPE_MULTIPLE if self.provider == CUDA else 1
        self.shape_multiple: int = settings.shape_multiple or default_multiple
        self.max_rows: int = settings.max_batch_size
        self.batches_at_once: int = settings.inference_threads_for(self.provider)
        self.settings = settings
        # Seconds per padded token (CPU, measured at warm-up): decides the padding floor.
        self.token_cost_s: float | None = None
        self.intra_op_threads: int = self.session.get_session_options().intra_op_num_threads
        if metrics is not None:
            metrics.model_info.labels(
                self.name, self.manifest.version, self.provider, self.variant
            ).set(1)

    @property
    def fell_back(self) -> bool:
        return self.provider != self.requested_provider

    # ------------------------------------------------------------------ running
    def run_batch(
        self, items: Sequence[WorkItem], *, record: bool = True
    ) -> list[dict[str, np.ndarray]]:
        if not items:
            return []
        t0 = time.perf_counter()
        longest = max(it.length for it in items)
        rows, width = self.padded_shape(len(items), longest)
        feeds = pad_batch(items, self.manifest.inputs, width, rows)
        outputs = self._run(feeds)
        per_item = split_outputs(outputs, items, self.manifest.outputs)
        if record and self.metrics is not None:
            real = sum(it.length for it in items)
            padded = rows * width  # what the session computed, grid padding included
            self.metrics.observe_batch(
                self.name,
                items[0].bucket,
                len(items),
                real,
                padded,
                time.perf_counter() - t0,
                longest_tokens=len(items) * longest,
            )
        return per_item

    def padded_shape(self, n: int, longest: int) -> tuple[int, int]:
        """(rows, width) a batch of ``n`` sequences, the longest ``longest``, is run at."""
        m = self.shape_multiple
        if m <= 1:
            return n, longest
        width = max(longest, min(-(-longest // m) * m, self.manifest.max_length))
        rows = max(n, min(1 << (n - 1).bit_length(), self.max_rows))
        return rows, width

    def shape_grid(self) -> list[tuple[int, int]]:
        """Every (rows, width) ``padded_shape`` can return for batches of up to max_batch_size
        sequences of up to max_length tokens (empty when the grid is off)."""
        if self.shape_multiple <= 1:
            return []
        longest = self.manifest.max_length
        widths = sorted({self.padded_shape(1, w)[1] for w in range(1, longest + 1)})
        rows = sorted({self.padded_shape(n, 1)[0] for n in range(1, self.max_rows + 1)})
        return [(r, w) for r in rows for w in widths]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._use_io_binding:
            try:
                return self._run_io_binding(feeds)
            except Exception as e:  # never lose a batch to the optimisation
                log.warning("%s: IO binding failed (%s); using plain run", self.name, e)
                self._use_io_binding = False
        values = self.session.run(self._output_names, feeds)
        return dict(zip(self._output_names, values, strict=True))

    def _run_io_binding(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # On CUDA, outputs are allocated on the device and copied back once per batch,
        # avoiding ORT's extra host staging of every output.
        binding = self.session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        for name in self._output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        values = binding.copy_outputs_to_cpu()
        return dict(zip(self._output_names, values, strict=True))

    # ------------------------------------------------------------------ warm-up
    def dummy_item(self, length: int, bucket: int) -> WorkItem:
        """A valid-shaped sequence of ``length`` tokens (ids 1: never the pad id 0)."""
        session_shapes = {i.name: i.shape for i in self.session.get_inputs()}
        features: dict[str, np.ndarray] = {}
        for spec in self.manifest.inputs:
            if spec.name == LENGTHS_INPUT:
                continue
            dims: list[int] = []
            for axis, dim in enumerate(spec.shape):
                if axis == 0:
                    continue  # batch axis
                if dim == SEQUENCE_AXIS:
                    dims.append(length)
                elif isinstance(dim, int):
                    dims.append(dim)
                else:
                    dims.append(self._resolve_dim(spec.name, axis, session_shapes))
            features[spec.name] = np.ones(dims, dtype=spec.dtype)
        return WorkItem(self.name, bucket, length, features, deadline=time.monotonic() + 3600)

    def _resolve_dim(self, name: str, axis: int, session_shapes: dict[str, list]) -> int:
        shape = session_shapes.get(name) or []
        if axis < len(shape) and isinstance(shape[axis], int) and shape[axis] > 0:
            return shape[axis]
        # Symbolic inner axes (e.g. characters per word) take the preprocessing's size.
        return self.manifest.preprocessing.max_word_length or 1

    def warmup(self) -> float:
        """Run every shape of the grid (CUDA), with and without padding, else one batch per
        bucket at the bucket's edge length; on CPU, then measure the token cost; returns
        seconds spent.

        The first run of each shape allocates arena memory and (on CUDA) picks kernels;
        doing it here keeps that cost out of the first requests.
        """
        t0 = time.perf_counter()
        grid = self.shape_grid()
        widths = sorted({w for _, w in grid})
        shorter = dict(zip(widths, [0, *widths], strict=False))  # each width: the one below
        for rows, width in grid:
            bucket = next((b for b, e in enumerate(self.buckets) if width <= e), 0)
            self.run_batch([self.dummy_item(width, bucket)] * rows, record=False)
            # The same shape again with padding in every row: fused attention may take
            # another kernel path when the mask has zeros, and real batches have them
            # (the shortest length that still rounds up to this width).
            if shorter[width] + 1 < width:
                item = self.dummy_item(shorter[width] + 1, bucket)
                self.run_batch([item] * rows, record=False)
        if not grid:
            for b, edge in enumerate(self.buckets):
                self.run_batch([self.dummy_item(edge, b)], record=False)
        # The floor it decides is a CPU default, with or without the grid (a CPU
        # NLPSERVE_SHAPE_MULTIPLE left every model at the 0.95 floor, cheap ones too).
        if self.provider != CUDA:
            self.token_cost_s = self._measure_token_cost()
        secs = time.perf_counter() - t0
        if grid:
            log.info("%s: warmed %d batch shapes in %.1fs", self.name, len(grid), secs)
        return secs

    def _measure_token_cost(self) -> float:
        """Seconds per padded token of a batch at max length, as many rows as the default CPU
        token budget holds (one call's fixed cost is shared, and a large explicit budget does
        not make start-up run huge batches); best of five runs.

        Processes starting together on few cores slow each other's runs: one slow measure
        flipped a model's padding floor (the cost decides it) in one of two workers started
        side by side. With one intra-op thread (the CPU default) ORT runs the batch on this
        thread, so its CPU time leaves out the time spent waiting for a core; with a pool the
        wall clock stands for it. The cost also depends on the host: on a quiet 2-core Zen 3
        EPYC (no AVX-512) pos-en measured 17.9 µs and detector-en 188 (7.4 and 53 where the
        20 µs line was drawn), so there pos-en sits near the line and a busy start (23-29 µs)
        puts it over."""
        width = self.manifest.max_length
        rows = max(1, min(self.max_rows, CPU_BATCH_TOKENS // width))
        batch = [self.dummy_item(width, len(self.buckets) - 1)] * rows
        clock = time.thread_time if self.intra_op_threads == 1 else time.perf_counter
        best = float("inf")
        for _ in range(5):
            t0 = clock()
            self.run_batch(batch, record=False)
            best = min(best, clock() - t0)
        run_rows, run_width = self.padded_shape(rows, width)  # the shape grid's rounding
        return best / (run_rows * run_width)

    def batch_policy(self) -> BatchPolicy:
        """This model's batching rules under the settings it was loaded with (its provider's
        defaults, its measured token cost): what ``/v1/models`` and the startup log show."""
        return self.settings.batch_policy(self.provider, self.token_cost_s)

    def describe(self) -> dict:
        return {
            "provider": self.provider,
            "requested_provider": self.requested_provider,
            "fallback": self.fell_back,
            "variant": self.variant,
            "precision": self.manifest.variants[self.variant].precision,
            "batches_at_once": self.batches_at_once,
            "intra_op_threads": self.intra_op_threads,
            "min_padding_efficiency": self.batch_policy().min_padding_efficiency,
            "token_cost_us": round(self.token_cost_s * 1e6, 2) if self.token_cost_s else None,
        }


def load_runners(
    settings: Settings,
    metrics: Metrics | None = None,
    entries: Sequence[ModelEntry] | None = None,
) -> dict[str, ModelRunner]:
    """Open every model of the repository (or ``entries``) and warm it up."""
    if entries is None:
        entries = discover_models(settings.model_dir, select=settings.model_selection())
    providers = resolve_providers(settings)
    if providers[0] == CPU and entries and (why := settings.cpu_oversubscription()):
        log.warning("%s", why)
    runners: dict[str, ModelRunner] = {}
    for entry in entries:
        loaded = create_session(entry.path, entry.manifest, settings, metrics, providers)
        runner = ModelRunner(entry, loaded, settings, metrics)
        secs = runner.warmup() if settings.warmup else 0.0
        log.info(
            "loaded %s/%s on %s (variant %s, buckets %s, %d batch(es) at once x %s ORT "
            "threads, padding floor %g, warm-up %.2fs)",
            runner.name,
            runner.manifest.version,
            runner.provider,
            runner.variant,
            runner.buckets,
            runner.batches_at_once,
            runner.intra_op_threads or "all",
            runner.batch_policy().min_padding_efficiency,
            secs,
        )
        runners[runner.name] = runner
    return runners
