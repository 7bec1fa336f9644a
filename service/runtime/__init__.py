"""ONNX Runtime execution: sessions (providers, variants, options) and batch runners."""

from service.runtime.runner import ModelRunner, load_runners
from service.runtime.session import (
    CPU,
    CUDA,
    LoadedSession,
    ModelLoadError,
    ProviderError,
    choose_variant,
    create_session,
    resolve_providers,
    session_options,
)

__all__ = [
    "CPU",
    "CUDA",
    "LoadedSession",
    "ModelRunner",
    "ModelLoadError",
    "ProviderError",
    "choose_variant",
    "create_session",
    "load_runners",
    "resolve_providers",
    "session_options",
]
