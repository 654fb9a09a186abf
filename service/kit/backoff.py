"""Exponential backoff with jitter: the one formula the token refresh and the webhook delivery share.

The n-th consecutive failure waits ``base * 2**(n-1)``, capped at ``cap``, then scaled by a random
factor in [0.5, 1): waits grow, never exceed the cap, and replicas that failed together do not
retry together. ``at_least`` (a ``Retry-After`` the other side asked for) wins over a shorter wait.
"""

from __future__ import annotations

from collections.abc import Callable


def exp_jitter(
    failures: int, *, base: float, cap: float, rng: Callable[[], float], at_least: float = 0.0
) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure (1 for the first)."""
    raw = base * float(2 ** min(max(failures, 1) - 1, 16))
    return max(at_least, min(cap, raw) * (0.5 + rng() / 2))
