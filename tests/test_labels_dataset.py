"""Labels, training datasets and the embargoed time split."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

import ml.dataset as dataset_module
from market_data.synthetic import SyntheticMarket
from ml.dataset import Dataset, build_dataset, time_split
from strategy.features import BarColumns, FeatureSpec, compute_features
from strategy.labels import CLASSES, make_labels, make_labels_spread

SPEC = FeatureSpec()
POINT = 1e-5


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return SyntheticMarket(seed=4).generate(3_000)


def build(frame: pd.DataFrame, **kw: object) -> Dataset:
    args: dict[str, object] = {
        "point": POINT,
        "default_spread_points": 10,
        "horizon": 5,
        "threshold_atr": 0.5,
    }
    args.update(kw)
    return build_dataset(frame, SPEC, **args)  # type: ignore[arg-type]


# -- labels ----------------------------------------------------------------------------


def test_labels_by_hand() -> None:
    assert CLASSES == ("down", "flat", "up")
    close = np.array([1.0, 1.1, 1.0, 1.3, 1.3, 1.2])
    atr = np.full(6, 0.1)
    # Moves over one bar: +0.1, -0.1, +0.3, 0, -0.1, (none); band 0.05.
    y = make_labels(close, atr, horizon=1, threshold_atr=0.5)
    assert y.dtype == np.int8
    assert y.tolist() == [2, 0, 2, 1, 0, -1]
    # Over two bars: 0, +0.2, +0.3, -0.1, (none, none); band 0.15.
    y2 = make_labels(close, atr, horizon=2, threshold_atr=1.5)
    assert y2.tolist() == [1, 2, 2, 1, -1, -1]
    # A move of exactly the threshold is flat; NaN ATR is unlabelled.
    edge = make_labels(
        np.array([1.0, 1.5, 1.0]), np.array([0.5, np.nan, 0.5]), horizon=1, threshold_atr=1.0
    )
    assert edge.tolist() == [1, -1, -1]
    # Shorter than the horizon: nothing to label.
    assert make_labels(close[:2], atr[:2], horizon=3, threshold_atr=1.0).tolist() == [-1, -1]


def test_spread_labels_use_the_spread_as_unit() -> None:
    close = np.array([1.00000, 1.00030, 1.00020, 1.00000])
    spread = np.array([0.0001, 0.0001, 0.0004, 0.0001])
    # Moves: +3, -1, -2 (x 1e-4); bands 2 spreads: 2, 2, 8 (x 1e-4).
    y = make_labels_spread(close, spread, horizon=1, threshold_spread=2.0)
    assert y.tolist() == [2, 1, 1, -1]


def test_labels_refuse_bad_arguments() -> None:
    close = np.ones(5)
    with pytest.raises(ValueError, match="horizon"):
        make_labels(close, close, horizon=0, threshold_atr=1.0)
    with pytest.raises(ValueError, match="threshold"):
        make_labels(close, close, horizon=1, threshold_atr=-1.0)
    with pytest.raises(ValueError, match="equal length"):
        make_labels(close, close[:4], horizon=1, threshold_atr=1.0)


# -- datasets --------------------------------------------------------------------------


def test_dataset_rows_are_the_feature_rows_with_labels(frame: pd.DataFrame) -> None:
    ds = build(frame)
    n = len(frame)
    assert len(ds) == n - (SPEC.window - 1) - 5
    assert ds.X.dtype == np.float32 and ds.X.shape == (len(ds), len(SPEC.names))
    assert ds.y.dtype == np.int8 and set(np.unique(ds.y).tolist()) == {0, 1, 2}
    assert ds.time_ns.dtype == np.int64 and (np.diff(ds.time_ns) > 0).all()
    assert ds.names == SPEC.names and ds.feature_hash == SPEC.hash
    assert ds.horizon == 5 and ds.label_unit == "atr" and ds.threshold == 0.5
    cols = BarColumns.from_frame(frame)
    X_all = compute_features(SPEC, cols, point=POINT, default_spread_points=10)
    rows = slice(SPEC.window - 1, n - 5)
    np.testing.assert_array_equal(ds.X, X_all[rows])
    np.testing.assert_array_equal(ds.time_ns, cols.time_ns[rows])
    atr = X_all[:, SPEC.index("atr")].astype(np.float64)
    close = cols.close
    i = SPEC.window + 100
    move = close[i + 5] - close[i]
    expected = 2 if move > 0.5 * atr[i] else 0 if move < -0.5 * atr[i] else 1
    assert ds.y[i - (SPEC.window - 1)] == expected
    assert sum(ds.class_counts().values()) == len(ds)
    assert ds.first_time == frame["time"].iloc[SPEC.window - 1].to_pydatetime()
    with pytest.raises(ValueError):
        ds.X[0, 0] = 1.0  # read-only: the hash stays true


def test_spread_labelled_dataset(frame: pd.DataFrame) -> None:
    ds = build(frame, threshold_atr=None, threshold_spread=1.0)
    assert ds.label_unit == "spread" and set(np.unique(ds.y).tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="exactly one"):
        build(frame, threshold_spread=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        build(frame, threshold_atr=None)


def test_dataset_hash_is_stable_and_follows_the_data(frame: pd.DataFrame) -> None:
    a = build(frame)
    b = build(BarColumns.from_frame(frame))
    assert a.dataset_hash == b.dataset_hash and len(a.dataset_hash) == 64
    changed = frame.copy()
    changed.loc[2_000, "close"] = round(changed.loc[2_000, "close"] + 2 * POINT, 5)
    changed.loc[2_000, "high"] = max(changed.loc[2_000, "high"], changed.loc[2_000, "close"])
    assert build(changed).dataset_hash != a.dataset_hash
    assert build(frame, horizon=6).dataset_hash != a.dataset_hash
    assert build(frame.iloc[:-1]).dataset_hash != a.dataset_hash


def test_too_short_data_is_refused_with_a_clear_reason(frame: pd.DataFrame) -> None:
    message = r"training data too short: need at least 200 labelled rows, got 0"
    with pytest.raises(ValueError, match=message):
        build(frame.iloc[:100])
    got = 300 - (SPEC.window - 1) - 5
    with pytest.raises(ValueError, match=rf"need at least 500 labelled rows, got {got}\b"):
        build(frame.iloc[:300], min_rows=500)


def test_constant_labels_are_refused(frame: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match=r"labels are constant: all \d+ labelled rows are 'flat'"):
        build(frame, threshold_atr=1e6)


def test_non_finite_features_after_warm_up_are_refused(
    frame: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = dataset_module.compute_features

    def broken(*args: object, **kwargs: object) -> np.ndarray:
        X = real(*args, **kwargs)  # type: ignore[arg-type]
        X[SPEC.window + 10, SPEC.index("rsi")] = np.inf
        X[SPEC.window + 20, SPEC.index("zclose")] = np.nan
        return X

    monkeypatch.setattr(dataset_module, "compute_features", broken)
    with pytest.raises(ValueError, match=r"NaN/inf after the warm-up: 2 rows.*'rsi', 'zclose'"):
        build(frame)


# -- splits ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "train", "val", "embargo"),
    [(1_000, 0.7, 0.15, 5), (997, 0.6, 0.2, 30), (120, 0.5, 0.25, 1), (50, 0.7, 0.15, 0)],
)
def test_split_is_time_ordered_and_embargoed(
    n: int, train: float, val: float, embargo: int
) -> None:
    split = time_split(n, train_frac=train, val_frac=val, embargo=embargo)
    tr, va, te = split.train, split.val, split.test
    assert split.embargo == embargo
    assert tr.start == 0 and te.stop == n
    assert 0 < tr.stop <= va.start < va.stop <= te.start < te.stop
    assert va.start - tr.stop == embargo and te.start - va.stop == embargo
    assert (tr.stop - tr.start) + (va.stop - va.start) + (te.stop - te.start) == n - 2 * embargo
    horizon = embargo  # the embargo is the label horizon
    held_out = set(range(va.start, va.stop)) | set(range(te.start, te.stop))
    for i in range(tr.start, tr.stop):
        # The label window [i, i + horizon] never touches a validation or test row.
        assert not held_out.intersection(range(i, i + horizon + 1))
    for i in range(va.start, va.stop):
        assert i + horizon < te.start


def test_split_of_a_dataset_defaults_the_embargo_to_its_horizon(frame: pd.DataFrame) -> None:
    ds = build(frame, horizon=7)
    split = time_split(ds)
    assert split.embargo == 7 and split.val.start - split.train.stop == 7
    assert ds.time_ns[split.train][-1] < ds.time_ns[split.val][0] < ds.time_ns[split.test][0]
    assert time_split(ds.time_ns, embargo=7) == split


def test_split_refuses_too_little_data_and_bad_arguments() -> None:
    message = r"training data too short: need at least (\d+) labelled rows, got 10"
    with pytest.raises(ValueError, match=message) as info:
        time_split(10, embargo=5)
    match = re.search(r"at least (\d+)", str(info.value))
    assert match is not None
    needed = int(match.group(1))
    time_split(needed, embargo=5)  # the stated minimum is enough
    with pytest.raises(ValueError, match="too short"):
        time_split(needed - 1, embargo=5)
    with pytest.raises(ValueError, match="too short"):
        time_split(100, embargo=0, min_rows_per_part=20)
    with pytest.raises(ValueError, match="embargo is required"):
        time_split(100)
    with pytest.raises(ValueError, match="strictly increasing"):
        time_split(np.array([3, 2, 5, 6]), embargo=0)
    with pytest.raises(ValueError, match="train_frac"):
        time_split(100, train_frac=0.9, val_frac=0.2, embargo=1)
    with pytest.raises(ValueError, match="non-negative integer"):
        time_split(100, embargo=-1)
