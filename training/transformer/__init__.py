"""BERT-family models (``transformers``): Chinese extractive QA, the machine-text detector,
and MLM pretraining of a compact Chinese BERT. torch is imported inside functions only."""
