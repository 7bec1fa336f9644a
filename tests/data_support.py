"""Where the shared datasets are, for the loader tests on real files (skipped without them)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# Where the project's development machines keep it (DEVELOPERS.md): a clone elsewhere (CI's)
# still finds it there.
MACHINE_DATA = Path("/work/shared/data")


def shared_data(holding: str) -> Path | None:
    """The data root (``NLPSERVE_DATA_DIR``, else ``../shared/data`` next to the
    repository, else the machines' folder) if it holds ``holding`` (a path inside it)."""
    env = os.environ.get("NLPSERVE_DATA_DIR")
    for cand in (env, REPO.parent / "shared" / "data", MACHINE_DATA):
        if cand and (Path(cand) / holding).exists():
            return Path(cand)
    return None
