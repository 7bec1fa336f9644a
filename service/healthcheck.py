"""Container HEALTHCHECK: exit 0 when ``NLPSERVE_HEALTH_URL`` answers 200 (stdlib only)."""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    url = os.environ.get("NLPSERVE_HEALTH_URL", "http://127.0.0.1:8000/healthz")
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return 0 if resp.status == 200 else 1
    except OSError as e:
        print(f"healthcheck {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
