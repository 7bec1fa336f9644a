"""nlpserve serving runtime: ONNX Runtime behind FastAPI with length-bucketed batching.

This package must never import torch: it is what the serving image ships.
"""

__version__ = "0.1.0"
