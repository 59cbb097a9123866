"""Labels: 3 classes from the forward price move over a horizon (numpy-only leaf).

For bar ``i`` the forward move is ``close[i + horizon] - close[i]`` (price
units). With a unit ``u[i]`` (the bar's ATR, or its spread in price units)
and a threshold ``k``:

- ``UP`` (2)   if the move is greater than ``+k * u[i]``;
- ``DOWN`` (0) if it is less than ``-k * u[i]``;
- ``FLAT`` (1) otherwise (a move of exactly ``k * u[i]`` is flat);
- ``UNLABELLED`` (-1) where it cannot be computed: the last ``horizon`` bars
  and bars whose close or unit is NaN/inf or whose unit is negative.

The label of bar ``i`` looks at bars ``i .. i + horizon``: training splits
need an embargo of at least ``horizon`` rows (``ml.dataset.time_split``).
"""

from __future__ import annotations

import numpy as np

CLASSES: tuple[str, str, str] = ("down", "flat", "up")
DOWN, FLAT, UP = 0, 1, 2
UNLABELLED = -1


def _forward_labels(
    close: np.ndarray, unit: np.ndarray, horizon: int, threshold: float
) -> np.ndarray:
    c = np.asarray(close, dtype=np.float64)
    u = np.asarray(unit, dtype=np.float64)
    if c.ndim != 1 or u.shape != c.shape:
        raise ValueError(f"close and unit must be 1-d of equal length (got {c.shape}, {u.shape})")
    if isinstance(horizon, bool) or int(horizon) != horizon or horizon < 1:
        raise ValueError(f"horizon must be a positive integer number of bars (got {horizon!r})")
    if not (np.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be finite and >= 0 (got {threshold!r})")
    h = int(horizon)
    n = c.shape[0]
    out = np.full(n, UNLABELLED, dtype=np.int8)
    if n <= h:
        return out
    move = c[h:] - c[:-h]
    band = threshold * u[:-h]
    y = np.full(n - h, FLAT, dtype=np.int8)
    y[move > band] = UP
    y[move < -band] = DOWN
    ok = np.isfinite(move) & np.isfinite(band) & (u[:-h] >= 0)
    out[:-h] = np.where(ok, y, UNLABELLED)
    return out


def make_labels(
    close: np.ndarray, atr: np.ndarray, *, horizon: int, threshold_atr: float
) -> np.ndarray:
    """int8 labels (0 down, 1 flat, 2 up, -1 unlabelled); threshold in ATRs of bar ``i``."""
    return _forward_labels(close, atr, horizon, threshold_atr)


def make_labels_spread(
    close: np.ndarray, spread_price: np.ndarray, *, horizon: int, threshold_spread: float
) -> np.ndarray:
    """Like ``make_labels`` with the threshold in spreads (``spread_price`` in price units)."""
    return _forward_labels(close, spread_price, horizon, threshold_spread)
