"""Bar file loaders: MT5 exports, HistData, plain CSV, gzip, clocks, timeframes, bad files."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from structlog.testing import capture_logs

from market_data.bars import BAR_COLUMNS
from market_data.loaders import DataFileError, LoadResult, load_bars
from market_data.timezones import server_offset, to_utc

MT5_HEADER = "<DATE>\t<TIME>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>\t<VOL>\t<SPREAD>"


def utc(*args: int) -> pd.Timestamp:
    return pd.Timestamp(datetime(*args, tzinfo=UTC))  # type: ignore[misc]


def write(path: Path, lines: list[str], *, newline: str = "\n", gz: bool = False) -> Path:
    data = (newline.join(lines) + newline).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def mt5_row(date: str, clock: str, close: float = 2625.0, spread: int = 43) -> str:
    return f"{date}\t{clock}\t2624.81\t2625.07\t2624.25\t{close:.2f}\t124\t0\t{spread}"


def plain_rows(n: int, start: datetime, step_s: int = 60) -> list[str]:
    rows = ["time,open,high,low,close,volume"]
    for i in range(n):
        t = (start + timedelta(seconds=step_s * i)).strftime("%Y-%m-%dT%H:%M:%SZ")
        rows.append(f"{t},1.10000,1.10010,1.09990,1.10005,{10 + i}")
    return rows


# -- MT5 exports -------------------------------------------------------------------------


def test_mt5_export_server_time_is_converted_to_utc(tmp_path: Path) -> None:
    path = write(
        tmp_path / "XAUUSD_M5.csv",
        [
            MT5_HEADER,
            mt5_row("2025.01.02", "01:00:00"),  # EET, UTC+2
            mt5_row("2025.01.02", "01:05:00", spread=44),
            mt5_row("2025.07.01", "12:00:00"),  # EEST, UTC+3
            mt5_row("2025.07.01", "12:05:00"),
        ],
        newline="\r\n",
    )
    result = load_bars(path, server_timezone="Europe/Athens")

    frame = result.frame
    assert result.fmt == "mt5"
    assert tuple(frame.columns) == BAR_COLUMNS
    assert str(frame["time"].dtype) == "datetime64[ns, UTC]"
    assert frame["time"].tolist() == [
        utc(2025, 1, 1, 23, 0),
        utc(2025, 1, 1, 23, 5),
        utc(2025, 7, 1, 9, 0),
        utc(2025, 7, 1, 9, 5),
    ]
    assert frame["open"].iloc[0] == 2624.81
    assert frame["tick_volume"].tolist() == [124] * 4
    assert frame["spread"].tolist() == [43, 44, 43, 43]
    assert frame["real_volume"].dtype == np.int64
    assert result.timeframe_s == 300
    assert result.timeframe == "M5"


def test_mt5_export_on_a_ny_plus_7_clock_follows_us_daylight_saving(tmp_path: Path) -> None:
    path = write(
        tmp_path / "EURUSD.csv",
        [
            MT5_HEADER,
            mt5_row("2025.01.08", "10:00:00"),  # US winter: UTC+2
            mt5_row("2025.03.20", "10:00:00"),  # US summer, EU still winter: UTC+3
            mt5_row("2025.07.02", "10:00:00"),  # both summer: UTC+3
        ],
    )
    ny = load_bars(path, server_timezone="NY+7", timeframe=None).frame["time"].tolist()
    athens = load_bars(path, server_timezone="Europe/Athens").frame["time"].tolist()
    assert ny == [utc(2025, 1, 8, 8), utc(2025, 3, 20, 7), utc(2025, 7, 2, 7)]
    assert athens == [utc(2025, 1, 8, 8), utc(2025, 3, 20, 8), utc(2025, 7, 2, 7)]


def test_mt5_broken_rows_are_counted_and_the_load_continues(tmp_path: Path) -> None:
    path = write(
        tmp_path / "broken.csv",
        [
            MT5_HEADER,
            mt5_row("2025.01.02", "01:00:00"),
            "2025.01.02\t01:05:00\t2624.81\t2625.07",  # too few fields
            mt5_row("2025.01.02", "01:10:00").replace("2624.81", "abc"),  # bad number
            mt5_row("2025.13.45", "01:15:00"),  # bad date
            "",  # blank line: not a row
            mt5_row("2025.01.02", "01:20:00") + "\t7",  # too many fields
            mt5_row("2025.01.02", "01:25:00"),
        ],
        newline="\r\n",
    )
    with capture_logs() as logs:
        result = load_bars(path, server_timezone="Europe/Athens")
    assert result.report.rejected == {"unparseable": 4}
    assert result.report.rows_in == 6
    assert result.report.rows_out == 2
    assert result.frame["time"].tolist() == [utc(2025, 1, 1, 23, 0), utc(2025, 1, 1, 23, 25)]
    rejected_lines = sorted(
        int(e["row"]) for e in logs if e["event"] == "bar_rejected" and e["reason"] == "unparseable"
    )
    assert rejected_lines == [3, 4, 5, 7]


def test_mt5_daily_export_without_time_column_opens_at_server_midnight(tmp_path: Path) -> None:
    header = "<DATE>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>\t<VOL>\t<SPREAD>"
    rows = [f"2025.01.0{d}\t1.1\t1.2\t1.0\t1.15\t1000\t0\t10" for d in (6, 7, 8)]
    result = load_bars(write(tmp_path / "d1.csv", [header, *rows]), server_timezone="Europe/Athens")
    assert result.frame["time"].iloc[0] == utc(2025, 1, 5, 22, 0)
    assert result.timeframe_s == 86_400
    assert result.timeframe == "D1"


def test_mt5_times_without_seconds_are_accepted(tmp_path: Path) -> None:
    path = write(tmp_path / "m1.csv", [MT5_HEADER, mt5_row("2025.01.02", "01:00")])
    result = load_bars(path, timeframe="M1")
    assert result.frame["time"].tolist() == [utc(2025, 1, 2, 1, 0)]
    assert result.timeframe_s == 60


def test_mt5_tick_export_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = write(tmp_path / "ticks.csv", ["<DATE>\t<TIME>\t<BID>\t<ASK>\t<LAST>\t<VOLUME>"])
    with pytest.raises(DataFileError, match="tick export"):
        load_bars(path)


def test_utf16_mt5_export_is_read(tmp_path: Path) -> None:
    text = "\r\n".join([MT5_HEADER, mt5_row("2025.01.02", "01:00:00")]) + "\r\n"
    path = tmp_path / "utf16.csv"
    path.write_bytes(text.encode("utf-16"))
    result = load_bars(path, timeframe="M5")
    assert result.frame["close"].tolist() == [2625.0]


# -- HistData and plain CSV --------------------------------------------------------------


def test_histdata_rows_are_converted_from_fixed_est(tmp_path: Path) -> None:
    path = write(
        tmp_path / "DAT_ASCII_EURUSD_M1_2023.csv",
        [
            "20230102 170000;1.07011;1.07020;1.07005;1.07012;0",
            "20230102 170100;1.07012;1.07030;1.07010;1.07025;3",
            "20230102 170200;1.07025;1.07030",  # broken
            "20230102 170300;1.07025;1.07040;1.07020;1.07031;0",
        ],
    )
    result = load_bars(path)
    assert result.fmt == "histdata"
    assert result.frame["time"].tolist() == [
        utc(2023, 1, 2, 22, 0),
        utc(2023, 1, 2, 22, 1),
        utc(2023, 1, 2, 22, 3),
    ]
    assert result.frame["tick_volume"].tolist() == [0, 3, 0]
    assert result.report.rejected == {"unparseable": 1}
    assert result.report.gaps == 1
    assert result.report.missing_bars == 1
    assert result.timeframe_s == 60


def test_histdata_timezone_can_be_set(tmp_path: Path) -> None:
    path = write(tmp_path / "h.csv", ["20230703 170000;1.1;1.2;1.0;1.1;0"])
    result = load_bars(path, histdata_timezone="NY+0", timeframe="M1")
    assert result.frame["time"].tolist() == [utc(2023, 7, 3, 21, 0)]


def test_plain_csv_iso_times_with_zones_are_converted_and_naive_ones_are_utc(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path / "plain.csv",
        [
            "time,open,high,low,close,volume",
            "2024-01-02T09:00:00Z,1.1,1.2,1.0,1.15,5",
            "2024-01-02T11:01:00+02:00,1.1,1.2,1.0,1.15,6",
            "2024-01-02 09:02:00,1.1,1.2,1.0,1.15,7",
        ],
    )
    result = load_bars(path)
    assert result.fmt == "plain"
    assert result.frame["time"].tolist() == [
        utc(2024, 1, 2, 9, 0),
        utc(2024, 1, 2, 9, 1),
        utc(2024, 1, 2, 9, 2),
    ]
    assert result.frame["tick_volume"].tolist() == [5, 6, 7]
    assert result.frame["spread"].tolist() == [0, 0, 0]


def test_plain_csv_epoch_seconds_and_volume_columns(tmp_path: Path) -> None:
    start = int(datetime(2024, 1, 2, 9, 0, tzinfo=UTC).timestamp())
    rows = [f"{start + 300 * i},1.1,1.2,1.0,1.15,{i},{100 + i},{8 + i}" for i in range(3)]
    header = "time,open,high,low,close,tick_volume,real_volume,spread"
    result = load_bars(write(tmp_path / "epoch.csv", [header, *rows]))
    frame = result.frame
    assert frame["time"].iloc[0] == utc(2024, 1, 2, 9, 0)
    assert frame["tick_volume"].tolist() == [0, 1, 2]
    assert frame["real_volume"].tolist() == [100, 101, 102]
    assert frame["spread"].tolist() == [8, 9, 10]
    assert result.timeframe == "M5"


def test_loader_reports_cleaning_and_parsing_rejections_together(tmp_path: Path) -> None:
    path = write(
        tmp_path / "mixed.csv",
        [
            "time,open,high,low,close,volume",
            "2024-01-02T09:00:00Z,1.1,1.2,1.0,1.15,5",
            "2024-01-02T09:01:00Z,1.1,1.2,1.0,1.15,5",
            "2024-01-02T09:01:00Z,1.1,1.2,1.0,1.16,5",  # duplicate time
            "2024-01-02T09:02:00Z,1.1,1.0,1.2,1.15,5",  # high < low
            "2024-01-02T09:03:00Z,0,1.2,1.0,1.15,5",  # non-positive price
            "2024-01-02T09:04:00Z,1.1,1.2,1.0,1.15,-5",  # negative volume
            "yesterday,1.1,1.2,1.0,1.15,5",  # unparseable time
            "2024-01-02T09:06:00Z,1.1,1.2,1.0,1.15,5",
        ],
    )
    report = load_bars(path).report
    assert report.rejected == {
        "unparseable": 1,
        "duplicate_time": 1,
        "inconsistent_ohlc": 1,
        "non_positive_price": 1,
        "negative_volume": 1,
    }
    assert report.rows_in == 8
    assert report.rows_out == 3
    assert report.rejected_total == 5


# -- gzip, bad files ----------------------------------------------------------------------


def test_gz_files_load_like_plain_ones(tmp_path: Path) -> None:
    rows = plain_rows(5, datetime(2024, 1, 2, 9, 0, tzinfo=UTC))
    plain = load_bars(write(tmp_path / "a.csv", rows))
    gz = load_bars(write(tmp_path / "a.csv.gz", rows, gz=True))
    gz_misnamed = load_bars(write(tmp_path / "b.csv", rows, gz=True))
    not_really_gz = load_bars(write(tmp_path / "c.csv.gz", rows))
    for other in (gz, gz_misnamed, not_really_gz):
        pd.testing.assert_frame_equal(plain.frame, other.frame)
    assert gz.report.rows_out == 5


def test_gz_mt5_export_is_read(tmp_path: Path) -> None:
    lines = [MT5_HEADER, mt5_row("2025.01.02", "01:00:00"), mt5_row("2025.01.02", "01:05:00")]
    result = load_bars(write(tmp_path / "x.csv.gz", lines, newline="\r\n", gz=True))
    assert result.fmt == "mt5"
    assert len(result.frame) == 2


def test_file_with_no_usable_rows_raises_data_file_error(tmp_path: Path) -> None:
    path = write(
        tmp_path / "junk.csv",
        ["time,open,high,low,close,volume", "x,y,z,1,2,3", "2024-01-02T09:00:00Z,1,2"],
    )
    with pytest.raises(DataFileError, match=r"junk\.csv: no usable bars"):
        load_bars(path)


def test_header_only_file_raises_data_file_error(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="no usable bars"):
        load_bars(write(tmp_path / "h.csv", [MT5_HEADER]))


def test_missing_file_raises_data_file_error(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match=r"nope\.csv: file not found"):
        load_bars(tmp_path / "nope.csv")


def test_empty_file_raises_data_file_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"\r\n\r\n")
    with pytest.raises(DataFileError, match="empty"):
        load_bars(path)


def test_unrecognised_header_raises_data_file_error_naming_the_formats(tmp_path: Path) -> None:
    path = write(tmp_path / "odd.csv", ["date;bid;ask", "2024-01-01;1;2"])
    with pytest.raises(DataFileError, match=r"odd\.csv: unrecognised first line.*<DATE>"):
        load_bars(path)


def test_truncated_gzip_raises_data_file_error(tmp_path: Path) -> None:
    data = gzip.compress(("\n".join(plain_rows(50, datetime(2024, 1, 2, tzinfo=UTC)))).encode())
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match="gzip"):
        load_bars(path)


def test_requested_format_must_match_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", plain_rows(3, datetime(2024, 1, 2, tzinfo=UTC)))
    with pytest.raises(DataFileError, match="'mt5' was requested"):
        load_bars(path, fmt="mt5")
    assert load_bars(path, fmt="plain").fmt == "plain"


def test_unknown_server_timezone_is_a_data_file_error(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", plain_rows(3, datetime(2024, 1, 2, tzinfo=UTC)))
    with pytest.raises(DataFileError, match="server_timezone"):
        load_bars(path, server_timezone="Mars/Olympus")


# -- timeframes ---------------------------------------------------------------------------


def test_timeframe_is_inferred_from_the_most_common_spacing(tmp_path: Path) -> None:
    rows = plain_rows(20, datetime(2024, 1, 2, 9, 0, tzinfo=UTC), step_s=300)
    rows.pop(5)  # a hole does not change the spacing
    result = load_bars(write(tmp_path / "m5.csv", rows))
    assert isinstance(result, LoadResult)
    assert result.timeframe_s == 300
    assert result.report.missing_bars == 1


def test_explicit_timeframe_that_matches_is_accepted(tmp_path: Path) -> None:
    rows = plain_rows(5, datetime(2024, 1, 2, 9, 0, tzinfo=UTC), step_s=300)
    assert load_bars(write(tmp_path / "m5.csv", rows), timeframe="M5").timeframe_s == 300


def test_explicit_timeframe_the_data_contradicts_is_refused_naming_both(tmp_path: Path) -> None:
    rows = plain_rows(5, datetime(2024, 1, 2, 9, 0, tzinfo=UTC), step_s=300)
    with pytest.raises(DataFileError, match=r"timeframe M1 \(60 s\).*M5 \(300 s\)"):
        load_bars(write(tmp_path / "m5.csv", rows), timeframe="M1")


def test_unknown_timeframe_name_is_refused(tmp_path: Path) -> None:
    rows = plain_rows(5, datetime(2024, 1, 2, 9, 0, tzinfo=UTC))
    with pytest.raises(DataFileError, match="unknown timeframe 'M2'"):
        load_bars(write(tmp_path / "m1.csv", rows), timeframe="M2")


def test_single_bar_needs_an_explicit_timeframe(tmp_path: Path) -> None:
    rows = plain_rows(1, datetime(2024, 1, 2, 9, 0, tzinfo=UTC))
    path = write(tmp_path / "one.csv", rows)
    with pytest.raises(DataFileError, match="pass the timeframe"):
        load_bars(path)
    assert load_bars(path, timeframe="H1").timeframe_s == 3600


# -- clocks -------------------------------------------------------------------------------


def test_nonexistent_spring_forward_times_shift_forward() -> None:
    naive = pd.Series(pd.to_datetime(["2025-03-30 02:30", "2025-03-30 03:30", "2025-03-30 04:00"]))
    assert to_utc(naive, "Europe/Athens").tolist() == [
        utc(2025, 3, 30, 0, 30),
        utc(2025, 3, 30, 1, 0),  # 03:30 does not exist: 04:00 EEST
        utc(2025, 3, 30, 1, 0),
    ]


def test_repeated_autumn_hour_is_read_first_then_second_occurrence() -> None:
    naive = pd.DatetimeIndex(
        pd.to_datetime(
            ["2025-10-26 03:00", "2025-10-26 03:30", "2025-10-26 03:00", "2025-10-26 03:30"]
        )
    )
    assert to_utc(naive, "Europe/Athens").tolist() == [
        utc(2025, 10, 26, 0, 0),
        utc(2025, 10, 26, 0, 30),
        utc(2025, 10, 26, 1, 0),
        utc(2025, 10, 26, 1, 30),
    ]
    single = pd.Series(pd.to_datetime(["2025-10-26 03:30"]))
    assert to_utc(single, "Europe/Athens").tolist() == [utc(2025, 10, 26, 0, 30)]


def test_server_offset_for_each_clock_kind() -> None:
    march = datetime(2025, 3, 20, 12, tzinfo=UTC)
    july = datetime(2025, 7, 1, 12, tzinfo=UTC)
    assert server_offset(march, "NY+7") == timedelta(hours=3)
    assert server_offset(march, "Europe/Athens") == timedelta(hours=2)
    assert server_offset(july, "Europe/Athens") == timedelta(hours=3)
    assert server_offset(july, "UTC") == timedelta(0)
    assert server_offset(july, "NY-2") == timedelta(hours=-6)
    with pytest.raises(ValueError, match="naive"):
        server_offset(datetime(2025, 7, 1), "UTC")  # noqa: DTZ001
    with pytest.raises(ValueError, match="unknown time zone"):
        server_offset(july, "NY+7h")
