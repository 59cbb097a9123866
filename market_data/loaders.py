"""Bar files to the canonical frame: MT5 exports, HistData ASCII and plain CSV.

``load_bars`` reads ``.csv`` and ``.csv.gz`` alike (gzip is recognised by its
magic bytes), detects the format from the first non-blank line, parses the
file with vectorised pandas operations, converts the source's clock to UTC,
and cleans the result (``market_data.cleaning``). Formats:

``mt5``       the MT5 terminal's "Export bars": tab-separated (comma or
              semicolon also accepted), usually CRLF, header
              ``<DATE> <TIME> <OPEN> <HIGH> <LOW> <CLOSE> <TICKVOL> <VOL>
              <SPREAD>``, dates ``2025.01.02``, times ``01:05:00`` or
              ``01:05``. Times are the broker server's wall clock, converted
              with ``server_timezone``. A daily export without ``<TIME>`` is
              read as bars opening at 00:00 server time.
``histdata``  HistData.com generic ASCII M1: no header,
              ``20230102 170000;1.07011;1.07020;1.07005;1.07012;0`` (the last
              field is the volume, stored as tick volume), converted from
              ``histdata_timezone`` (HistData claims fixed EST, ``Etc/GMT+5``;
              check it: see market_data/timezones.py for the clock names).
``plain``     a CSV header ``time,open,high,low,close,volume[,spread]``
              (``tick_volume`` and ``real_volume`` also accepted; ``volume``
              is the tick volume unless ``tick_volume`` is also present, when
              it is the real volume). ``time`` is ISO-8601 (``Z`` or an offset
              is converted; no zone means UTC) or epoch seconds.

Lines with the wrong number of fields or a value or time that does not
parse are rejected with reason ``unparseable``, logged at debug level with
their line number, and the load goes on; the count is part of the
``CleaningReport``. A missing file, an unrecognised first line, or a file
without a single usable bar raises ``DataFileError`` (a ``ValueError`` whose
message names the file and the fix; the CLI exits 2 on it).
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import structlog

from config.settings import TIMEFRAME_SECONDS
from market_data.cleaning import CleaningReport, clean_bars
from market_data.timezones import parse_timezone, to_utc

log = structlog.get_logger(__name__)

FORMATS: tuple[str, ...] = ("mt5", "histdata", "plain")
GZIP_MAGIC = b"\x1f\x8b"
MAX_UNPARSEABLE_LOGGED = 200

_HISTDATA_FIRST = re.compile(r"^\s*\d{8} \d{6};")
_MT5_COLUMNS = {
    "<DATE>": "date",
    "<TIME>": "clock",
    "<OPEN>": "open",
    "<HIGH>": "high",
    "<LOW>": "low",
    "<CLOSE>": "close",
    "<TICKVOL>": "tick_volume",
    "<VOL>": "real_volume",
    "<SPREAD>": "spread",
}
_PLAIN_ALIASES = {
    "time": "time",
    "timestamp": "time",
    "datetime": "time",
    "open": "open",
    "high": "high",
    "low": "low",
    "close": "close",
    "tick_volume": "tick_volume",
    "tickvol": "tick_volume",
    "real_volume": "real_volume",
    "spread": "spread",
}
_EXPECTED_FIRST_LINE = (
    "expected an MT5 'Export bars' header (<DATE>\\t<TIME>\\t<OPEN>\\t<HIGH>\\t<LOW>\\t<CLOSE>"
    "\\t<TICKVOL>\\t<VOL>\\t<SPREAD>), HistData generic ASCII M1 rows "
    "(20230102 170000;1.07011;1.07020;1.07005;1.07012;0) or a CSV header "
    "time,open,high,low,close,volume"
)


class DataFileError(ValueError):
    """A data file that cannot be used: the message names the file and the fix."""


@dataclass(frozen=True, eq=False)
class LoadResult:
    frame: pd.DataFrame
    report: CleaningReport
    fmt: str
    timeframe_s: int

    @property
    def timeframe(self) -> str:
        return timeframe_label(self.timeframe_s)


def timeframe_label(seconds: int) -> str:
    """``"M5"`` for 300, or ``"<n>s"`` for a spacing that has no name."""
    for name, value in TIMEFRAME_SECONDS.items():
        if value == seconds:
            return name
    if seconds % 86_400 == 0:
        return f"D{seconds // 86_400}"
    return f"{seconds}s"


def load_bars(
    path: str | Path,
    *,
    server_timezone: str = "UTC",
    histdata_timezone: str = "Etc/GMT+5",
    fmt: str = "auto",
    timeframe: str | None = None,
) -> LoadResult:
    """Load, convert to UTC and clean one bar file. Raises ``DataFileError``."""
    started = time.perf_counter()
    file = Path(path)
    source = str(file)
    requested_s = _timeframe_seconds(timeframe, source)
    if fmt not in ("auto", *FORMATS):
        raise DataFileError(
            f"{source}: unknown format {fmt!r}; use 'auto' or one of {', '.join(FORMATS)}"
        )
    for name, zone in (
        ("server_timezone", server_timezone),
        ("histdata_timezone", histdata_timezone),
    ):
        try:
            parse_timezone(zone)
        except ValueError as exc:
            raise DataFileError(f"{source}: {name}: {exc}") from None

    text = _read_text(file)
    first = text.first_line()
    if first is None:
        raise DataFileError(f"{source}: the file is empty; export the bars again")
    detected = _detect_format(first)
    if detected is None:
        raise DataFileError(
            f"{source}: unrecognised first line {first[:80]!r}; {_EXPECTED_FIRST_LINE}"
        )
    if fmt != "auto" and fmt != detected:
        raise DataFileError(
            f"{source}: format {fmt!r} was requested but the first line {first[:80]!r} "
            f"looks like {detected!r}; pass fmt='auto' or the right format"
        )

    if detected == "mt5":
        raw, rejected_lines = _parse_mt5(text, first, source, server_timezone)
    elif detected == "histdata":
        raw, rejected_lines = _parse_histdata(text, source, histdata_timezone)
    else:
        raw, rejected_lines = _parse_plain(text, first, source)

    frame, report = clean_bars(
        raw, source=source, timeframe_s=None, pre_rejected={"unparseable": rejected_lines}
    )
    if report.rows_out == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.rejected.items())) or "none"
        raise DataFileError(
            f"{source}: no usable bars ({report.rows_in} data rows, rejected {reasons}); "
            f"check that it is a {detected} bar file with prices in the expected columns"
        )
    inferred = report.spacing_s
    if requested_s is not None and inferred is not None and requested_s != inferred:
        raise DataFileError(
            f"{source}: timeframe {timeframe_label(requested_s)} ({requested_s} s) was "
            f"requested but the data's own bar spacing is {timeframe_label(inferred)} "
            f"({inferred} s); set the timeframe to {timeframe_label(inferred)} "
            "(trading.timeframe for the daemon, --timeframe for a backtest) or use data "
            f"with {timeframe_label(requested_s)} bars"
        )
    spacing = requested_s if requested_s is not None else inferred
    if spacing is None:
        raise DataFileError(
            f"{source}: one bar cannot tell its own spacing; pass the timeframe (M1, M5, ...)"
        )
    if report.spacing_s != spacing:
        report = replace(report, spacing_s=spacing)
    log.info(
        "bars_loaded",
        source=source,
        fmt=detected,
        rows=report.rows_out,
        timeframe=timeframe_label(spacing),
        first=frame["time"].iloc[0].isoformat(),
        last=frame["time"].iloc[-1].isoformat(),
        seconds=round(time.perf_counter() - started, 3),
    )
    return LoadResult(frame=frame, report=report, fmt=detected, timeframe_s=spacing)


# -- reading ----------------------------------------------------------------------------


def _timeframe_seconds(timeframe: str | None, source: str) -> int | None:
    if timeframe is None:
        return None
    key = timeframe.strip().upper()
    if key not in TIMEFRAME_SECONDS:
        raise DataFileError(
            f"{source}: unknown timeframe {timeframe!r}; use one of "
            f"{', '.join(TIMEFRAME_SECONDS)} or leave it out to use the data's own spacing"
        )
    return TIMEFRAME_SECONDS[key]


class _Text:
    """A file's bytes (UTF-8, ``\\n`` line ends) with its line boundaries, found by numpy."""

    def __init__(self, data: bytes) -> None:
        if not data.endswith(b"\n"):
            data += b"\n"
        self.data = data
        self.array = np.frombuffer(data, dtype=np.uint8)
        self.ends = np.flatnonzero(self.array == ord("\n"))
        self.starts = np.concatenate(([0], self.ends[:-1] + 1))
        lengths = self.ends - self.starts
        self.blank = lengths == 0
        short = np.flatnonzero((lengths > 0) & (lengths <= 16))
        for index in short:
            if not data[self.starts[index] : self.ends[index]].strip():
                self.blank[index] = True
        nonblank = np.flatnonzero(~self.blank)
        self.first_index = int(nonblank[0]) if nonblank.size else None

    def line(self, index: int) -> str:
        return self.data[self.starts[index] : self.ends[index]].decode("utf-8", errors="replace")

    def first_line(self) -> str | None:
        if self.first_index is None:
            return None
        return self.line(self.first_index).strip()

    def split(
        self, body_from: int, sep: str, n_fields: int, text_columns: tuple[int, ...], source: str
    ) -> tuple[pd.DataFrame, int]:
        """Fields of the non-blank lines from line ``body_from`` on (0-based).

        The result's index is the 1-based line number. Lines with another
        number of fields are rejected (logged) and counted. Numeric columns
        come back as numbers where the whole column parses (fast path) and as
        strings otherwise; ``text_columns`` always as strings.
        """
        n_lines = self.ends.size
        separators = np.flatnonzero(self.array == ord(sep))
        counts = np.bincount(np.searchsorted(self.ends, separators), minlength=n_lines)
        in_body = np.arange(n_lines) >= body_from
        good = in_body & ~self.blank & (counts[:n_lines] == n_fields - 1)
        bad = np.flatnonzero(in_body & ~self.blank & ~good)
        _log_unparseable(
            source,
            [(int(i) + 1, self.line(int(i))) for i in bad[:MAX_UNPARSEABLE_LOGGED]],
            int(bad.size),
            "wrong number of fields",
        )
        good_index = np.flatnonzero(good)
        if good_index.size == 0:
            empty = pd.DataFrame({i: pd.Series([], dtype=object) for i in range(n_fields)})
            return empty, int(bad.size)
        lengths = self.ends - self.starts + 1
        if good_index.size == n_lines:
            buffer = self.data
        else:
            buffer = self.array[np.repeat(good, lengths)].tobytes()
        fields = pd.read_csv(
            io.BytesIO(buffer),
            sep=sep,
            header=None,
            names=list(range(n_fields)),
            dtype={i: str for i in text_columns},
            quoting=csv.QUOTE_NONE,
            skipinitialspace=True,
            skip_blank_lines=False,
            engine="c",
            encoding="utf-8",
            encoding_errors="replace",
        )
        if len(fields) != good_index.size:  # pragma: no cover - guarded by the field count
            raise DataFileError(f"{source}: lines and parsed rows disagree; report this file")
        fields.index = pd.Index(good_index + 1)
        return fields, int(bad.size)


