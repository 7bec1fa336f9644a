"""Training, evaluation and ONNX export (needs the ``train`` extra: torch, transformers).

Modules here import torch lazily where the CLI reaches them, so that registering the
commands costs nothing in a serving-only install.
"""
