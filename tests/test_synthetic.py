"""The synthetic market: deterministic, prefix-stable, FX-like, and honest about its edge."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from market_data.bars import BAR_COLUMNS
from market_data.cleaning import clean_bars
from market_data.synthetic import CHUNK_BARS, SyntheticMarket

N_SIGNAL = 60_000


@pytest.fixture(scope="module")
def market_frame() -> pd.DataFrame:
    return SyntheticMarket(seed=7).generate(N_SIGNAL)


@pytest.fixture(scope="module")
def random_walk_frame() -> pd.DataFrame:
    return SyntheticMarket(seed=7, signal_strength=0.0).generate(N_SIGNAL)


def past_only_hit_rate(frame: pd.DataFrame, horizon: int) -> float:
    """Fit a linear rule on the first half, score the sign of the forward return on the second.

    Features at bar i use bars <= i only: the last five returns scaled by recent
    volatility and the last bar's (close - open) / (high - low) times its tick
    volume relative to the last 20 bars.
    """
    c = frame["close"].to_numpy()
    o = frame["open"].to_numpy()
    rng = (frame["high"] - frame["low"]).to_numpy()
    tv = frame["tick_volume"].to_numpy(dtype=float)
    r = np.diff(np.log(c), prepend=np.nan)
    scale = pd.Series(np.abs(r)).rolling(60, min_periods=30).mean().to_numpy()
    z = r / scale
    pressure = np.divide(c - o, rng, out=np.zeros_like(c), where=rng > 0)
    relative_volume = tv / pd.Series(tv).rolling(20).mean().to_numpy()
    lags = [np.concatenate((np.full(j, np.nan), z[: len(z) - j])) for j in range(5)]
    features = np.column_stack([*lags, pressure * np.minimum(relative_volume, 3.0)])
    forward = np.full(len(c), np.nan)
    forward[:-horizon] = np.log(c[horizon:]) - np.log(c[:-horizon])
    usable = np.flatnonzero(
        np.isfinite(features).all(axis=1) & np.isfinite(forward) & (forward != 0)
    )
    train, test = usable[: usable.size // 2], usable[usable.size // 2 :]
    design = np.column_stack([features[train], np.ones(train.size)])
    beta, *_ = np.linalg.lstsq(design, np.sign(forward[train]), rcond=None)
    predicted = np.column_stack([features[test], np.ones(test.size)]) @ beta
    return float(np.mean(np.sign(predicted) == np.sign(forward[test])))


def test_same_seed_gives_the_same_bars_and_another_seed_does_not() -> None:
    a = SyntheticMarket(seed=11).generate(5_000)
    b = SyntheticMarket(seed=11).generate(5_000)
    c = SyntheticMarket(seed=12).generate(5_000)
    pd.testing.assert_frame_equal(a, b)
    assert not np.array_equal(a["close"].to_numpy(), c["close"].to_numpy())


def test_generate_is_prefix_stable_across_chunks_and_instances() -> None:
    long = SyntheticMarket(seed=3).generate(2 * CHUNK_BARS + 100)
    fresh = SyntheticMarket(seed=3)
    for n in (1, 999, CHUNK_BARS, CHUNK_BARS + 1, 2 * CHUNK_BARS + 50):
        pd.testing.assert_frame_equal(fresh.generate(n), long.iloc[:n].reset_index(drop=True))
    reused = SyntheticMarket(seed=3)
    reused.generate(2 * CHUNK_BARS + 100)
    pd.testing.assert_frame_equal(reused.generate(10), long.iloc[:10])


def test_frame_is_canonical_and_already_clean(market_frame: pd.DataFrame) -> None:
    frame = market_frame
    assert tuple(frame.columns) == BAR_COLUMNS
    assert str(frame["time"].dtype) == "datetime64[ns, UTC]"
    for name in ("tick_volume", "spread", "real_volume"):
        assert frame[name].dtype == np.int64
    assert frame["time"].iloc[0] == pd.Timestamp(datetime(2024, 1, 1, tzinfo=UTC))
    cleaned, report = clean_bars(frame, source="synthetic")
    assert report.rejected_total == 0
    assert report.reordered == 0
    assert report.missing_bars == 0
    assert report.weekend_gaps > 0
    pd.testing.assert_frame_equal(cleaned, frame)


def test_ohlc_is_consistent_and_on_the_point_grid(market_frame: pd.DataFrame) -> None:
    frame = market_frame
    o, h, lo, c = (frame[k].to_numpy() for k in ("open", "high", "low", "close"))
    assert (h >= np.maximum(o, c)).all()
    assert (lo <= np.minimum(o, c)).all()
    assert (lo > 0).all()
    for values in (o, h, lo, c):
        points = values / 0.00001
        assert np.abs(points - np.rint(points)).max() < 1e-6
    assert (frame["spread"] >= 1).all()
    assert (frame["tick_volume"] >= 1).all()
    assert (frame["real_volume"] == 0).all()
    # Within a week each bar opens at the previous close.
    same_week = (frame["time"].diff() == pd.Timedelta(minutes=1)).to_numpy()[1:]
    assert (o[1:][same_week] == c[:-1][same_week]).all()


def test_no_bars_from_friday_21_to_sunday_21_and_the_week_opens_with_a_gap(
    market_frame: pd.DataFrame,
) -> None:
    t = market_frame["time"]
    weekday = t.dt.day_of_week.to_numpy()
    hour = t.dt.hour.to_numpy()
    assert not (weekday == 5).any()
    assert not ((weekday == 4) & (hour >= 21)).any()
    assert not ((weekday == 6) & (hour < 21)).any()
    opens = np.flatnonzero((t.diff() > pd.Timedelta(hours=1)).to_numpy())
    assert len(opens) >= 5
    assert (t.iloc[opens].dt.day_of_week == 6).all()
    assert (t.iloc[opens].dt.hour == 21).all()
    jumps = market_frame["open"].to_numpy()[opens] - market_frame["close"].to_numpy()[opens - 1]
    assert np.count_nonzero(jumps) >= len(opens) - 1


def test_start_inside_a_weekend_begins_at_the_sunday_open() -> None:
    saturday = datetime(2024, 1, 6, 12, 0, tzinfo=UTC)
    frame = SyntheticMarket(start=saturday, timeframe_s=300).generate(3)
    assert frame["time"].tolist() == [
        pd.Timestamp(datetime(2024, 1, 7, 21, m, tzinfo=UTC)) for m in (0, 5, 10)
    ]


def test_volatility_clusters_beyond_the_time_of_day(market_frame: pd.DataFrame) -> None:
    r = np.abs(np.diff(np.log(market_frame["close"].to_numpy())))
    hour = market_frame["time"].dt.hour.to_numpy()[1:]
    deseasoned = r / pd.Series(r).groupby(hour).transform("mean").to_numpy()
    for lag in (1, 10, 60):
        assert np.corrcoef(deseasoned[:-lag], deseasoned[lag:])[0, 1] > 0.05


def test_tick_volume_follows_volatility(market_frame: pd.DataFrame) -> None:
    r = np.abs(np.diff(np.log(market_frame["close"].to_numpy())))
    tv = market_frame["tick_volume"].to_numpy()[1:]
    assert np.corrcoef(tv, r)[0, 1] > 0.3


def test_spread_spikes_around_the_rollover_and_is_quiet_in_london(
    market_frame: pd.DataFrame,
) -> None:
    minute = (market_frame["time"].dt.hour * 60 + market_frame["time"].dt.minute).to_numpy()
    spread = market_frame["spread"].to_numpy()
    base = 8
    rollover = spread[(minute >= 21 * 60) & (minute < 21 * 60 + 10)]
    london = spread[(minute >= 8 * 60) & (minute < 16 * 60)]
    assert np.median(rollover) >= 8 * base
    assert rollover.max() >= 15 * base
    assert np.median(london) <= 1.5 * base
    asia = spread[(minute >= 0) & (minute < 6 * 60)]
    assert np.median(asia) > np.median(london)


def test_planted_signal_is_learnable_from_past_bars(market_frame: pd.DataFrame) -> None:
    assert past_only_hit_rate(market_frame, horizon=1) > 0.535
    assert past_only_hit_rate(market_frame, horizon=5) > 0.525


def test_without_signal_the_same_rule_is_at_chance(random_walk_frame: pd.DataFrame) -> None:
    assert abs(past_only_hit_rate(random_walk_frame, horizon=1) - 0.5) < 0.01
    assert abs(past_only_hit_rate(random_walk_frame, horizon=5) - 0.5) < 0.01


def test_signal_strength_does_not_change_volatility(
    market_frame: pd.DataFrame, random_walk_frame: pd.DataFrame
) -> None:
    with_signal = np.diff(np.log(market_frame["close"].to_numpy())).std()
    without = np.diff(np.log(random_walk_frame["close"].to_numpy())).std()
    assert abs(with_signal / without - 1) < 0.03


def test_other_timeframes_and_symbols() -> None:
    frame = SyntheticMarket.for_symbol("XAUUSD", seed=1, timeframe_s=300).generate(2_000)
    assert (frame["time"].diff().dropna() >= pd.Timedelta(minutes=5)).all()
    assert frame["close"].between(1500, 2600).all()
    assert np.allclose(frame["close"] * 100, np.rint(frame["close"] * 100))


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="UTC-aware"):
        SyntheticMarket(start=datetime(2024, 1, 1))  # noqa: DTZ001
    with pytest.raises(ValueError, match="signal_strength"):
        SyntheticMarket(signal_strength=-1)
    assert len(SyntheticMarket().generate(0)) == 0


def test_ar1_recursion_is_bit_identical_to_scipy_lfilter() -> None:
    from scipy.signal import lfilter

    from market_data.synthetic import _ar1

    rng = np.random.default_rng(5)
    x = rng.standard_t(5, 5000)
    for b0, phi, z0 in ((0.05, 0.9917, 0.3), (1.0, 0.8, -1.7), (0.02, 0.99986, 0.0)):
        expected, _ = lfilter([b0], [1.0, -phi], x, zi=[z0])
        assert np.array_equal(_ar1(b0, phi, x, z0), expected)
