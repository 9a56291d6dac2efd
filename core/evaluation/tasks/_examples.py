"""Which images a task shows as examples."""

from __future__ import annotations

import numpy as np


def pick_examples(n: int, candidates: np.ndarray, k: int) -> list[int]:
    """Up to ``k`` indices spread evenly over the ``True`` entries of ``candidates`` ([n] bool; all if none)."""
    idx = np.where(candidates)[0] if candidates.any() else np.arange(n)
    if idx.size <= k:
        return idx.tolist()
    return idx[np.linspace(0, idx.size - 1, k).round().astype(int)].tolist()
