"""Reproducible tie-breaking in SHAP's partition explainer.

The partition explainer expands its token tree best-first, from a heap of
``(priority, np.random.randn(), node)``: nodes of equal priority (tokens the model ignores,
repeated words with the same effect) are taken in an order drawn from numpy's *global* RNG.
Under a budget too small to expand every node, the same request then got different values
from one run to the next, depending on whatever else had drawn from that RNG.

:func:`seeded_tie_breaks` gives the calling thread its own RNG, seeded, for the duration of
one explanation: the same request gives the same values, whatever runs beside it. shap reads
``np.random.randn`` through its module's ``np``, which is replaced by a view of numpy whose
``random.randn`` reads that thread's RNG (every other name is numpy's own).
"""

from __future__ import annotations

import importlib
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy

TIE_SEED = 0
_PARTITION_MODULE = "shap.explainers._partition"
_local = threading.local()
_install_lock = threading.Lock()


class _Random:
    """``numpy.random``, except ``randn`` from the thread's seeded RNG while one is set."""

    def __getattr__(self, name: str) -> Any:
        rng = getattr(_local, "rng", None)
        if name == "randn" and rng is not None:
            return rng.randn
        return getattr(numpy.random, name)


class _Numpy(types.ModuleType):
    """``numpy`` with :class:`_Random` as its ``random``."""

    random = _Random()

    def __getattr__(self, name: str) -> Any:
        return getattr(numpy, name)


def _install() -> bool:
    """Point the partition explainer's ``np`` at :class:`_Numpy` (once). False when this shap
    version has no such module-level ``np`` (ties then follow the global RNG)."""
    module = importlib.import_module(_PARTITION_MODULE)
    with _install_lock:
        current = getattr(module, "np", None)
        if isinstance(current, _Numpy):
            return True
        if current is not numpy:
            return False
        module.np = _Numpy("numpy")  # type: ignore[attr-defined]  # shap's, found at run time
        return True


@contextmanager
def seeded_tie_breaks(seed: int = TIE_SEED) -> Iterator[bool]:
    """Within this block, the calling thread's SHAP tie-breaks come from ``RandomState(seed)``.
    Yields whether that took effect (see :func:`_install`)."""
    installed = _install()
    _local.rng = numpy.random.RandomState(seed)
    try:
        yield installed
    finally:
        _local.rng = None
