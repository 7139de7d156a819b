"""Deterministic seeds for local training (torch-free)."""

from __future__ import annotations


def seed_for(*parts: int) -> int:
    """A deterministic 31-bit seed from integers (client, round, ...)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return int(h % (2**31 - 1))
