"""The transparent baseline predictor: short-term momentum measured in ATRs.

A leaf (numpy only). It sits behind the same ``Predictor`` protocol as the
trained models, trades while no model has passed validation (when settings
allow), and stays as the benchmark every model must beat.

Rule: ``z = (close - close 5 bars ago) / ATR``. Class scores are
``up = gain * z``, ``down = -gain * z``, ``flat = flat_bias``; probabilities are
their softmax. A move of about one ATR in five bars gives p(up) ~ 0.6.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from strategy.features import FeatureSpec

CLASSES: tuple[str, str, str] = ("down", "flat", "up")


class PredictorNotReady(Exception):
    """A sequence model has not seen enough rows yet: skip it for this bar, silently."""


@runtime_checkable
class Predictor(Protocol):
    """What the strategy asks of every model kind: class probabilities for one row.

    One instance serves one symbol. ``predict_proba`` is called once per closed
    bar with that bar's feature row; a sequence model appends the row to its own
    window first (and raises ``PredictorNotReady`` until the window is full).
    ``observe`` feeds a history row without predicting (warm-up).
    """

    kind: str
    version: str
    feature_hash: str
    stage: str

    def predict_proba(self, row: np.ndarray) -> np.ndarray:
        """``row``: float32 features in the spec's order -> (3,) probabilities down/flat/up."""
        ...

    def observe(self, row: np.ndarray) -> None: ...


class MomentumBaseline:
    kind = "baseline"
    version = "1.0.0"
    stage = "baseline"

    def __init__(self, spec: FeatureSpec, *, gain: float = 1.5, flat_bias: float = 1.0) -> None:
        self.feature_hash = spec.hash
        self._idx = spec.index("mom_5_atr")
        self._gain = gain
        self._flat_bias = flat_bias

    def observe(self, row: np.ndarray) -> None:
        """Stateless: history rows change nothing."""

    def predict_proba(self, row: np.ndarray) -> np.ndarray:
        z = float(row[self._idx])
        if not np.isfinite(z):
            raise ValueError(f"baseline got a non-finite momentum feature ({z})")
        scores = np.array([-self._gain * z, self._flat_bias, self._gain * z])
        scores -= scores.max()
        expd = np.exp(scores)
        return expd / expd.sum()
