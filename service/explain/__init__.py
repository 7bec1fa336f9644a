"""SHAP explanations served over the batched inference path (docs/explain.md).

``shap`` is imported lazily (only when an explanation runs): the package is an optional
extra, and without it the explain endpoints answer 501.
"""

from service.explain.engine import (
    ExplainError,
    ExplainInputError,
    ExplainService,
    ExplainUnavailableError,
    Explanation,
    ModelExplainer,
    shap_available,
)

__all__ = [
    "ExplainError",
    "ExplainInputError",
    "ExplainService",
    "ExplainUnavailableError",
    "Explanation",
    "ModelExplainer",
    "shap_available",
]
