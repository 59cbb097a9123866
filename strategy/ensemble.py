"""Combines the predictors' class probabilities for one bar.

Graceful degradation: a predictor that raises (or returns something that is not
a probability vector) is dropped for that bar and reported; the remaining
weights are renormalised. With none left there is no decision.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from strategy.baseline import Predictor, PredictorNotReady


@dataclass(frozen=True, slots=True)
class ModelOutput:
    kind: str
    version: str
    proba: np.ndarray
    latency_us: float
    stage: str = "production"


@dataclass(frozen=True, slots=True)
class EnsembleResult:
    proba: np.ndarray | None  # combined down/flat/up, None when no model answered
    outputs: tuple[ModelOutput, ...]
    failures: tuple[tuple[str, str], ...]  # (kind, error) of models dropped this bar


def combine(outputs: tuple[ModelOutput, ...], weights: Mapping[str, float]) -> np.ndarray | None:
    if not outputs:
        return None
    w = np.array([max(weights.get(o.kind, 1.0), 0.0) for o in outputs])
    if w.sum() <= 0:
        w = np.ones(len(outputs))
    stacked = np.stack([o.proba for o in outputs])
    mixed: np.ndarray = (w[:, None] * stacked).sum(axis=0) / w.sum()
    return mixed


def predict_all(
    predictors: Mapping[str, Predictor],
    row: np.ndarray,
    weights: Mapping[str, float],
    timer: Callable[[], int],
    feature_hash: str | None = None,
) -> EnsembleResult:
    """Ask every predictor; ``timer`` (ns) is injected so tests control latency.

    A predictor built for another feature spec (``feature_hash``) is refused; a
    sequence model still filling its window sits the bar out without an error.
    """
    outputs: list[ModelOutput] = []
    failures: list[tuple[str, str]] = []
    for kind, predictor in predictors.items():
        t0 = timer()
        try:
            if feature_hash is not None and predictor.feature_hash != feature_hash:
                raise ValueError(
                    f"built for feature spec {predictor.feature_hash}, serving {feature_hash}"
                )
            proba = np.asarray(predictor.predict_proba(row), dtype=np.float64)
            if proba.shape != (3,) or not np.all(np.isfinite(proba)) or abs(proba.sum() - 1) > 1e-3:
                raise ValueError(f"not a probability vector: {proba!r}")
        except PredictorNotReady:
            continue
        except Exception as exc:  # noqa: BLE001 - model code is isolated; the bar goes on
            failures.append((kind, f"{type(exc).__name__}: {exc}"))
            continue
        latency_us = (timer() - t0) / 1000.0
        outputs.append(ModelOutput(kind, predictor.version, proba, latency_us, predictor.stage))
    result = tuple(outputs)
    return EnsembleResult(combine(result, weights), result, tuple(failures))
