"""Load generator and side-by-side benchmarks (see bench/run.py)."""