def _read_text(file: Path) -> _Text:
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise DataFileError(
            f"{file}: file not found; check the path (paper.data / --data)"
        ) from None
    except IsADirectoryError:
        raise DataFileError(f"{file}: is a directory; name a .csv or .csv.gz file") from None
    except OSError as exc:
        raise DataFileError(f"{file}: cannot read the file ({exc})") from None
    if data.startswith(GZIP_MAGIC):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataFileError(
                f"{file}: corrupt or truncated gzip data ({exc}); download or export it again"
            ) from None
    elif file.suffix.lower() == ".gz":
        log.warning("gz_file_not_compressed", source=str(file))
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        data = data.decode("utf-16", errors="replace").encode("utf-8")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return _Text(data)


def _detect_format(first: str) -> str | None:
    upper = first.upper()
    if upper.startswith("<DATE>"):
        return "mt5"
    if _HISTDATA_FIRST.match(first):
        return "histdata"
    names = [n.strip().strip('"').lower() for n in re.split(r"[,;\t]", first)]
    mapped = {_PLAIN_ALIASES.get(n, n) for n in names}
    if {"time", "open", "high", "low", "close"} <= mapped:
        return "plain"
    return None


def _numbers(fields: pd.DataFrame, columns: dict[str, int]) -> dict[str, pd.Series]:
    out: dict[str, pd.Series] = {}
    for name, index in columns.items():
        column = fields[index]
        if not pd.api.types.is_numeric_dtype(column.dtype):
            column = pd.to_numeric(column, errors="coerce")
        out[name] = column.astype("float64")
    return out


