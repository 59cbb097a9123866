"""Baseline predictor, ensemble degradation and the predictor map's snapshots."""

from __future__ import annotations

import threading
from types import MappingProxyType

import numpy as np
import pytest

from ml.predictor_map import PredictorMap
from strategy.baseline import MomentumBaseline, Predictor
from strategy.ensemble import ModelOutput, combine, predict_all
from strategy.features import FeatureSpec

SPEC = FeatureSpec()


def row_with_momentum(z: float) -> np.ndarray:
    row = np.zeros(len(SPEC.names), dtype=np.float32)
    row[SPEC.index("mom_5_atr")] = z
    return row


def test_baseline_is_flat_without_momentum_and_follows_it() -> None:
    base = MomentumBaseline(SPEC)
    flat = base.predict_proba(row_with_momentum(0.0))
    assert flat[1] > flat[0] and flat[0] == pytest.approx(flat[2])
    up = base.predict_proba(row_with_momentum(1.0))
    # softmax(-1.5, 1, 1.5): e^1.5 / (e^-1.5 + e^1 + e^1.5)
    expected = np.exp(1.5) / (np.exp(-1.5) + np.exp(1.0) + np.exp(1.5))
    assert up[2] == pytest.approx(expected)
    down = base.predict_proba(row_with_momentum(-1.0))
    assert down[0] == pytest.approx(expected)
    assert isinstance(base, Predictor)


def test_baseline_refuses_non_finite_input() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        MomentumBaseline(SPEC).predict_proba(row_with_momentum(float("nan")))


class Fixed:
    def __init__(self, kind: str, proba: list[float], version: str = "1.0.0") -> None:
        self.kind, self.version, self.feature_hash = kind, version, SPEC.hash
        self.stage = "production"
        self._p = np.array(proba)

    def predict_proba(self, row: np.ndarray) -> np.ndarray:
        return self._p


class Broken(Fixed):
    def predict_proba(self, row: np.ndarray) -> np.ndarray:
        raise RuntimeError("onnx session died")


def ticker() -> object:
    state = {"t": 0}

    def now() -> int:
        state["t"] += 1000
        return state["t"]

    return now


def test_weighted_combination() -> None:
    a = ModelOutput("a", "1", np.array([0.2, 0.2, 0.6]), 1.0)
    b = ModelOutput("b", "1", np.array([0.6, 0.2, 0.2]), 1.0)
    mixed = combine((a, b), {"a": 3.0, "b": 1.0})
    assert mixed is not None
    np.testing.assert_allclose(mixed, [0.3, 0.2, 0.5])


def test_failing_model_is_dropped_and_weights_renormalise() -> None:
    predictors = {"a": Fixed("a", [0.1, 0.2, 0.7]), "bad": Broken("bad", [1, 0, 0])}
    result = predict_all(predictors, row_with_momentum(0), {"a": 1.0, "bad": 5.0}, ticker())  # type: ignore[arg-type]
    assert result.proba is not None
    np.testing.assert_allclose(result.proba, [0.1, 0.2, 0.7])
    assert [k for k, _ in result.failures] == ["bad"]
    assert "onnx session died" in result.failures[0][1]
    assert result.outputs[0].latency_us == pytest.approx(1.0)


def test_invalid_probabilities_count_as_failure_and_none_left_means_no_decision() -> None:
    predictors = {"x": Fixed("x", [0.5, 0.5, 0.5]), "y": Fixed("y", [np.nan, 0.5, 0.5])}
    result = predict_all(predictors, row_with_momentum(0), {}, ticker())  # type: ignore[arg-type]
    assert result.proba is None
    assert sorted(k for k, _ in result.failures) == ["x", "y"]


def test_snapshot_is_immutable_and_unaffected_by_later_swaps() -> None:
    pm = PredictorMap()
    pm.swap("EURUSD", "a", Fixed("a", [0.3, 0.4, 0.3], "1.0.0"))
    snap = pm.snapshot("EURUSD")
    old = pm.swap("EURUSD", "a", Fixed("a", [0.3, 0.4, 0.3], "1.0.1"))
    assert old is not None and old.version == "1.0.0"
    assert snap["a"].version == "1.0.0"
    assert pm.snapshot("EURUSD")["a"].version == "1.0.1"
    with pytest.raises(TypeError):
        snap["b"] = Fixed("b", [1, 0, 0])  # type: ignore[index]
    assert pm.swap("EURUSD", "a", None) is not None
    assert dict(pm.snapshot("EURUSD")) == {}


def test_snapshots_under_concurrent_swaps_always_hold_one_consistent_set() -> None:
    pm = PredictorMap()
    pm.swap("S", "a", Fixed("a", [1, 0, 0], "0"))
    pm.swap("S", "b", Fixed("b", [1, 0, 0], "0"))
    done = threading.Event()

    def swapper() -> None:
        for v in range(1, 2001):
            # Swap both kinds as one new set: a reader must never see a mix.
            current = {"a": Fixed("a", [1, 0, 0], str(v)), "b": Fixed("b", [1, 0, 0], str(v))}
            with pm._lock:  # test reaches in to build a two-kind swap
                pm._by_symbol["S"] = MappingProxyType(current)
        done.set()

    thread = threading.Thread(target=swapper)
    thread.start()
    reads = 0
    try:
        while not done.is_set() or reads < 100:
            snap = pm.snapshot("S")
            assert snap["a"].version == snap["b"].version
            reads += 1
    finally:
        thread.join()
    assert pm.snapshot("S")["a"].version == "2000"
