"""Ids for requests and queued sequences: 128 random bits as 32 hex characters.

``uuid.uuid4()`` asks the kernel for its bits (a ``getrandom`` call, slow on some VMs) and
builds a UUID object: ~20 us per id in the CPU benchmark's profile, twice per request. Ids
need to be unique, not unpredictable, so Python's Mersenne Twister (seeded from the OS at
import, reseeded in a forked child) does the job.
"""

from __future__ import annotations

import random


def new_id() -> str:
    return f"{random.getrandbits(128):032x}"
