"""Features: the history (vectorised) and serving (incremental) paths agree bit for bit."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import strategy.features as features
from market_data.bars import Bar, iter_bars
from market_data.synthetic import SyntheticMarket
from strategy.features import (
    DEFAULT_PARAMS,
    FEATURE_NAMES,
    BarColumns,
    FeatureEngine,
    FeatureSpec,
    compute_features,
)

ROOT = Path(__file__).resolve().parents[1]
SPEC = FeatureSpec()
POINT = 1e-5
DEFAULT_SPREAD = 10


def serve_rows(spec: FeatureSpec, bars: list[Bar], point: float = POINT) -> np.ndarray:
    """Row-by-row engine output stacked like ``compute_features`` (NaN while warming up)."""
    engine = FeatureEngine(spec, point=point, default_spread_points=DEFAULT_SPREAD)
    out = np.full((len(bars), len(spec.names)), np.nan, dtype=np.float32)
    for i, bar in enumerate(bars):
        row = engine.update(bar)
        assert (row is None) == (i < spec.window - 1)
        if row is not None:
            assert row.dtype == np.float32 and row.shape == (len(spec.names),)
            out[i] = row
    return out


def history_rows(spec: FeatureSpec, bars: list[Bar], point: float = POINT) -> np.ndarray:
    cols = BarColumns.from_bars(bars)
    return compute_features(spec, cols, point=point, default_spread_points=DEFAULT_SPREAD)


def assert_identical(a: np.ndarray, b: np.ndarray, spec: FeatureSpec) -> None:
    """Exact float32 equality, NaN where the other is NaN; names the first differing feature."""
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    if not same.all():
        i, j = np.argwhere(~same)[0]
        raise AssertionError(
            f"{(~same).sum()} values differ; first: row {i} feature {spec.names[j]}: "
            f"{a[i, j]!r} != {b[i, j]!r}"
        )


def hand_made_bars() -> list[Bar]:
    """M1 bars with missing minutes, a weekend, a flat stretch, zero spread and zero volume."""
    rng = np.random.default_rng(42)
    bars: list[Bar] = []
    t = datetime(2024, 1, 4, 20, 0, tzinfo=UTC)  # a Thursday evening
    price = 1.10000
    for i in range(420):
        step = timedelta(minutes=1)
        if i == 150:
            step = timedelta(minutes=8)  # seven missing minutes
        if i == 300:
            step = timedelta(days=2, hours=1)  # a weekend-sized gap with a price jump
            price += 0.0040
        if i:
            t += step
        if 200 <= i < 280:  # flat: zero-range bars, no tick volume for a while
            o = h = lo = c = price
            tv = 0 if i < 240 else 3
        else:
            o = price
            c = round(o + float(rng.normal(0, 2e-4)), 5)
            h = round(max(o, c) + abs(float(rng.normal(0, 1e-4))), 5)
            lo = round(min(o, c) - abs(float(rng.normal(0, 1e-4))), 5)
            tv = int(rng.integers(1, 80))
            price = c
        spread = 0 if i % 7 == 0 else int(rng.integers(5, 20))
        bars.append(Bar("EURUSD", t, o, h, lo, c, tv, spread, 0))
    return bars


def test_feature_set_has_the_required_names_and_a_sensible_size() -> None:
    assert 30 <= len(FEATURE_NAMES) <= 50
    for name in ("atr", "mom_5_atr", "spread_points", "ret_1", "rsi", "tod_sin", "gap_bars_log"):
        assert name in SPEC.names
    assert SPEC.names == FEATURE_NAMES and len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)


def test_history_and_serving_rows_are_identical_on_a_long_synthetic_series() -> None:
    frame = SyntheticMarket(seed=5).generate(20_000)
    bars = list(iter_bars(frame, "EURUSD"))
    cols = BarColumns.from_frame(frame)
    assert (np.diff(cols.time_ns) > 24 * 3600 * 10**9).sum() >= 1, "needs a weekend gap"
    served = serve_rows(SPEC, bars)
    batch = compute_features(SPEC, cols, point=POINT, default_spread_points=DEFAULT_SPREAD)
    assert batch.dtype == np.float32 and batch.shape == (len(bars), len(SPEC.names))
    assert np.isnan(batch[: SPEC.window - 1]).all()
    assert np.isfinite(batch[SPEC.window - 1 :]).all()
    assert_identical(served, batch, SPEC)


def test_parity_on_hand_made_series_with_gaps_flat_bars_and_zero_spread() -> None:
    bars = hand_made_bars()
    served = serve_rows(SPEC, bars)
    batch = history_rows(SPEC, bars)
    assert_identical(served, batch, SPEC)
    warm = batch[SPEC.window - 1 :]
    assert np.isfinite(warm).all()

    def value(i: int, name: str) -> float:
        return float(batch[i, SPEC.index(name)])

    # Gaps: the gap feature says how many bars were missing; returns span the gap.
    assert value(150, "gap_bars_log") == pytest.approx(math.log1p(7))
    assert value(151, "gap_bars_log") == 0.0
    weekend_missing = 2 * 1440 + 60 - 1  # a step of 2 days 1 hour
    assert value(300, "gap_bars_log") == pytest.approx(math.log1p(weekend_missing))
    assert value(300, "ret_1") == pytest.approx(math.log(bars[300].close / bars[299].close))
    assert value(300, "ret_1") > 0.003  # the weekend jump is in the return
    assert value(300, "day_of_week") == 6.0 and value(299, "day_of_week") == 4.0
    # Zero spread means the symbol default.
    assert value(154, "spread_points") == DEFAULT_SPREAD  # 154 % 7 == 0
    assert value(155, "spread_points") == bars[155].spread
    # Flat stretch: zero range, no change, no volume.
    flat = 270
    assert value(flat, "body_ratio") == 0.0 and value(flat, "upper_wick") == 0.0
    assert value(flat, "range_atr") == 0.0 and value(flat, "ret_1") == 0.0
    assert value(flat, "zclose") == 0.0 and value(flat, "bb_pctb") == 0.5
    assert value(flat, "bb_width") == 0.0 and value(flat, "stoch_k") == 50.0
    assert value(flat, "vol_fast") == 0.0 and value(flat, "ret_tstat") == 0.0
    assert value(flat, "atr") > 0.0  # Wilder's ATR decays, never reaches 0
    assert value(239, "tickvol_rel") == 1.0 and value(239, "tickvol_z") == 0.0  # all-zero volume


def test_parity_with_other_parameters_and_a_reordered_subset() -> None:
    names = tuple(reversed(FEATURE_NAMES))[::2]
    spec = FeatureSpec(
        names=names,
        params={"atr_period": 5, "vol_fast": 7, "z_window": 9, "bb_k": 1.5, "stoch_d": 4},
    )
    bars = hand_made_bars()
    served = serve_rows(spec, bars)
    batch = history_rows(spec, bars)
    assert_identical(served, batch, spec)
    # The subset's columns are the full spec's columns with the same parameters.
    full = history_rows(FeatureSpec(params=spec.params), bars)
    for j, name in enumerate(names):
        np.testing.assert_array_equal(batch[:, j], full[:, FEATURE_NAMES.index(name)])


def test_values_match_their_textbook_definitions() -> None:
    bars = list(iter_bars(SyntheticMarket(seed=9).generate(600), "EURUSD"))
    rows = history_rows(SPEC, bars)
    closes = np.array([b.close for b in bars])
    # Wilder ATR, written out independently.
    atr = bars[0].high - bars[0].low
    atrs = []
    for i, b in enumerate(bars):
        tr = b.high - b.low if i == 0 else max(b.high, closes[i - 1]) - min(b.low, closes[i - 1])
        atr = atr + (tr - atr) / 14
        atrs.append(atr)
    last = len(bars) - 1
    row = rows[last]

    def get(name: str) -> float:
        return float(row[SPEC.index(name)])

    assert get("atr") == pytest.approx(atrs[-1], rel=1e-6)
    assert get("atr_points") == pytest.approx(atrs[-1] / POINT, rel=1e-6)
    assert get("mom_5_atr") == pytest.approx((closes[-1] - closes[-6]) / atrs[-1], rel=1e-5)
    assert get("ret_1") == pytest.approx(math.log(closes[-1] / closes[-2]), rel=1e-5, abs=1e-9)
    assert get("ret_20") == pytest.approx(math.log(closes[-1] / closes[-21]), rel=1e-5, abs=1e-9)
    rets = np.diff(np.log(closes))[-20:]
    assert get("vol_fast") == pytest.approx(rets.std(), rel=1e-4)
    window = closes[-50:]
    assert get("zclose") == pytest.approx((closes[-1] - window.mean()) / window.std(), rel=1e-4)
    highs = np.array([b.high for b in bars[-14:]])
    lows = np.array([b.low for b in bars[-14:]])
    k = 100 * (closes[-1] - lows.min()) / (highs.max() - lows.min())
    assert get("stoch_k") == pytest.approx(k, rel=1e-5)
    tv = np.array([b.tick_volume for b in bars[-20:]], dtype=float)
    assert get("tickvol_rel") == pytest.approx(tv[-1] / tv.mean(), rel=1e-6)
    t = bars[-1].time
    angle = 2 * math.pi * (t.hour * 60 + t.minute) / 1440
    assert get("tod_sin") == pytest.approx(math.sin(angle), abs=1e-6)
    assert get("tod_cos") == pytest.approx(math.cos(angle), abs=1e-6)
    assert get("day_of_week") == t.weekday()
    warm = rows[SPEC.window - 1 :]
    for name, lo, hi in (("rsi", 0, 100), ("stoch_k", 0, 100), ("stoch_d", 0, 100)):
        col = warm[:, SPEC.index(name)]
        assert (col >= lo).all() and (col <= hi).all(), name
    for name in ("body_ratio", "upper_wick", "lower_wick"):
        col = warm[:, SPEC.index(name)]
        assert (np.abs(col) <= 1.0).all(), name


def test_scale_free_features_do_not_depend_on_the_price_level() -> None:
    bars = hand_made_bars()
    scaled = [
        Bar(
            b.symbol,
            b.time,
            round(b.open * 100, 3),
            round(b.high * 100, 3),
            round(b.low * 100, 3),
            round(b.close * 100, 3),
            b.tick_volume,
            b.spread,
        )
        for b in bars
    ]
    base = history_rows(SPEC, bars)[SPEC.window - 1 :]
    big = history_rows(SPEC, scaled, point=POINT * 100)[SPEC.window - 1 :]
    for j, name in enumerate(SPEC.names):
        if name == "atr":
            np.testing.assert_allclose(big[:, j], base[:, j] * 100, rtol=1e-5)
        else:
            np.testing.assert_allclose(big[:, j], base[:, j], rtol=1e-4, atol=1e-5, err_msg=name)


def test_engine_returns_fresh_rows_and_refuses_bars_out_of_order() -> None:
    bars = hand_made_bars()
    engine = FeatureEngine(SPEC, point=POINT, default_spread_points=DEFAULT_SPREAD)
    assert not engine.ready
    rows = [engine.update(b) for b in bars[: SPEC.window + 1]]
    assert engine.ready and engine.count == SPEC.window + 1
    a, b = rows[-2], rows[-1]
    assert a is not None and b is not None and a is not b
    keep = b.copy()
    a[:] = 0.0  # a caller may keep and modify its row
    np.testing.assert_array_equal(b, keep)
    with pytest.raises(ValueError, match="not after the previous bar"):
        engine.update(bars[5])
    with pytest.raises(ValueError, match="positive"):
        engine.update(Bar("EURUSD", bars[-1].time + timedelta(hours=9), 1.1, 1.1, 0.0, 1.1))
    # The refused bars changed nothing: the next bar gives the same row as a clean engine.
    clean = FeatureEngine(SPEC, point=POINT, default_spread_points=DEFAULT_SPREAD)
    for bar in bars[: SPEC.window + 2]:
        expected = clean.update(bar)
    row = engine.update(bars[SPEC.window + 1])
    assert row is not None and expected is not None
    np.testing.assert_array_equal(row, expected)


def test_spec_hash_is_stable_and_changes_with_names_params_and_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert FeatureSpec().hash == FeatureSpec().hash == SPEC.hash
    assert len(SPEC.hash) == 16 and int(SPEC.hash, 16) >= 0
    assert FeatureSpec(params={"atr_period": 14}).hash == SPEC.hash  # partial = defaults
    assert FeatureSpec(params=dict(DEFAULT_PARAMS)).hash == SPEC.hash
    assert FeatureSpec(params={"atr_period": 10}).hash != SPEC.hash
    assert FeatureSpec(params={"bb_k": 2.5}).hash != SPEC.hash
    assert FeatureSpec(names=FEATURE_NAMES[::-1]).hash != SPEC.hash
    assert FeatureSpec(names=FEATURE_NAMES[:-1]).hash != SPEC.hash
    # Specs travel to spawned training workers.
    copy = pickle.loads(pickle.dumps(SPEC))  # noqa: S301 - our own object
    assert copy == SPEC and copy.hash == SPEC.hash and copy.window == SPEC.window
    monkeypatch.setattr(features, "FEATURES_VERSION", features.FEATURES_VERSION + 1)
    assert FeatureSpec().hash != SPEC.hash


def test_spec_refuses_unknown_names_and_bad_parameters() -> None:
    with pytest.raises(KeyError, match="nope"):
        SPEC.index("nope")
    assert SPEC.index("atr") == FEATURE_NAMES.index("atr")
    with pytest.raises(ValueError, match="unknown feature"):
        FeatureSpec(names=("ret_1", "nope"))
    with pytest.raises(ValueError, match="duplicate"):
        FeatureSpec(names=("ret_1", "ret_1"))
    with pytest.raises(ValueError, match="unknown feature parameter"):
        FeatureSpec(params={"atr_len": 3})
    with pytest.raises(ValueError, match="atr_period must be >= 1"):
        FeatureSpec(params={"atr_period": 0})
    with pytest.raises(ValueError, match="integer"):
        FeatureSpec(params={"vol_fast": 2.5})
    with pytest.raises(ValueError, match="positive"):
        FeatureSpec(params={"bb_k": -1.0})


def test_window_is_the_first_complete_row_and_grows_with_parameters() -> None:
    assert SPEC.window > DEFAULT_PARAMS["vol_slow"]
    assert FeatureSpec(params={"spread_window": 400}).window == 400
    bars = list(iter_bars(SyntheticMarket(seed=1).generate(SPEC.window + 5), "EURUSD"))
    rows = history_rows(SPEC, bars)
    assert np.isnan(rows[SPEC.window - 2]).all() and np.isfinite(rows[SPEC.window - 1]).all()
    short = history_rows(SPEC, bars[: SPEC.window - 1])
    assert short.shape == (SPEC.window - 1, len(SPEC.names)) and np.isnan(short).all()
    empty = history_rows(SPEC, [])
    assert empty.shape == (0, len(SPEC.names))


def test_bar_columns_from_frame_match_from_bars_and_validate() -> None:
    frame = SyntheticMarket(seed=2).generate(50)
    a = BarColumns.from_frame(frame)
    b = BarColumns.from_bars(iter_bars(frame, "EURUSD"))
    for name in ("time_ns", "open", "high", "low", "close", "tick_volume", "spread"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.time_ns.dtype == np.int64 and a.close.dtype == np.float64 and len(a) == 50
    assert a.time_ns[0] == int(frame["time"].iloc[0].value)
    naive = frame.assign(time=frame["time"].dt.tz_localize(None))
    with pytest.raises(ValueError, match="UTC-aware"):
        BarColumns.from_frame(naive)
    shuffled = pd.concat([frame.iloc[1:2], frame.iloc[0:1], frame.iloc[2:]])
    with pytest.raises(ValueError, match="strictly increasing"):
        BarColumns.from_frame(shuffled)
    bad = frame.copy()
    bad.loc[3, "low"] = 0.0
    with pytest.raises(ValueError, match=r"low must be finite and positive: row 3"):
        BarColumns.from_frame(bad)
    with pytest.raises(ValueError, match="shape"):
        BarColumns(a.time_ns, a.open[:-1], a.high, a.low, a.close, a.tick_volume, a.spread)


def test_features_module_imports_neither_pandas_nor_scipy() -> None:
    code = (
        "import sys, strategy.features, strategy.labels; "
        "bad = [m for m in ('pandas', 'scipy') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr or result.stdout