def _finish(
    fields: pd.DataFrame,
    times: pd.Series,
    numbers: dict[str, pd.Series],
    source: str,
    text: _Text,
) -> tuple[pd.DataFrame, int]:
    """Drop rows whose time or numbers did not parse; return the frame and the count."""
    bad = times.isna().to_numpy().copy()
    for series in numbers.values():
        bad |= ~np.isfinite(series.to_numpy(dtype=np.float64, na_value=np.nan))
    bad_lines = fields.index[bad]
    _log_unparseable(
        source,
        [(int(n), text.line(int(n) - 1)) for n in bad_lines[:MAX_UNPARSEABLE_LOGGED]],
        int(bad.sum()),
        "a value or the time does not parse",
    )
    frame = pd.DataFrame({"time": times, **numbers}, index=fields.index)
    return frame[~bad], int(bad.sum())


def _log_unparseable(source: str, rows: list[tuple[int, str]], total: int, why: str) -> None:
    for line_no, line in rows:
        log.debug(
            "bar_rejected",
            source=source,
            row=str(line_no),
            reason="unparseable",
            why=why,
            text=line[:120],
        )
    if total > len(rows):
        log.debug(
            "bar_rejected_not_listed", source=source, reason="unparseable", rows=total - len(rows)
        )


# -- formats ----------------------------------------------------------------------------


