"""The unbiased pass@k estimator (Chen et al., 2021): from n samples of which c are correct,
the chance that at least one of k samples drawn without replacement is correct."""

from __future__ import annotations

import math


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k), in exact integers (C(m, k) = 0 for m < k)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n (n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
