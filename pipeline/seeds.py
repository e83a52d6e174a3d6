"""Per-row seeds: a hash of the run seed and the row's identity, so a row's randomness never
depends on which chunk, batch or worker it landed in."""

from __future__ import annotations

import hashlib
import random


def derive(*parts: object) -> int:
    """A 63-bit seed from any parts, e.g. derive(run_seed, row_id, sample_index)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def rng(*parts: object) -> random.Random:
    """A private `random.Random` seeded by `derive(*parts)`."""
    return random.Random(derive(*parts))
