"""What the GPU benchmark's device call carries, against the device's 64 MiB per call.

A device call carries the working tree as git lists it (tracked files and untracked ones that
are not ignored) plus the paths named in ``carry``, 64 MiB in all. The tree (~48 MiB, mostly
``models/``) plus ``.whl`` (~17 MiB: wheels, redis-server, requests) is over that, so the
bench call leaves out what the device does not use: the models it does not benchmark and
``bench/results`` (untracked and ignored for that call, restored after it; bench/README.md,
"On the GPU"). ``bench/gpu_prepare.sh`` runs this and stops when even that is over:

    python -m bench.device_carry --models "detector-en qa-zh" --carry .whl
"""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Sequence
from pathlib import Path

LIMIT = 64 << 20  # the device tool's limit per call: working tree and carry together
MARGIN = 1 << 20  # files that appear between this check and the call (logs, a note)


def tree_sizes(root: Path) -> dict[str, int]:
    """Bytes of every file a device call would carry from ``root``'s working tree."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    sizes = {}
    for raw in out.split(b"\0"):
        path = root / raw.decode()
        if raw and path.is_file():  # a deleted but still tracked file does not travel
            sizes[raw.decode()] = path.stat().st_size
    return sizes


def bench_call_exclusions(root: Path, models: Sequence[str]) -> list[str]:
    """Tracked folders the bench call leaves out: every model it does not benchmark, and the
    committed results (PNGs, JSON) that nothing on the device reads."""
    out = [
        f"models/{d.name}"
        for d in sorted((root / "models").iterdir())
        if d.is_dir() and d.name not in models
    ]
    return [*out, "bench/results"] if (root / "bench" / "results").is_dir() else out


def carried_bytes(root: Path, exclude: Sequence[str] = (), carry: Sequence[str] = ()) -> int:
    """What a call carries: the tree less ``exclude`` (folders), plus ``carry``."""
    prefixes = tuple(e.rstrip("/") + "/" for e in exclude)
    tree = sum(n for p, n in tree_sizes(root).items() if not p.startswith(prefixes))
    extra = 0
    for c in carry:
        p = root / c
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        extra += sum(f.stat().st_size for f in files)
    return tree + extra


def untrack_commands(paths: Sequence[str]) -> tuple[str, str]:
    """Shell commands that leave ``paths`` out of the calls (untracked, then ignored) and
    that bring them back, as the README's chunk calls do with ``models/``."""
    lines = "".join(f"/{p}/\\n" for p in paths)
    drop = f"git rm -r -q --cached {' '.join(paths)} && printf '{lines}' >> .git/info/exclude"
    patterns = ";".join("/^\\/" + p.replace("/", "\\/") + "\\/$/d" for p in paths)
    back = f"git reset -q -- {' '.join(paths)} && sed -i '{patterns}' .git/info/exclude"
    return drop, back


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("."))
    p.add_argument("--models", default="detector-en qa-zh", help="the models benchmarked")
    p.add_argument("--carry", action="append", default=[], help="a carried path (repeatable)")
    args = p.parse_args(argv)
    mib = 1 << 20
    whole = carried_bytes(args.root, (), args.carry)
    excluded = bench_call_exclusions(args.root, args.models.split())
    slim = carried_bytes(args.root, excluded, args.carry)
    print(f"   the whole tree + {' '.join(args.carry)}: {whole / mib:.1f} MiB (limit 64 MiB)")
    if whole + MARGIN <= LIMIT:
        print("   fits as it is")
        return 0
    drop, back = untrack_commands(excluded)
    print(f"   without {' '.join(excluded)}: {slim / mib:.1f} MiB")
    if slim + MARGIN > LIMIT:
        print("   STILL OVER: lower BENCH_REQUESTS or drop .whl/redis.tar.gz")
        return 1
    print(f"   before the bench call: {drop}")
    print(f"   after it:              {back}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
