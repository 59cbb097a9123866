"""Cleaning at the edge: every rejection reason counted, order fixed, gaps counted, no filling."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from structlog.testing import capture_logs

from market_data.bars import BAR_COLUMNS
from market_data.cleaning import CleaningReport, clean_bars, count_gaps, infer_spacing_s

T0 = datetime(2024, 1, 2, 9, 0, tzinfo=UTC)  # a Tuesday


def bars(times: list[datetime], **overrides: list[float]) -> pd.DataFrame:
    n = len(times)
    data: dict[str, object] = {
        "time": pd.to_datetime(times, utc=True),
        "open": [1.1000] * n,
        "high": [1.1005] * n,
        "low": [1.0995] * n,
        "close": [1.1002] * n,
        "tick_volume": [10] * n,
        "spread": [5] * n,
        "real_volume": [0] * n,
    }
    data.update(overrides)
    return pd.DataFrame(data)


def minutes(n: int, start: datetime = T0, step_s: int = 60) -> list[datetime]:
    return [start + timedelta(seconds=step_s * i) for i in range(n)]


def test_each_rejection_reason_is_counted_once_per_row() -> None:
    times = minutes(8)
    frame = bars(
        times,
        open=[1.1, math.nan, 1.1, 1.1, 1.1, 1.1, 1.1, 1.1],
        high=[1.1005, 1.1005, 1.1005, 1.0990, 1.1005, 1.1005, 1.1005, 1.1005],
        low=[1.0995, 1.0995, -1.0, 1.0995, 1.1003, 1.0995, 1.0995, 1.0995],
        close=[1.1002, 1.1002, 1.1002, 1.1002, 1.1002, 1.1002, 1.1002, 1.1002],
        tick_volume=[10, 10, 10, 10, 10, -1, 10, 10],
        spread=[5, 5, 5, 5, 5, 5, -2, 5],
    )
    frame.loc[7, "time"] = frame.loc[0, "time"]  # duplicate of the first row

    cleaned, report = clean_bars(frame, source="fixture")

    assert report.rejected == {
        "nan": 1,
        "non_positive_price": 1,
        "inconsistent_ohlc": 2,
        "negative_volume": 2,
        "duplicate_time": 1,
    }
    assert report.rejected_total == 7
    assert report.rows_in == 8
    assert report.rows_out == 1 == len(cleaned)
    assert cleaned["time"].iloc[0] == pd.Timestamp(T0)


@pytest.mark.parametrize(
    ("o", "h", "lo", "c"),
    [
        (1.1, 1.1001, 1.0990, 1.1002),  # high below close
        (1.1003, 1.1002, 1.0990, 1.1),  # high below open
        (1.1, 1.1005, 1.1001, 1.1002),  # low above open
        (1.1, 1.0990, 1.1000, 1.1),  # high below low
    ],
)
def test_inconsistent_ohlc_variants_are_rejected(o: float, h: float, lo: float, c: float) -> None:
    frame = bars(minutes(2), open=[1.1, o], high=[1.1005, h], low=[1.0995, lo], close=[1.1, c])
    cleaned, report = clean_bars(frame, source="fixture")
    assert report.rejected == {"inconsistent_ohlc": 1}
    assert len(cleaned) == 1


def test_out_of_order_rows_are_sorted_and_counted_not_rejected() -> None:
    times = minutes(5)
    shuffled = [times[0], times[3], times[1], times[2], times[4]]
    frame = bars(shuffled, close=[1.1000, 1.1003, 1.1001, 1.1002, 1.1004])

    cleaned, report = clean_bars(frame, source="fixture")

    assert report.reordered == 2
    assert report.rejected == {}
    assert report.rows_out == 5
    assert cleaned["time"].is_monotonic_increasing
    assert cleaned["close"].tolist() == [1.1000, 1.1001, 1.1002, 1.1003, 1.1004]


def test_duplicate_time_keeps_the_first_row_in_file_order() -> None:
    times = minutes(3)
    frame = bars([times[0], times[1], times[1], times[2]], close=[1.1, 1.1001, 1.1004, 1.1002])
    cleaned, report = clean_bars(frame, source="fixture")
    assert report.rejected == {"duplicate_time": 1}
    assert cleaned["close"].tolist() == [1.1, 1.1001, 1.1002]


def test_output_is_the_canonical_frame_and_defaults_missing_volumes() -> None:
    frame = pd.DataFrame(
        {
            "time": [datetime(2024, 1, 2, 9, 0), datetime(2024, 1, 2, 9, 1)],  # noqa: DTZ001
            "open": ["1.1", "1.1"],
            "high": [1.2, 1.2],
            "low": [1.0, 1.0],
            "close": [1.1, 1.1],
        }
    )
    cleaned, report = clean_bars(frame, source="fixture")
    assert tuple(cleaned.columns) == BAR_COLUMNS
    assert str(cleaned["time"].dtype) == "datetime64[ns, UTC]"
    assert cleaned["time"].iloc[0] == pd.Timestamp(T0)  # naive means UTC
    assert cleaned["open"].dtype == np.float64
    for name in ("tick_volume", "spread", "real_volume"):
        assert cleaned[name].dtype == np.int64
        assert cleaned[name].tolist() == [0, 0]
    assert report.rejected == {}


def test_gaps_count_missing_bars_and_never_fill_them() -> None:
    times = [*minutes(3), T0 + timedelta(minutes=7), T0 + timedelta(minutes=8)]
    cleaned, report = clean_bars(bars(times), source="fixture")
    assert report.spacing_s == 60
    assert report.gaps == 1
    assert report.missing_bars == 4  # 09:03 .. 09:06
    assert len(cleaned) == 5  # nothing forward-filled


def test_explicit_timeframe_is_used_for_gap_counting() -> None:
    cleaned, report = clean_bars(bars(minutes(4, step_s=300)), source="fixture", timeframe_s=60)
    assert report.spacing_s == 60
    assert report.gaps == 3
    assert report.missing_bars == 12
    assert len(cleaned) == 4


def test_weekend_closure_is_not_counted_as_missing_bars() -> None:
    friday = datetime(2024, 1, 5, 21, 57, tzinfo=UTC)
    sunday = datetime(2024, 1, 7, 22, 0, tzinfo=UTC)
    times = [*minutes(3, start=friday), *minutes(3, start=sunday)]
    _, report = clean_bars(bars(times), source="fixture")
    assert report.gaps == 0
    assert report.missing_bars == 0
    assert report.weekend_gaps == 1


def test_a_gap_starting_before_the_weekend_counts_only_weekday_slots() -> None:
    friday = datetime(2024, 1, 5, 18, 58, tzinfo=UTC)
    sunday = datetime(2024, 1, 7, 23, 0, tzinfo=UTC)
    times = [*minutes(2, start=friday), *minutes(2, start=sunday)]
    _, report = clean_bars(bars(times), source="fixture")
    assert report.gaps == 1
    assert report.missing_bars == 60  # Friday 19:00 .. 19:59 only


def test_count_gaps_on_epoch_seconds() -> None:
    t = np.array([0, 60, 120, 600], dtype=np.int64) + 1_704_186_000  # a Tuesday
    assert count_gaps(t, 60) == (1, 0, 7)
    assert count_gaps(t[:1], 60) == (0, 0, 0)


def test_spacing_is_the_most_common_step() -> None:
    times = pd.Series(pd.to_datetime([*minutes(10, step_s=300), T0 + timedelta(hours=9)]))
    assert infer_spacing_s(times) == 300
    assert infer_spacing_s(pd.Series(pd.to_datetime([T0]))) is None


def test_cleaning_logs_one_summary_and_each_rejected_row() -> None:
    frame = bars(minutes(3), low=[1.0995, 1.2, 1.0995])
    frame.index = pd.Index([10, 11, 12])
    with capture_logs() as logs:
        _, report = clean_bars(frame, source="fixture")
    summaries = [e for e in logs if e["event"] == "bars_cleaned"]
    assert len(summaries) == 1
    assert summaries[0]["log_level"] == "warning"
    assert summaries[0]["rejected"] == {"inconsistent_ohlc": 1}
    assert summaries[0]["rows_out"] == 2
    rows = [e for e in logs if e["event"] == "bar_rejected"]
    assert rows == [
        {
            "event": "bar_rejected",
            "log_level": "debug",
            "source": "fixture",
            "row": "11",
            "reason": "inconsistent_ohlc",
            "time": "2024-01-02T09:01:00+00:00",
        }
    ]
    assert isinstance(report, CleaningReport)


def test_clean_data_logs_at_info_level() -> None:
    with capture_logs() as logs:
        _, report = clean_bars(bars(minutes(3)), source="fixture")
    assert report.rejected_total == 0
    assert [e["log_level"] for e in logs if e["event"] == "bars_cleaned"] == ["info"]


def test_pre_rejected_rows_are_merged_into_the_report() -> None:
    _, report = clean_bars(bars(minutes(3)), source="fixture", pre_rejected={"unparseable": 2})
    assert report.rows_in == 5
    assert report.rows_out == 3
    assert report.rejected == {"unparseable": 2}


def test_unparseable_values_in_the_frame_count_as_nan() -> None:
    frame = bars(minutes(3))
    frame["close"] = ["1.1", "abc", "1.1"]
    frame["time"] = ["2024-01-02T09:00:00Z", "not a time", "2024-01-02T09:02:00Z"]
    cleaned, report = clean_bars(frame, source="fixture")
    assert report.rejected == {"nan": 1}
    assert len(cleaned) == 2


def test_empty_frame_is_cleaned_to_an_empty_canonical_frame() -> None:
    cleaned, report = clean_bars(bars([]), source="fixture")
    assert tuple(cleaned.columns) == BAR_COLUMNS
    assert report.rows_in == report.rows_out == 0
    assert report.gaps == report.missing_bars == 0


def test_frame_without_price_columns_is_refused() -> None:
    with pytest.raises(ValueError, match="close"):
        clean_bars(pd.DataFrame({"time": [T0], "open": [1.0]}), source="fixture")
