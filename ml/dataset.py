"""Training datasets: features + labels from a bar history, and time-ordered splits.

``build_dataset`` computes the feature rows (``strategy.features``, the same
code the daemon serves with) and the 3-class labels (``strategy.labels``),
drops the warm-up rows and the rows without a label (the last ``horizon``
bars), and refuses data a model must not be trained on, with a message that
says why: too few labelled rows, non-finite features after the warm-up, or a
single label class.

``time_split`` cuts rows ``0..n`` into train / validation / test in time
order with ``embargo`` rows left out between train and validation and
between validation and test. The label of row ``i`` looks at bars
``i .. i + horizon``; with ``embargo >= horizon`` no training label window
reaches a validation or test bar (and no validation label a test bar). The
kept rows of a ``Dataset`` are consecutive bars, so rows and bars coincide.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from strategy.features import (
    BarColumns,
    FeatureSpec,
    atr_series,
    compute_features,
    effective_spread_points,
)
from strategy.labels import CLASSES, UNLABELLED, make_labels, make_labels_spread

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_MIN_ROWS = 200


@dataclass(frozen=True, eq=False)
class Dataset:
    """Labelled feature rows in time order (arrays are read-only)."""

    X: np.ndarray  # (n, n_features) float32
    y: np.ndarray  # (n,) int8: 0 down, 1 flat, 2 up
    time_ns: np.ndarray  # (n,) int64 UTC open time of each row's bar
    names: tuple[str, ...]
    feature_hash: str
    dataset_hash: str  # sha256 over the shapes and bytes of X, y, time_ns
    horizon: int
    label_unit: str  # "atr" or "spread"
    threshold: float

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def first_time(self) -> datetime:
        return datetime.fromtimestamp(int(self.time_ns[0]) / 1e9, tz=UTC)

    @property
    def last_time(self) -> datetime:
        return datetime.fromtimestamp(int(self.time_ns[-1]) / 1e9, tz=UTC)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.y.astype(np.int64), minlength=len(CLASSES))
        return {name: int(counts[i]) for i, name in enumerate(CLASSES)}


def dataset_hash(X: np.ndarray, y: np.ndarray, time_ns: np.ndarray) -> str:
    """SHA-256 (hex) over shapes, dtypes and bytes of the three arrays."""
    digest = hashlib.sha256()
    for arr in (X, y, time_ns):
        a = np.ascontiguousarray(arr)
        digest.update(f"{a.dtype.str}{a.shape};".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _too_short(needed: int, got: int, detail: str) -> ValueError:
    return ValueError(
        f"training data too short: need at least {needed} labelled rows, got {got}{detail}"
    )


def build_dataset(
    frame_or_cols: pd.DataFrame | BarColumns,
    spec: FeatureSpec,
    *,
    point: float,
    default_spread_points: int,
    horizon: int,
    threshold_atr: float | None = None,
    threshold_spread: float | None = None,
    min_rows: int = DEFAULT_MIN_ROWS,
) -> Dataset:
    """Features and labels of every bar past the warm-up that has a label.

    Exactly one of ``threshold_atr`` (move in ATRs of the bar, the ``atr``
    feature's formula with ``spec.params["atr_period"]``) and
    ``threshold_spread`` (move in the bar's spreads, the ``spread_points``
    feature times ``point``) must be given.

    Raises ``ValueError`` for fewer than ``min_rows`` labelled rows, NaN/inf
    features after the warm-up, or labels of a single class.
    """
    if (threshold_atr is None) == (threshold_spread is None):
        raise ValueError("give exactly one of threshold_atr and threshold_spread")
    cols = (
        frame_or_cols
        if isinstance(frame_or_cols, BarColumns)
        else BarColumns.from_frame(frame_or_cols)
    )
    X_all = compute_features(spec, cols, point=point, default_spread_points=default_spread_points)
    if threshold_atr is not None:
        unit, threshold = "atr", float(threshold_atr)
        y_all = make_labels(
            cols.close,
            atr_series(cols, int(spec.params["atr_period"])),
            horizon=horizon,
            threshold_atr=threshold,
        )
    else:
        assert threshold_spread is not None
        unit, threshold = "spread", float(threshold_spread)
        spread_price = effective_spread_points(cols, default_spread_points) * float(point)
        y_all = make_labels_spread(
            cols.close, spread_price, horizon=horizon, threshold_spread=threshold
        )
    keep = y_all != UNLABELLED
    keep[: spec.window - 1] = False
    got = int(keep.sum())
    if got < min_rows:
        raise _too_short(
            min_rows,
            got,
            f" ({len(cols)} bars, minus {spec.window - 1} warm-up and {horizon} unlabelled)",
        )
    X = np.ascontiguousarray(X_all[keep])
    y = np.ascontiguousarray(y_all[keep])
    time_ns = np.ascontiguousarray(cols.time_ns[keep])
    finite = np.isfinite(X)
    if not finite.all():
        bad_rows, bad_cols = np.nonzero(~finite)
        names = sorted({spec.names[j] for j in bad_cols.tolist()})
        when = datetime.fromtimestamp(int(time_ns[bad_rows[0]]) / 1e9, tz=UTC)
        raise ValueError(
            f"features have NaN/inf after the warm-up: {len(np.unique(bad_rows))} rows, "
            f"first at {when.isoformat()}, in {names}"
        )
    classes = np.unique(y)
    if classes.size < 2:
        raise ValueError(
            f"labels are constant: all {got} labelled rows are {CLASSES[int(classes[0])]!r} "
            f"(horizon {horizon}, threshold {threshold} {unit}); use more data or another threshold"
        )
    for arr in (X, y, time_ns):
        arr.setflags(write=False)
    return Dataset(
        X=X,
        y=y,
        time_ns=time_ns,
        names=tuple(spec.names),
        feature_hash=spec.hash,
        dataset_hash=dataset_hash(X, y, time_ns),
        horizon=int(horizon),
        label_unit=unit,
        threshold=threshold,
    )


@dataclass(frozen=True)
class Split:
    """Row ranges in time order: ``train < val < test`` with ``embargo`` rows between."""

    train: slice
    val: slice
    test: slice
    embargo: int


def _parts(n: int, train_frac: float, val_frac: float, embargo: int) -> tuple[int, int, int]:
    usable = n - 2 * embargo
    if usable <= 0:
        return 0, 0, 0
    n_train = int(usable * train_frac)
    n_val = int(usable * val_frac)
    return n_train, n_val, usable - n_train - n_val


def time_split(
    n_or_times: int | np.ndarray | Dataset,
    *,
    train_frac: float = 0.7,
    val_frac: float = 0.15,
    embargo: int | None = None,
    min_rows_per_part: int = 1,
) -> Split:
    """Split ``n`` time-ordered rows into train / validation / test slices.

    ``n_or_times``: a row count, the rows' times (checked strictly increasing),
    or a ``Dataset`` (whose ``horizon`` is then the default ``embargo``). The
    test part gets what is left after ``train_frac`` and ``val_frac`` of the
    rows not embargoed. Raises ``ValueError`` when a part would have fewer
    than ``min_rows_per_part`` rows.
    """
    if isinstance(n_or_times, Dataset):
        n = len(n_or_times)
        if embargo is None:
            embargo = n_or_times.horizon
    elif isinstance(n_or_times, int | np.integer):
        n = int(n_or_times)
    else:
        times = np.asarray(n_or_times)
        if times.ndim != 1:
            raise ValueError(f"times must be 1-d (got shape {times.shape})")
        if times.size > 1 and not (np.diff(times) > 0).all():
            raise ValueError("times must be strictly increasing (rows in time order)")
        n = int(times.shape[0])
    if embargo is None:
        raise ValueError("embargo is required (at least the label horizon, in rows)")
    if isinstance(embargo, bool) or int(embargo) != embargo or embargo < 0:
        raise ValueError(f"embargo must be a non-negative integer (got {embargo!r})")
    embargo = int(embargo)
    if not (0 < train_frac < 1 and 0 < val_frac < 1 and train_frac + val_frac < 1):
        raise ValueError(
            f"need 0 < train_frac, 0 < val_frac and train_frac + val_frac < 1 "
            f"(got {train_frac}, {val_frac})"
        )
    m = max(1, int(min_rows_per_part))
    test_frac = 1.0 - train_frac - val_frac
    n_train, n_val, n_test = _parts(n, train_frac, val_frac, embargo)
    if min(n_train, n_val, n_test) < m:
        needed = 2 * embargo + math.ceil(m / min(train_frac, val_frac, test_frac))
        needed = max(needed - 3, 2 * embargo + 3 * m)
        while min(_parts(needed, train_frac, val_frac, embargo)) < m:
            needed += 1
        raise _too_short(
            needed,
            n,
            f" (train {train_frac:g} / validation {val_frac:g} / test {test_frac:g}, "
            f"{m}+ rows each, embargo {embargo} rows twice)",
        )
    val_start = n_train + embargo
    test_start = val_start + n_val + embargo
    return Split(
        train=slice(0, n_train),
        val=slice(val_start, val_start + n_val),
        test=slice(test_start, n),
        embargo=embargo,
    )