def _parse_mt5(
    text: _Text, header: str, source: str, server_timezone: str
) -> tuple[pd.DataFrame, int]:
    sep = next((s for s in ("\t", ";", ",") if s in header), "\t")
    names = [n.strip().upper() for n in header.split(sep)]
    if any(n in names for n in ("<BID>", "<ASK>", "<LAST>")):
        raise DataFileError(
            f"{source}: this is an MT5 tick export; export bars instead "
            "(Symbols > Bars > Export Bars in the terminal)"
        )
    unknown = [n for n in names if n not in _MT5_COLUMNS]
    required = ["<DATE>", "<OPEN>", "<HIGH>", "<LOW>", "<CLOSE>"]
    missing = [n for n in required if n not in names]
    if unknown or missing:
        raise DataFileError(
            f"{source}: MT5 header {header[:100]!r} has "
            + (f"unknown column(s) {', '.join(unknown)}" if unknown else "")
            + ("; " if unknown and missing else "")
            + (f"no {', '.join(missing)}" if missing else "")
            + "; export bars from the MT5 terminal unchanged"
        )
    position = {_MT5_COLUMNS[n]: i for i, n in enumerate(names)}
    text_columns = tuple(position[k] for k in ("date", "clock") if k in position)
    assert text.first_index is not None
    fields, wrong_count = text.split(text.first_index + 1, sep, len(names), text_columns, source)
    numeric = {
        k: v
        for k, v in position.items()
        if k in ("open", "high", "low", "close", "tick_volume", "real_volume", "spread")
    }
    numbers = _numbers(fields, numeric)
    dates = fields[position["date"]]
    date_sep = _date_separator(dates)
    date_format = f"%Y{date_sep}%m{date_sep}%d"
    if "clock" in position:
        stamps = dates + " " + fields[position["clock"]]
        naive = pd.to_datetime(stamps, format=f"{date_format} %H:%M:%S", errors="coerce")
        retry = naive.isna()
        if retry.any():
            naive[retry] = pd.to_datetime(
                stamps[retry], format=f"{date_format} %H:%M", errors="coerce"
            )
    else:
        naive = pd.to_datetime(dates, format=date_format, errors="coerce")
    times = to_utc(naive.astype("datetime64[ns]"), server_timezone)
    frame, unparseable = _finish(fields, times, numbers, source, text)
    return frame, wrong_count + unparseable


