"""Seeds derived from a run's seed: every random draw of a run keys on ``(seed, purpose...)``."""

from __future__ import annotations

import zlib

__all__ = ["derive_seed"]


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (run seed, round, client, purpose)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF
