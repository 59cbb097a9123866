"""Cleaning bars at the edge: reject what cannot be a bar, order the rest, count gaps.

``clean_bars`` takes any frame with a ``time`` column and the price columns
(``tick_volume``, ``spread`` and ``real_volume`` default to 0 when absent) and
returns the canonical frame (``BAR_COLUMNS``, sorted, unique times) plus a
``CleaningReport``. Each rejected row gets exactly one reason, the first that
applies in this order:

``nan``                 a time that is missing or unparseable, or a value that
                        is NaN, infinite or not a number;
``non_positive_price``  open, high, low or close <= 0;
``inconsistent_ohlc``   high < max(open, close), low > min(open, close) or
                        high < low;
``negative_volume``     tick_volume, spread or real_volume < 0;
``duplicate_time``      a second (third...) row with the same time: the first
                        in file order is kept.

Rows that arrive out of time order are not rejected: they are sorted (stable,
so file order decides between equal times) and counted in ``reordered``.

Gaps: the bar spacing is ``timeframe_s`` when given, otherwise the most common
difference between consecutive times. A step larger than the spacing is a gap;
its missing bars are the bar slots it skips, except slots inside the weekend
closure (Friday 20:00 UTC to Sunday 23:00 UTC, wide enough for FX and metals
under both daylight-saving regimes). A gap whose skipped slots all fall in
that window is a weekend gap, counted apart. Nothing is ever forward-filled.

One ``bars_cleaned`` event is logged per call with every count (warning
level when rows were rejected); each rejected row is logged at debug level
with its index label (the loaders use the file's line number), up to
``MAX_REJECTED_ROWS_LOGGED`` rows per call, then one summary event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import structlog

from market_data.bars import BAR_COLUMNS

log = structlog.get_logger(__name__)

PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
VOLUME_COLUMNS: tuple[str, ...] = ("tick_volume", "spread", "real_volume")

# Reasons in the order they are tested (one reason per row).
REASONS: tuple[str, ...] = (
    "nan",
    "non_positive_price",
    "inconsistent_ohlc",
    "negative_volume",
    "duplicate_time",
)

MAX_REJECTED_ROWS_LOGGED = 200

_DAY_S = 86_400
_WEEK_S = 7 * _DAY_S
# Seconds from Monday 00:00 UTC. 1970-01-01 (epoch 0) was a Thursday.
_EPOCH_WEEK_POSITION_S = 3 * _DAY_S
WEEKEND_CLOSE_S = 4 * _DAY_S + 20 * 3600  # Friday 20:00 UTC
WEEKEND_OPEN_S = 6 * _DAY_S + 23 * 3600  # Sunday 23:00 UTC


@dataclass(frozen=True)
class CleaningReport:
    """What cleaning did to one source. ``rejected`` maps reason -> rows dropped."""

    source: str
    rows_in: int
    rows_out: int
    rejected: dict[str, int]
    gaps: int
    missing_bars: int
    reordered: int = 0
    weekend_gaps: int = 0
    spacing_s: int | None = None

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


def infer_spacing_s(times: pd.Series | np.ndarray) -> int | None:
    """Most common positive step between consecutive sorted times, in seconds.

    ``None`` with fewer than two distinct times. Ties go to the smaller step.
    """
    seconds = np.sort(_epoch_seconds(times))
    steps = np.diff(seconds)
    steps = np.sort(steps[steps > 0])
    if steps.size == 0:
        return None
    # Run lengths of the sorted steps; argmax picks the first (smallest) of equal runs.
    starts = np.flatnonzero(np.concatenate(([True], steps[1:] != steps[:-1])))
    runs = np.diff(np.concatenate((starts, [steps.size])))
    return int(steps[starts[int(np.argmax(runs))]])


def weekend_open_seconds(epoch_s: np.ndarray) -> np.ndarray:
    """Seconds since the epoch that lie outside weekend closures (a monotone clock)."""
    shifted = epoch_s + _EPOCH_WEEK_POSITION_S
    weeks, position = np.divmod(shifted, _WEEK_S)
    closed_len = WEEKEND_OPEN_S - WEEKEND_CLOSE_S
    closed = weeks * closed_len + np.clip(position - WEEKEND_CLOSE_S, 0, closed_len)
    return epoch_s - closed


def is_weekend_closed(epoch_s: np.ndarray) -> np.ndarray:
    """True for instants inside the weekend closure window."""
    position = (epoch_s + _EPOCH_WEEK_POSITION_S) % _WEEK_S
    return (position >= WEEKEND_CLOSE_S) & (position < WEEKEND_OPEN_S)


def count_gaps(epoch_s: np.ndarray, spacing_s: int) -> tuple[int, int, int]:
    """``(gaps, weekend_gaps, missing_bars)`` for sorted unique bar times in seconds."""
    if epoch_s.size < 2 or spacing_s <= 0:
        return 0, 0, 0
    t0 = epoch_s[:-1]
    t1 = epoch_s[1:]
    is_gap = (t1 - t0) > spacing_s
    if not is_gap.any():
        return 0, 0, 0
    t0 = t0[is_gap]
    t1 = t1[is_gap]
    # Open seconds in [t0 + spacing, t1): each open slot there is a missing bar.
    open_span = weekend_open_seconds(t1) - weekend_open_seconds(t0 + spacing_s)
    missing = np.ceil(np.maximum(open_span, 0) / spacing_s).astype(np.int64)
    gaps = int(np.count_nonzero(missing > 0))
    weekend_gaps = int(np.count_nonzero(missing == 0))
    return gaps, weekend_gaps, int(missing.sum())


def clean_bars(
    frame: pd.DataFrame,
    *,
    source: str,
    timeframe_s: int | None = None,
    pre_rejected: Mapping[str, int] | None = None,
) -> tuple[pd.DataFrame, CleaningReport]:
    """Return the canonical, sorted, deduplicated frame and what was done to get it.

    ``pre_rejected`` holds rows a loader already dropped (e.g. ``unparseable``):
    they are added to ``rows_in`` and ``rejected`` so one report and one log
    event cover the whole load.
    """
    missing = [c for c in ("time", *PRICE_COLUMNS) if c not in frame.columns]
    if missing:
        raise ValueError(f"{source}: bar frame lacks the column(s) {', '.join(missing)}")
    pre = {k: int(v) for k, v in (pre_rejected or {}).items() if int(v) > 0}
    n = len(frame)
    labels = frame.index.to_numpy()

    times = _utc_times(frame["time"])
    time_ns = times.to_numpy(dtype="datetime64[ns]").view(np.int64)
    time_nat = times.isna().to_numpy()
    values: dict[str, np.ndarray] = {}
    for name in (*PRICE_COLUMNS, *VOLUME_COLUMNS):
        if name in frame.columns:
            column = pd.to_numeric(frame[name], errors="coerce")
            values[name] = column.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            values[name] = np.zeros(n, dtype=np.float64)

    reason = np.zeros(n, dtype=np.int8)  # 0 = kept, else 1 + index in REASONS

    def mark(mask: np.ndarray, name: str) -> None:
        reason[(reason == 0) & mask] = REASONS.index(name) + 1

    not_finite = time_nat.copy()
    for array in values.values():
        not_finite |= ~np.isfinite(array)
    mark(not_finite, "nan")
    o, h, lo, c = (values[k] for k in PRICE_COLUMNS)
    with np.errstate(invalid="ignore"):
        mark((o <= 0) | (h <= 0) | (lo <= 0) | (c <= 0), "non_positive_price")
        mark((h < np.maximum(o, c)) | (lo > np.minimum(o, c)) | (h < lo), "inconsistent_ohlc")
        negative = np.zeros(n, dtype=bool)
        for name in VOLUME_COLUMNS:
            negative |= values[name] < 0
        mark(negative, "negative_volume")

    kept = np.flatnonzero(reason == 0)
    kept_times = time_ns[kept]
    reordered = 0
    if kept_times.size > 1:
        running_max = np.maximum.accumulate(kept_times)[:-1]
        reordered = int(np.count_nonzero(kept_times[1:] < running_max))
    order = kept[np.argsort(kept_times, kind="stable")]
    sorted_times = time_ns[order]
    duplicate = np.zeros(order.size, dtype=bool)
    if order.size > 1:
        duplicate[1:] = sorted_times[1:] == sorted_times[:-1]
    reason[order[duplicate]] = REASONS.index("duplicate_time") + 1
    order = order[~duplicate]

    rejected = dict(pre)
    for index, name in enumerate(REASONS, start=1):
        count = int(np.count_nonzero(reason == index))
        if count:
            rejected[name] = rejected.get(name, 0) + count
    _log_rejected_rows(source, labels, time_ns, time_nat, reason)

    out = pd.DataFrame({"time": pd.to_datetime(time_ns[order], unit="ns", utc=True).as_unit("ns")})
    for name in PRICE_COLUMNS:
        out[name] = values[name][order]
    for name in VOLUME_COLUMNS:
        out[name] = np.rint(values[name][order]).astype(np.int64)
    out = out[list(BAR_COLUMNS)]

    epoch_s = time_ns[order] // 1_000_000_000
    spacing = timeframe_s if timeframe_s else infer_spacing_s(epoch_s)
    gaps, weekend_gaps, missing_bars = count_gaps(epoch_s, spacing) if spacing else (0, 0, 0)

    report = CleaningReport(
        source=source,
        rows_in=n + sum(pre.values()),
        rows_out=len(out),
        rejected=rejected,
        gaps=gaps,
        missing_bars=missing_bars,
        reordered=reordered,
        weekend_gaps=weekend_gaps,
        spacing_s=spacing,
    )
    emit = log.warning if report.rejected_total else log.info
    emit(
        "bars_cleaned",
        source=source,
        rows_in=report.rows_in,
        rows_out=report.rows_out,
        rejected=report.rejected,
        rejected_total=report.rejected_total,
        reordered=reordered,
        gaps=gaps,
        weekend_gaps=weekend_gaps,
        missing_bars=missing_bars,
        spacing_s=spacing,
    )
    return out, report


def _utc_times(column: pd.Series) -> pd.Series:
    """Times as ``datetime64[ns, UTC]``: naive means UTC, numbers are epoch seconds."""
    if pd.api.types.is_datetime64_any_dtype(column.dtype):
        times = column
        if times.dt.tz is None:
            times = times.dt.tz_localize("UTC")
        return times.dt.tz_convert("UTC").dt.as_unit("ns")
    if pd.api.types.is_numeric_dtype(column.dtype):
        return pd.to_datetime(column, unit="s", utc=True, errors="coerce").dt.as_unit("ns")
    parsed = pd.to_datetime(column, utc=True, errors="coerce", format="ISO8601")
    return parsed.dt.as_unit("ns")


def _epoch_seconds(times: pd.Series | np.ndarray) -> np.ndarray:
    if isinstance(times, pd.Series):
        if pd.api.types.is_datetime64_any_dtype(times.dtype):
            ns = _utc_times(times).dropna().to_numpy(dtype="datetime64[ns]").view(np.int64)
            return ns // 1_000_000_000
        return times.to_numpy(dtype=np.int64)
    array = np.asarray(times)
    if np.issubdtype(array.dtype, np.datetime64):
        return array.astype("datetime64[s]").astype(np.int64)
    return array.astype(np.int64)


def _log_rejected_rows(
    source: str,
    labels: np.ndarray,
    time_ns: np.ndarray,
    time_nat: np.ndarray,
    reason: np.ndarray,
) -> None:
    """Debug-log each rejected row, up to ``MAX_REJECTED_ROWS_LOGGED`` of them."""
    rejected_rows = np.flatnonzero(reason)
    for row in rejected_rows[:MAX_REJECTED_ROWS_LOGGED]:
        name = REASONS[int(reason[row]) - 1]
        when = None if time_nat[row] else pd.Timestamp(int(time_ns[row]), tz="UTC").isoformat()
        log.debug("bar_rejected", source=source, row=str(labels[row]), reason=name, time=when)
    if rejected_rows.size > MAX_REJECTED_ROWS_LOGGED:
        log.debug(
            "bar_rejected_not_listed",
            source=source,
            rows=int(rejected_rows.size - MAX_REJECTED_ROWS_LOGGED),
        )