def _date_separator(dates: pd.Series) -> str:
    sample = dates.iloc[0] if len(dates) else "2000.01.01"
    for sep in (".", "-", "/"):
        if sep in sample:
            return sep
    return "."


def _parse_histdata(text: _Text, source: str, histdata_timezone: str) -> tuple[pd.DataFrame, int]:
    assert text.first_index is not None
    fields, wrong_count = text.split(text.first_index, ";", 6, (0,), source)
    numbers = _numbers(fields, {"open": 1, "high": 2, "low": 3, "close": 4, "tick_volume": 5})
    naive = pd.to_datetime(fields[0], format="%Y%m%d %H%M%S", errors="coerce")
    times = to_utc(naive.astype("datetime64[ns]"), histdata_timezone)
    frame, unparseable = _finish(fields, times, numbers, source, text)
    return frame, wrong_count + unparseable


def _parse_plain(text: _Text, header: str, source: str) -> tuple[pd.DataFrame, int]:
    sep = next((s for s in (",", ";", "\t") if s in header), ",")
    names = [n.strip().strip('"').lower() for n in header.split(sep)]
    columns: dict[str, int] = {}
    has_tick = any(_PLAIN_ALIASES.get(n) == "tick_volume" for n in names)
    for index, name in enumerate(names):
        if name in ("volume", "vol"):
            target = "real_volume" if has_tick else "tick_volume"
        else:
            target = _PLAIN_ALIASES.get(name, "")
        if not target:
            log.info("column_ignored", source=source, column=name)
            continue
        if target in columns:
            raise DataFileError(
                f"{source}: header {header[:100]!r} names {target!r} twice; keep one column"
            )
        columns[target] = index
    assert text.first_index is not None
    fields, wrong_count = text.split(
        text.first_index + 1, sep, len(names), (columns["time"],), source
    )
    numbers = _numbers(fields, {k: v for k, v in columns.items() if k != "time"})
    times = _plain_times(fields[columns["time"]])
    frame, unparseable = _finish(fields, times, numbers, source, text)
    return frame, wrong_count + unparseable


def _plain_times(text: pd.Series) -> pd.Series:
    """ISO-8601 (zone converted, naive = UTC) or epoch seconds, decided per file."""
    if text.empty:
        return pd.Series([], dtype="datetime64[ns, UTC]", index=text.index)
    sample = pd.to_numeric(text.dropna().iloc[:1000], errors="coerce")
    if len(sample) and sample.notna().mean() > 0.5:
        numeric = pd.to_numeric(text, errors="coerce")
        return pd.to_datetime(numeric, unit="s", utc=True, errors="coerce").dt.as_unit("ns")
    parsed = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
    return parsed.dt.as_unit("ns")
