"""ONNX Runtime sessions: provider choice, variant choice, session options, loud fallback."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from service.config import Settings
from service.metrics import Metrics
from service.repository import Manifest, Variant, verify_variant

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# Precision preference per provider: fp16 halves memory traffic on GPUs; on CPU fp16 kernels
# are slow or missing, and int8 (dynamic quantisation) is the fastest.
PRECISION_PREFERENCE: dict[str, tuple[str, ...]] = {
    CUDA: ("fp16", "fp32", "int8"),
    CPU: ("int8", "fp32", "fp16"),
}

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ProviderError(RuntimeError):
    """The requested provider cannot be used and fallback is not allowed."""


class ModelLoadError(RuntimeError):
    """A model's ONNX file cannot be opened (corrupt, an opset this onnxruntime lacks) or
    does not match its manifest: the command stops in one line naming the model and file."""


def ort_reason(error: Exception) -> str:
    """ORT's message about a file it could not open, in one line: without the path (the
    caller names it) or the C++ source location and signature it embeds."""
    text = " ".join(str(error).split())
    text = re.sub(r"Load model from \S+ failed: ?", "", text)
    return re.sub(r"\S*onnxruntime_src/\S+:\d+ [^(]*\([^)]*\) ?", "", text)


def resolve_providers(settings: Settings) -> list[str]:
    """Providers to try, in order; CPU is always the last resort unless GPU is required."""
    available = ort.get_available_providers()
    if settings.providers:
        wanted = [p.strip() for p in settings.providers.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in available]
        if unknown and settings.require_gpu and CUDA in unknown:
            raise ProviderError(
                f"NLPSERVE_PROVIDERS asks for {', '.join(unknown)}, which this onnxruntime "
                f"build does not have (available: {', '.join(available)}); "
                "install onnxruntime-gpu or unset NLPSERVE_REQUIRE_GPU"
            )
        for p in unknown:
            log.warning("provider %s is not available in this onnxruntime build; skipping", p)
        providers = [p for p in wanted if p in available]
    else:
        providers = [CUDA] if CUDA in available else []
    if settings.require_gpu and CUDA not in providers:
        raise ProviderError(
            "NLPSERVE_REQUIRE_GPU is set but CUDAExecutionProvider is not available "
            f"(available: {', '.join(available)})"
        )
    if CPU not in providers:
        providers.append(CPU)
    return providers


def choose_variant(
    manifest: Manifest, provider: str, forced: str | None = None
) -> tuple[str, Variant]:
    """The variant (name, spec) of ``manifest`` to run on ``provider``.

    ``forced`` (NLPSERVE_VARIANT) names a variant key or a precision; a model that lacks it
    keeps the per-provider choice, with a warning (a repository may mix models that have an
    int8 file with models that do not).
    """
    variants = manifest.variants
    if forced:
        if forced in variants:
            return forced, variants[forced]
        for name, v in variants.items():
            if v.precision == forced:
                return name, v
        log.warning(
            "%s has no variant %r (has: %s); choosing per provider instead",
            manifest.name,
            forced,
            ", ".join(sorted(variants)),
        )
    order = PRECISION_PREFERENCE.get(provider, PRECISION_PREFERENCE[CPU])

    def rank(item: tuple[str, Variant]) -> tuple[int, int, str]:
        name, v = item
        # Variants meant for this provider first, then by precision preference.
        meant = 0 if provider in v.providers else 1
        prec = order.index(v.precision) if v.precision in order else len(order)
        return (meant, prec, name)

    name, v = min(variants.items(), key=rank)
    return name, v


def session_options(settings: Settings, provider: str = CPU) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = _OPT_LEVELS[settings.graph_optimization]
    so.intra_op_num_threads = settings.intra_op_threads_for(provider)
    so.inter_op_num_threads = settings.inter_op_threads
    # One batch is one graph run; parallelism comes from intra-op threads, not graph branches.
    # ORT ignores the inter-op threads in sequential mode: asking for other than 1 asks for
    # branches run in parallel (NLPSERVE_INTER_OP_THREADS was silently without effect).
    so.execution_mode = (
        ort.ExecutionMode.ORT_SEQUENTIAL
        if settings.inter_op_threads == 1
        else ort.ExecutionMode.ORT_PARALLEL
    )
    # The arena keeps freed buffers for the next batch instead of returning them to the OS.
    # Without it the peak was higher, not lower (glibc's per-thread heaps fragment): the int8
    # detector, 2 threads x 150 batches of mixed shapes under 512 tokens, peaked at 220 MiB
    # RSS against 143 with the arena (Dec 2026, 2-core EPYC).
    so.enable_cpu_mem_arena = True
    # Memory patterns are planned for one input shape; bucketed batches change shape on every
    # run, so the pattern would be recomputed and cached per shape for little gain (the same
    # run: +10 MiB with it).
    so.enable_mem_pattern = False
    if not settings.ort_allow_spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise
    return so


def provider_options(provider: str) -> dict[str, str]:
    if provider == CUDA:
        # Grow the GPU arena by what is requested, not by powers of two: bucketed shapes
        # vary, and doubling strands memory.
        return {"arena_extend_strategy": "kSameAsRequested"}
    return {}


@dataclass
class LoadedSession:
    session: ort.InferenceSession
    provider: str  # the provider the session actually runs on
    variant: str
    requested_provider: str
    path: Path

    @property
    def fell_back(self) -> bool:
        return self.provider != self.requested_provider


def _open(path: Path, providers: list[str], settings: Settings) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(path),
        sess_options=session_options(settings, providers[0]),
        providers=[(p, provider_options(p)) for p in providers],
    )


def create_session(
    folder: Path,
    manifest: Manifest,
    settings: Settings,
    metrics: Metrics | None = None,
    providers: list[str] | None = None,
) -> LoadedSession:
    """Open ``manifest``'s best variant on the first usable provider of ``providers``.

    A model that cannot run on its preferred accelerator falls back to CPU LOUDLY: a warning,
    ``nlpserve_provider_fallback_total`` and the provider reported by ``/v1/models``; with
    ``NLPSERVE_REQUIRE_GPU`` it raises instead.
    """
    providers = providers or resolve_providers(settings)
    requested = providers[0]
    last_error: Exception | None = None
    for i, provider in enumerate(providers):
        name, variant = choose_variant(manifest, provider, settings.variant)
        path = folder / variant.file
        verify_variant(folder, name, variant)  # a damaged file is no provider's problem
        try:
            sess = _open(path, providers[i:], settings)
        except Exception as e:  # ORT raises plain RuntimeError/Fail for provider problems
            last_error = e
            log.warning(
                "%s: cannot open %s on %s: %s", manifest.name, path.name, provider, ort_reason(e)
            )
            if settings.require_gpu and provider == CUDA:
                raise ProviderError(
                    f"{manifest.name}/{manifest.version}: cannot open {path} on CUDA and "
                    f"NLPSERVE_REQUIRE_GPU is set: {ort_reason(e)}"
                ) from e
            continue
        actual = sess.get_providers()[0]
        if actual != provider:
            # ORT silently drops a provider it cannot initialise: detect it here.
            if settings.require_gpu and provider == CUDA:
                raise ProviderError(
                    f"{manifest.name}/{manifest.version}: onnxruntime could not initialise "
                    f"CUDA for {path} (the session runs on {actual}) and NLPSERVE_REQUIRE_GPU "
                    "is set"
                )
            if actual == CPU and variant.precision != choose_variant(manifest, CPU)[1].precision:
                continue  # reopen with the variant meant for CPU
        loaded = LoadedSession(sess, actual, name, requested, path)
        if loaded.fell_back:
            log.warning(
                "%s: PROVIDER FALLBACK: wanted %s, running on %s (variant %s)",
                manifest.name,
                requested,
                actual,
                name,
            )
            if metrics is not None:
                metrics.provider_fallback.labels(manifest.name, requested, actual).inc()
        _check_io(loaded, manifest)
        return loaded
    raise ModelLoadError(
        f"{manifest.name}/{manifest.version}: cannot open {folder / variant.file}: "
        f"{ort_reason(last_error) if last_error else 'no provider could open it'}"
    )


def _check_io(loaded: LoadedSession, manifest: Manifest) -> None:
    """The manifest is the contract the service encodes against: refuse a mismatching file."""
    got_in = {i.name for i in loaded.session.get_inputs()}
    got_out = {o.name for o in loaded.session.get_outputs()}
    want_in, want_out = set(manifest.input_names()), set(manifest.output_names())
    if got_in != want_in or not want_out <= got_out:
        raise ModelLoadError(
            f"{manifest.name}/{manifest.version}: {loaded.path}: model inputs "
            f"{sorted(got_in)} / outputs {sorted(got_out)} do not match the manifest (inputs "
            f"{sorted(want_in)}, outputs {sorted(want_out)})"
        )
