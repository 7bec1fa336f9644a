"""Where the shared datasets are, for the loader tests on real files (skipped without them)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_data(holding: str) -> Path | None:
    """The data root (``NLPSERVE_DATA_DIR``, else ``../shared/data`` next to the
    repository) if it holds ``holding`` (a path inside it), else None."""
    for cand in (os.environ.get("NLPSERVE_DATA_DIR"), REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / holding).exists():
            return Path(cand)
    return None
