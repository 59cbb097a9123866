"""Baseline predictor, ensemble degradation and the predictor map's snapshots."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

import numpy as np
import pytest

from market_data.bars import Bar
from ml.predictor_map import PredictorMap
from strategy.baseline import MomentumBaseline, Predictor
from strategy.ensemble import ModelOutput, combine, predict_all
from strategy.features import FeatureEngine, FeatureSpec, compute_rows

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


def make_bars(n: int, seed: int = 3) -> list[Bar]:
    rng = np.random.default_rng(seed)
    price = 1.1
    out = []
    t0 = datetime(2024, 1, 2, tzinfo=UTC)
    for i in range(n):
        o = price
        c = o * float(np.exp(rng.normal(0, 2e-4)))
        h = max(o, c) + abs(rng.normal(0, 1e-4))
        lo = min(o, c) - abs(rng.normal(0, 1e-4))
        out.append(
            Bar("EURUSD", t0 + timedelta(minutes=i), o, h, lo, c, int(rng.integers(1, 50)), 8, 0)
        )
        price = c
    return out


def test_feature_rows_are_finite_float32_once_warm_and_match_batch_rows() -> None:
    bars = make_bars(200)
    engine = FeatureEngine(SPEC, point=1e-5, default_spread_points=10)
    rows = [engine.update(b) for b in bars]
    assert all(r is None for r in rows[: SPEC.window - 1])
    warm = np.stack([r for r in rows if r is not None])
    assert warm.dtype == np.float32 and np.isfinite(warm).all()
    batch = compute_rows(SPEC, bars, point=1e-5, default_spread_points=10)
    np.testing.assert_array_equal(batch[SPEC.window - 1 :], warm)
    # Hand check: ret_1 is the last log return, atr_points is ATR in points.
    last = warm[-1]
    assert last[SPEC.index("ret_1")] == pytest.approx(
        np.log(bars[-1].close / bars[-2].close), rel=1e-5
    )
    assert last[SPEC.index("atr_points")] == pytest.approx(last[SPEC.index("atr")] / 1e-5, rel=1e-5)


def test_feature_spec_hash_is_stable_and_changes_with_parameters() -> None:
    assert FeatureSpec().hash == FeatureSpec().hash
    assert (
        FeatureSpec(params={"atr_period": 10, "rsi_period": 14, "z_window": 20}).hash != SPEC.hash
    )
    with pytest.raises(KeyError, match="nope"):
        SPEC.index("nope")
