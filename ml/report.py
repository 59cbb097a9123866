"""The journal report: one self-contained HTML page (charts inline) and a terminal summary.

``build_report(journal)`` reads a journal (live, paper or backtest) read-only in
one short read transaction, so a running daemon keeps writing and a journal
whose writer was killed reports what was committed. Trading metrics come from
:mod:`ml.metrics`; journaled predictions are labelled with
:mod:`strategy.labels` exactly as training labels bars (forward move over
``models.horizon_bars`` against ``models.label_threshold_atr`` x the bar's
ATR) when price bars are at hand. The page is ``<journal stem>.html`` beside
the journal, the PNGs go to ``<stem>_charts/``; nothing reaches the network.
matplotlib is imported only while charts are drawn (``ml.report_charts``).
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from config.settings import (
    TIMEFRAME_SECONDS,
    BrokerSettings,
    ModelsSettings,
    PaperSettings,
    Settings,
    TradingSettings,
)
from market_data.loaders import DataFileError, load_bars
from market_data.synthetic import paper_market
from ml.metrics import EquityMetrics, TradeMetrics, equity_metrics, trade_metrics
from strategy.features import DEFAULT_PARAMS, BarColumns, atr_series
from strategy.labels import CLASSES, UNLABELLED, make_labels
from utils.clock import SystemClock, iso_utc, parse_iso_utc
from utils.trade_journal import Journal, JournalError

# Events whose details carry {"settings": Settings.public_dict()}.
SETTINGS_EVENTS: Final = ("daemon_started", "backtest_started")
# A synthetic history longer than this is not regenerated (about 5 s of CPU).
MAX_SYNTHETIC_BARS: Final = 5_000_000
# Equity metrics use daily closes from this span on, hourly closes below it.
DAILY_FROM: Final = timedelta(days=30)
# FX trades five days a week around the clock.
TRADING_DAYS_PER_YEAR: Final = 260
TABLE_ROWS_MAX: Final = 300
CALIBRATION_BINS: Final = 8
SUMMARY_WIDTH: Final = 100
NO_PREDICTIONS: Final = "no predictions in the journal"
CHART_NAMES: Final = (
    "equity.png",
    "trades.png",
    "prediction_hit_rate.png",
    "calibration.png",
    "model_timeline.png",
)
_MONTHS: Final = (
    *("Jan", "Feb", "Mar", "Apr", "May", "Jun"),
    *("Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
)
_PROBA: Final = ("p_down", "p_flat", "p_up")
# model_events event -> timeline category (ml.report_charts.EVENT_STYLES); None: not drawn.
_EVENT_CATEGORY: Final[Mapping[str, str | None]] = {
    "registered": "trained",
    "trained": "trained",
    "validated": "validated",
    "rejected": "rejected",
    "shadow_rejected": "rejected",
    "swap_failed": "rejected",
    "shadow_started": "shadow",
    "shadow_waiting": "shadow",
    "shadow": "shadow",
    "promoted": "promoted",
    "auto_promoted": "promoted",
    "shadow_promoted": "promoted",
    "swapped": "swapped",
    "rolled_back": "rolled_back",
    "auto_rolled_back": "rolled_back",
    "drift": "drift",
    "drift_alarm": "drift",
    "integrity_failed": "integrity",
    "fallback": "integrity",
    # Routine bookkeeping: in the table, not on the chart.
    "drift_check": None,
    "stage_changed": None,
    "leftover_removed": None,
    "retention_deleted": None,
}


class ReportError(Exception):
    """The report cannot be made: the message names the file and the fix (CLI exit 2)."""


# -- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelQuality:
    """How one model's journaled predictions fared against the labels of their bars.

    ``hit_rate``: share of labelled bars whose most likely class (``argmax``,
    ties to the lower class) was the label. ``best_constant``: the hit rate of
    always answering the most frequent label of those bars (hindsight baseline).
    ``log_loss``: mean ``-ln p[label]``. ``calibration_error``: the expected
    calibration error of the max-probability over ``CALIBRATION_BINS`` bins.
    """

    symbol: str
    model: str
    stage: str
    versions: tuple[str, ...]
    predictions: int
    labelled: int
    hit_rate: float
    best_constant: float
    log_loss: float
    mean_confidence: float
    calibration_error: float

    @property
    def name(self) -> str:
        return (
            self.model
            if self.stage in ("production", self.model)
            else f"{self.model} [{self.stage}]"
        )


@dataclass(frozen=True)
class ReportStats:
    """The numbers the page and the terminal summary show."""

    journal: Path
    generated: datetime
    broker: str
    symbols: tuple[str, ...]
    period_start: datetime | None
    period_end: datetime | None
    bars: int | None
    bars_source: str
    closed_trades: int
    open_trades: int
    wins: int  # closed trades with net P&L > 0
    losses: int  # closed trades with net P&L < 0
    trades: TradeMetrics
    equity: EquityMetrics | None
    equity_source: str
    equity_period: str  # how equity is sampled for the metrics: "daily", "hourly", "6-hourly"
    equity_period_hours: int  # 24 for daily closes (trading days), else the bucket length
    max_drawdown_snapshots: float | None  # over every equity point, not only period closes
    exposure_basis: str  # how the bars of the period were counted for the exposure
    monthly_returns: Mapping[tuple[int, int], float]
    promoted: int
    rejected: int
    rolled_back: int
    drift_alarms: int
    alerts: int
    prediction_quality: tuple[ModelQuality, ...]
    prediction_note: str  # why there is no prediction quality ("" when there is)


@dataclass(frozen=True)
class ReportResult:
    html_path: Path
    png_paths: tuple[Path, ...]
    summary: str
    stats: ReportStats


# -- reading the journal ----------------------------------------------------------------

_TABLE_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    "trades": (
        "id",
        "symbol",
        "side",
        "volume",
        "open_time",
        "status",
        "close_time",
        "close_reason",
        "net_profit",
        "bars_held",
        "mode",
    ),
    "equity": ("id", "time", "balance", "equity"),
    "predictions": ("id", "bar_time", "symbol", "model", "version", "stage", *_PROBA),
    "model_events": ("id", "time", "symbol", "kind", "version", "event", "details_json"),
    "training_runs": ("id", "started", "finished", "symbol", "kind", "version", "status", "error"),
    "events": ("id", "time", "level", "kind", "message", "details_json"),
}
_TIME_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    "trades": ("open_time", "close_time"),
    "equity": ("time",),
    "predictions": ("bar_time",),
    "model_events": ("time",),
    "training_runs": ("started", "finished"),
    "events": ("time",),
}


@dataclass(frozen=True)
class _Snapshot:
    path: Path
    schema_version: int
    tables: Mapping[str, pd.DataFrame]
    settings: Mapping[str, Any]
    settings_event: str  # the event kind the settings came from ("" when none)
    settings_note: str


_RESTORE: Final = (
    "restore it from a backup (the daemon keeps <journal>.v<N>.bak before migrations) or "
    "report on another file"
)


def _fix() -> str:
    return (
        "pass --journal PATH of a journal the daemon or a backtest wrote "
        f"(the daemon's is storage.journal_path, backtests' are under {Path('data', 'backtests')})"
    )


def _read_journal(path: Path) -> _Snapshot:
    """Every table the report needs, read in one read transaction, then the file is closed."""
    if not path.exists():
        raise ReportError(f"{path}: no such journal; {_fix()}")
    if path.is_dir():
        raise ReportError(f"{path} is a directory, not a journal file; {_fix()}")
    try:
        conn = Journal.open_reader(path)
    except JournalError as exc:
        # The journal's own hint (storage.journal_path) is for the daemon, not for a report.
        why = str(exc).replace(
            "; set storage.journal_path to another file (or move this one away)", ""
        )
        if not why.startswith(str(path)):
            why = f"{path}: {why}"
        if isinstance(exc.__cause__, sqlite3.DatabaseError):
            raise ReportError(f"{why} It is damaged or truncated: {_RESTORE}.") from None
        raise ReportError(f"{why} To report, {_fix()}.") from None
    except sqlite3.Error as exc:
        raise ReportError(f"{path} cannot be opened as a journal ({exc}); {_fix()}") from None
    try:
        conn.execute("BEGIN")  # one snapshot for every table; WAL never blocks the writer
        problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            text = "; ".join(problems)[:300]
            raise ReportError(f"{path} is damaged (PRAGMA quick_check: {text}); {_RESTORE}")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        present = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master")}
        tables: dict[str, pd.DataFrame] = {}
        for table, columns in _TABLE_COLUMNS.items():
            rows: list[tuple[Any, ...]] = []
            if table in present:
                sql = f"SELECT {', '.join(columns)} FROM {table} ORDER BY id"  # noqa: S608 - constants
                rows = conn.execute(sql).fetchall()
            frame = pd.DataFrame.from_records(rows, columns=list(columns))
            for column in _TIME_COLUMNS[table]:
                frame[column] = _parse_times(frame[column])
            tables[table] = frame
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        raise ReportError(
            f"{path} cannot be read ({exc}): the file is damaged or truncated; {_RESTORE}"
        ) from None
    finally:
        conn.close()
    settings, event, note = _journaled_settings(tables["events"])
    return _Snapshot(path, version, tables, settings, event, note)


def _parse_times(values: pd.Series) -> pd.Series:
    """Journal times (ISO-8601 UTC, with or without a fraction) to UTC timestamps."""
    return pd.to_datetime(values, utc=True, format="ISO8601", errors="coerce").astype(
        "datetime64[ns, UTC]"
    )


def _details(text: object) -> object:
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


_LABEL_KEYS: Final = (
    ("paper", "data"),
    ("paper", "synthetic_seed"),
    ("paper", "synthetic_start"),
    ("trading", "symbols"),
    ("trading", "timeframe"),
    ("models", "horizon_bars"),
    ("models", "label_threshold_atr"),
)


def _journaled_settings(events: pd.DataFrame) -> tuple[dict[str, Any], str, str]:
    """The settings of the latest start event, its kind, and a note on where they came from."""
    found: list[tuple[pd.Timestamp, str, dict[str, Any]]] = []
    for row in events.itertuples(index=False):
        if row.kind not in SETTINGS_EVENTS:
            continue
        details = _details(row.details_json)
        if isinstance(details, dict) and isinstance(details.get("settings"), dict):
            found.append((row.time, str(row.kind), details["settings"]))
    if not found:
        return (
            {},
            "",
            "no daemon_started event with settings in the journal: the settings' defaults "
            "are assumed",
        )
    when, kind, settings = found[-1]
    note = f"settings from the {kind} event of {_when(when)}"
    changed = [
        f"{section}.{key}"
        for section, key in _LABEL_KEYS
        if len({json.dumps(_get(s, section, key), sort_keys=True) for _, _, s in found}) > 1
    ]
    if changed:
        note += f" (changed between runs: {', '.join(changed)}; the latest values are used)"
    return settings, kind, note


def _get(settings: Mapping[str, Any], section: str, key: str, default: Any = None) -> Any:
    part = settings.get(section)
    if isinstance(part, Mapping) and key in part:
        return part[key]
    return default


@dataclass(frozen=True)
class _Params:
    """The settings the report needs, journaled values first, then the defaults."""

    broker: str
    symbols: tuple[str, ...]
    timeframe: str
    timeframe_s: int
    horizon: int
    threshold_atr: float
    initial_balance: float
    initial_balance_known: bool
    data: str
    synthetic_seed: int
    synthetic_start: str
    server_timezone: str
    symbol_specs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def _params(settings: Mapping[str, Any]) -> _Params:
    paper, trading, models, broker = (
        PaperSettings(),
        TradingSettings(),
        ModelsSettings(),
        BrokerSettings(),
    )
    timeframe = str(_get(settings, "trading", "timeframe", trading.timeframe))
    symbols = _get(settings, "trading", "symbols", trading.symbols)
    specs = settings.get("symbols")
    if not isinstance(specs, Mapping):
        specs = Settings.model_fields["symbols"].get_default(call_default_factory=True)
        specs = {k: v.model_dump() for k, v in specs.items()}
    balance = _get(settings, "paper", "initial_balance")
    return _Params(
        broker=str(_get(settings, "broker", "kind", "unknown")),
        symbols=tuple(str(s) for s in symbols) if isinstance(symbols, list | tuple) else (),
        timeframe=timeframe,
        timeframe_s=TIMEFRAME_SECONDS.get(timeframe, 60),
        horizon=int(_get(settings, "models", "horizon_bars", models.horizon_bars)),
        threshold_atr=float(
            _get(settings, "models", "label_threshold_atr", models.label_threshold_atr)
        ),
        initial_balance=float(balance if balance is not None else paper.initial_balance),
        initial_balance_known=balance is not None,
        data=str(_get(settings, "paper", "data", paper.data)),
        synthetic_seed=int(_get(settings, "paper", "synthetic_seed", paper.synthetic_seed)),
        synthetic_start=str(_get(settings, "paper", "synthetic_start", paper.synthetic_start)),
        server_timezone=str(_get(settings, "broker", "server_timezone", broker.server_timezone)),
        symbol_specs={str(k): v for k, v in specs.items() if isinstance(v, Mapping)},
    )


# -- price bars for prediction outcomes ---------------------------------------------------


def bars_for_report(
    settings: Mapping[str, Any], *, until: datetime | None = None
) -> dict[str, pd.DataFrame] | None:
    """The paper run's price bars per symbol, rebuilt from its journaled settings, or None.

    ``settings`` is ``Settings.public_dict()`` as the ``daemon_started`` event
    journals it. ``paper.data = "synthetic"`` regenerates the embedded market
    exactly as ``main._replay_sources`` builds it (same seeds, start, point and
    spread), from its start up to ``until`` (the last bar time needed; None:
    the first ``CHUNK_BARS`` bars); a CSV path (``{symbol}`` pattern allowed)
    is loaded with ``load_bars`` when the file exists. None for live brokers
    (their bars are not journaled), missing files and unusable data.
    """
    bars, _why = _bars_with_reason(settings, until)
    return bars


def _bars_with_reason(
    settings: Mapping[str, Any], until: datetime | None
) -> tuple[dict[str, pd.DataFrame] | None, str]:
    if not settings:
        return None, "the journal holds no daemon_started settings to rebuild them from"
    p = _params(settings)
    if p.broker not in ("paper", "backtest"):
        return None, (
            f"broker.kind is {p.broker!r}: a live account's bars are not kept in the journal"
        )
    if not p.symbols:
        return None, "the journaled settings name no trading.symbols"
    if p.data == "synthetic":
        return _synthetic_bars(p, until), ""
    if "{symbol}" not in p.data and len(p.symbols) > 1:
        return None, f"paper.data = {p.data!r} is one file for {len(p.symbols)} symbols"
    out: dict[str, pd.DataFrame] = {}
    for symbol in p.symbols:
        path = Path(p.data.replace("{symbol}", symbol))
        if not path.is_file():
            return None, f"paper.data file {path} is not there (run the report where it is)"
        try:
            loaded = load_bars(path, server_timezone=p.server_timezone, timeframe=p.timeframe)
        except DataFileError as exc:
            return None, str(exc)
        out[symbol] = loaded.frame
    return out, ""


def _synthetic_bars(p: _Params, until: datetime | None) -> dict[str, pd.DataFrame]:
    start = parse_iso_utc(p.synthetic_start)
    out: dict[str, pd.DataFrame] = {}
    for index, symbol in enumerate(p.symbols):
        spec = p.symbol_specs.get(symbol, {})
        market = paper_market(
            symbol,
            index=index,
            seed=p.synthetic_seed,
            start=start,
            timeframe_s=p.timeframe_s,
            point=float(spec.get("point", 0.00001)),
            default_spread_points=int(spec.get("default_spread_points", 10)),
        )
        frames: list[pd.DataFrame] = []
        count = 0
        for frame in market.iter_frames():
            frames.append(frame)
            count += len(frame)
            if until is None or frame["time"].iloc[-1] >= until or count >= MAX_SYNTHETIC_BARS:
                break
        out[symbol] = pd.concat(frames, ignore_index=True)
    return out


def label_predictions(
    predictions: pd.DataFrame,
    bars: Mapping[str, pd.DataFrame],
    *,
    horizon: int,
    threshold_atr: float,
    atr_period: int | None = None,
) -> pd.DataFrame:
    """The predictions with their outcome: ``label``, ``predicted``, ``confidence``, ``hit``.

    ``predictions`` has ``symbol``, ``bar_time`` (UTC) and ``p_down/p_flat/p_up``;
    ``bars`` maps a symbol to its bar frame (``time`` UTC, ``open/high/low/close``).
    The label of a prediction is the training label of its bar
    (``strategy.labels.make_labels`` over the whole frame with the ``atr``
    feature's ATR, ``atr_period`` defaulting to the feature spec's). ``label``
    is -1 where it cannot be known: the bar is not in ``bars`` or is one of the
    last ``horizon`` bars. ``in_bars`` says whether the bar was found.
    """
    out = predictions.copy()
    proba = out[list(_PROBA)].to_numpy(dtype=np.float64)
    out["predicted"] = proba.argmax(axis=1) if len(out) else np.zeros(0, dtype=np.int64)
    out["confidence"] = proba.max(axis=1) if len(out) else np.zeros(0)
    labels = np.full(len(out), UNLABELLED, dtype=np.int8)
    found = np.zeros(len(out), dtype=bool)
    when = pd.DatetimeIndex(out["bar_time"]).as_unit("ns").asi8
    symbols = out["symbol"].to_numpy()
    period = int(atr_period if atr_period is not None else DEFAULT_PARAMS["atr_period"])
    for symbol in np.unique(symbols):
        frame = bars.get(str(symbol))
        if frame is None or frame.empty:
            continue
        cols = BarColumns.from_frame(frame)
        y = make_labels(
            cols.close, atr_series(cols, period), horizon=horizon, threshold_atr=threshold_atr
        )
        rows = np.flatnonzero(symbols == symbol)
        pos = np.searchsorted(cols.time_ns, when[rows])
        inside = pos < len(cols)
        match = np.zeros(rows.size, dtype=bool)
        match[inside] = cols.time_ns[pos[inside]] == when[rows][inside]
        labels[rows[match]] = y[pos[match]]
        found[rows[match]] = True
    out["label"] = labels
    out["in_bars"] = found
    out["hit"] = (labels >= 0) & (out["predicted"].to_numpy() == labels)
    return out


def _quality(labelled: pd.DataFrame) -> list[ModelQuality]:
    out: list[ModelQuality] = []
    for (symbol, model, stage), group in labelled.groupby(["symbol", "model", "stage"], sort=True):
        known = group[group["label"] >= 0]
        n = len(known)
        versions = tuple(dict.fromkeys(str(v) for v in group["version"]))
        if n:
            y = known["label"].to_numpy(dtype=np.int64)
            proba = known[list(_PROBA)].to_numpy(dtype=np.float64)
            p_true = proba[np.arange(n), y]
            counts = np.bincount(y, minlength=len(CLASSES))
            hit = float(known["hit"].mean())
            best = float(counts.max()) / n
            loss = float(np.mean(-np.log(np.maximum(p_true, 1e-12))))
            conf = float(known["confidence"].mean())
            ece = _calibration_error(known)
        else:
            hit = best = loss = conf = ece = math.nan
        out.append(
            ModelQuality(
                symbol=str(symbol),
                model=str(model),
                stage=str(stage),
                versions=versions,
                predictions=len(group),
                labelled=n,
                hit_rate=hit,
                best_constant=best,
                log_loss=loss,
                mean_confidence=conf,
                calibration_error=ece,
            )
        )
    return out


def _calibration_bins(known: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty bin of the max-probability: mean confidence, hit frequency, count."""
    confidence = known["confidence"].to_numpy(dtype=np.float64)
    hits = known["hit"].to_numpy(dtype=np.float64)
    edges = np.linspace(1.0 / 3.0, 1.0, CALIBRATION_BINS + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, CALIBRATION_BINS - 1)
    counts = np.bincount(index, minlength=CALIBRATION_BINS).astype(np.float64)
    used = counts > 0
    mean_conf = np.bincount(index, weights=confidence, minlength=CALIBRATION_BINS)[used]
    mean_hit = np.bincount(index, weights=hits, minlength=CALIBRATION_BINS)[used]
    return mean_conf / counts[used], mean_hit / counts[used], counts[used]


def _calibration_error(known: pd.DataFrame) -> float:
    conf, freq, counts = _calibration_bins(known)
    return float(np.sum(counts / counts.sum() * np.abs(freq - conf)))


# -- equity and trades ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Equity:
    times: pd.DatetimeIndex
    equity: np.ndarray
    balance: np.ndarray | None
    source: str


def _equity_curve(tables: Mapping[str, pd.DataFrame], p: _Params) -> _Equity | None:
    eq = tables["equity"].dropna(subset=["time", "equity"])
    if len(eq):
        eq = eq.sort_values(["time", "id"], kind="stable")
        return _Equity(
            pd.DatetimeIndex(eq["time"]),
            eq["equity"].to_numpy(dtype=np.float64),
            eq["balance"].to_numpy(dtype=np.float64),
            "equity snapshots",
        )
    closed = _closed_trades(tables["trades"])
    if closed.empty:
        return None
    start = min(closed["open_time"].min(), closed["close_time"].min())
    times = pd.DatetimeIndex([start, *closed["close_time"]])
    balance = p.initial_balance + np.concatenate(
        [[0.0], np.cumsum(closed["net_profit"].to_numpy(dtype=np.float64))]
    )
    origin = "from the settings" if p.initial_balance_known else "assumed (settings' default)"
    return _Equity(
        times,
        balance,
        None,
        f"balance rebuilt from closed trades (no equity snapshots; initial balance "
        f"{p.initial_balance:,.2f} {origin})",
    )


def _closed_trades(trades: pd.DataFrame) -> pd.DataFrame:
    closed = trades[(trades["status"] == "closed") & trades["close_time"].notna()]
    closed = closed[np.isfinite(pd.to_numeric(closed["net_profit"], errors="coerce"))]
    return closed.sort_values(["close_time", "id"], kind="stable")


def _period_closes(curve: _Equity) -> tuple[np.ndarray, int, float]:
    """The first point, then the last equity of every period that has one.

    Periods are trading days from ``DAILY_FROM`` of data on; below that, the
    shortest block of 1, 2, 3, 4, 6, 8, 12 or 24 hours that is at least the
    usual spacing of the points (an equity snapshot every 60 M5 bars, one every
    5 hours, gives 6-hour periods). Returns the closes, the period length in
    hours (24 for days) and periods per year.
    """
    series = pd.Series(curve.equity, index=curve.times)
    gaps_h = np.diff(curve.times.as_unit("ns").asi8) / 3.6e12
    spacing_h = float(np.median(gaps_h)) if gaps_h.size else 1.0
    # Hour blocks that tile a day, so that periods never straddle midnight.
    hours = next((h for h in (1, 2, 3, 4, 6, 8, 12) if h >= spacing_h - 1e-9), 24)
    if curve.times[-1] - curve.times[0] >= DAILY_FROM:
        hours = 24
    freq = "D" if hours == 24 else f"{hours}h"
    per_year = TRADING_DAYS_PER_YEAR * 24.0 / hours
    closes = series.resample(freq).last().dropna()
    values = np.concatenate([[curve.equity[0]], closes.to_numpy(dtype=np.float64)])
    return values, hours, per_year


def _period_name(hours: int) -> str:
    return {24: "daily", 1: "hourly"}.get(hours, f"{hours}-hourly")


def _monthly_returns(curve: _Equity) -> dict[tuple[int, int], float]:
    series = pd.Series(curve.equity, index=curve.times)
    month_end = series.resample("MS").last().dropna()
    previous = np.concatenate([[curve.equity[0]], month_end.to_numpy(dtype=np.float64)[:-1]])
    out: dict[tuple[int, int], float] = {}
    for stamp, last, before in zip(month_end.index, month_end.to_numpy(), previous, strict=True):
        if before > 0:
            out[(int(stamp.year), int(stamp.month))] = float(last / before - 1.0)
    return out


def _count(events: pd.DataFrame, *names: str) -> int:
    return int(events["event"].isin(names).sum()) if len(events) else 0


# -- the report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Derived:
    """Series computed once from the snapshot and used by the numbers and the charts."""

    curve: _Equity | None
    closed: pd.DataFrame  # closed trades in close order
    labelled: pd.DataFrame | None  # predictions with outcomes (None: no usable bars)
    bars: Mapping[str, pd.DataFrame] | None
    bars_note: str  # why there are no bars, when there are none


@dataclass
class _Page:
    """What the HTML is assembled from."""

    stats: ReportStats
    snapshot: _Snapshot
    params: _Params
    derived: _Derived
    charts: dict[str, bytes] = field(default_factory=dict)


def default_out_path(journal_path: Path) -> Path:
    """``data/backtests/x.sqlite3`` -> ``data/backtests/x.html``."""
    return journal_path.with_suffix(".html")


def charts_dir_for(html_path: Path) -> Path:
    """``x.html`` -> ``x_charts/`` beside it."""
    return html_path.with_name(f"{html_path.stem}_charts")


def build_report(
    journal_path: Path,
    out_path: Path | None = None,
    *,
    bars: Mapping[str, pd.DataFrame] | None = None,
    now: datetime | None = None,
    auto_bars: bool = False,
) -> ReportResult:
    """Write the HTML report (and its PNGs) of ``journal_path``; never writes the journal.

    ``out_path`` defaults to the journal path with suffix ``.html``; the PNGs go
    to ``<stem>_charts/`` beside it. ``bars`` (symbol -> bar frame as
    ``load_bars`` returns) lets the report label the journaled predictions;
    with ``auto_bars`` and no ``bars`` it rebuilds them from the journaled
    settings (``bars_for_report``: the synthetic market or the CSV file of a
    paper run). ``now`` stamps the page (default: the wall clock).

    Raises ``ReportError`` for a missing, foreign, damaged or garbage file.
    """
    journal_path = Path(journal_path)
    html_path = Path(out_path) if out_path is not None else default_out_path(journal_path)
    if html_path.resolve() == journal_path.resolve():
        raise ReportError(
            f"{html_path}: the report would overwrite the journal; pass --out with another path"
        )
    generated = now or SystemClock().now()
    if generated.tzinfo is None:
        raise ValueError(f"now must be UTC-aware (got {generated!r})")
    snap = _read_journal(journal_path)
    p = _params(snap.settings)
    derived = _derive(snap, p, bars, auto_bars=auto_bars)
    page = _Page(_stats(snap, p, derived, generated), snap, p, derived)
    _draw(page)
    charts_dir = charts_dir_for(html_path)
    png_paths = _write_charts(charts_dir, page.charts)
    text = _render_html(page, charts_dir)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = html_path.with_name(html_path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, html_path)
    summary = format_text_summary(page.stats, html_path=html_path, png_paths=png_paths)
    return ReportResult(html_path, png_paths, summary, page.stats)


def _derive(
    snap: _Snapshot, p: _Params, bars: Mapping[str, pd.DataFrame] | None, *, auto_bars: bool
) -> _Derived:
    preds = snap.tables["predictions"]
    note = ""
    if bars is None and auto_bars and len(preds):
        last = preds["bar_time"].max().to_pydatetime()
        bars, note = _bars_with_reason(
            snap.settings, last + timedelta(seconds=(p.horizon + 1) * p.timeframe_s)
        )
    if bars is not None:
        for symbol, frame in bars.items():
            try:
                BarColumns.from_frame(frame)
            except ValueError as exc:  # e.g. naive times or unsorted bars in a given frame
                bars, note = None, f"the price bars of {symbol} cannot be used ({exc})"
                break
    labelled: pd.DataFrame | None = None
    if bars is not None and len(preds):
        labelled = label_predictions(preds, bars, horizon=p.horizon, threshold_atr=p.threshold_atr)
    closed = _closed_trades(snap.tables["trades"])
    return _Derived(_equity_curve(snap.tables, p), closed, labelled, bars, note)


def _write_charts(charts_dir: Path, charts: Mapping[str, bytes]) -> tuple[Path, ...]:
    if charts:
        charts_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in CHART_NAMES:
        target = charts_dir / name
        if name in charts:
            target.write_bytes(charts[name])
            written.append(target)
        else:
            # A chart of an earlier report that has no data now must not linger.
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
    return tuple(written)


def _stats(snap: _Snapshot, p: _Params, d: _Derived, generated: datetime) -> ReportStats:
    tables = snap.tables
    trades, preds = tables["trades"], tables["predictions"]
    closed, curve, bars = d.closed, d.curve, d.bars
    start, end = _market_period(tables)
    configured = p.symbols if snap.settings else ()
    symbols = tuple(
        dict.fromkeys([*configured, *sorted(set(trades["symbol"]) | set(preds["symbol"]))])
    )
    n_bars, bars_source = _bar_count(tables, bars, start, end)
    eq_metrics: EquityMetrics | None = None
    dd_all: float | None = None
    period_h = 0
    monthly: dict[tuple[int, int], float] = {}
    if curve is not None and np.all(np.isfinite(curve.equity)) and curve.equity[0] > 0:
        values, period_h, per_year = _period_closes(curve)
        with contextlib.suppress(ValueError):  # equity at or below 0 before the end
            eq_metrics = equity_metrics(values, periods_per_year=per_year)
            dd_all = equity_metrics(curve.equity, periods_per_year=per_year).max_drawdown
        monthly = _monthly_returns(curve)
    pnl = closed["net_profit"].to_numpy(dtype=np.float64)
    held, total, basis = _exposure_inputs(closed, p, bars, start, end)
    tm = trade_metrics(pnl, bars_held=held, total_bars=total) if total else trade_metrics(pnl)
    me = tables["model_events"]
    promoted = _count(me, "promoted") or _count(me, "auto_promoted", "shadow_promoted")
    rolled = _count(me, "rolled_back", "rolled back") or _count(me, "auto_rolled_back")
    quality: tuple[ModelQuality, ...] = ()
    note = ""
    if preds.empty:
        note = NO_PREDICTIONS
    elif d.labelled is None:
        note = _needs_bars_note(d.bars_note)
    else:
        quality = tuple(_quality(d.labelled))
    events = tables["events"]
    return ReportStats(
        journal=snap.path,
        generated=generated,
        broker=f"backtest ({p.broker})" if snap.settings_event == "backtest_started" else p.broker,
        symbols=symbols,
        period_start=start,
        period_end=end,
        bars=n_bars,
        bars_source=bars_source,
        closed_trades=len(closed),
        open_trades=int((trades["status"] == "open").sum()),
        wins=int((pnl > 0).sum()),
        losses=int((pnl < 0).sum()),
        trades=tm,
        equity=eq_metrics,
        equity_source=curve.source if curve is not None else "",
        equity_period=_period_name(period_h) if period_h else "",
        equity_period_hours=period_h,
        max_drawdown_snapshots=dd_all,
        exposure_basis=basis,
        monthly_returns=monthly,
        promoted=promoted,
        rejected=_count(me, "rejected", "shadow_rejected", "swap_failed"),
        rolled_back=rolled,
        drift_alarms=len(_drift_rows(snap)),
        alerts=int(events["level"].isin(("error", "critical")).sum()),
        prediction_quality=quality,
        prediction_note=note,
    )


def _needs_bars_note(why: str) -> str:
    return (
        "prediction quality needs the price bars (a prediction's outcome is its bar's "
        f"label, known from later prices); {why or 'none were given'}"
    )


def _market_period(tables: Mapping[str, pd.DataFrame]) -> tuple[datetime | None, datetime | None]:
    """First and last market time: equity, trades and predictions (events if nothing else)."""
    stamps = [
        tables["equity"]["time"],
        tables["trades"]["open_time"],
        tables["trades"]["close_time"],
        tables["predictions"]["bar_time"],
    ]
    found = pd.concat([s.dropna() for s in stamps if len(s.dropna())] or [pd.Series([])])
    if found.empty:
        found = pd.concat(
            [tables["events"]["time"].dropna(), tables["model_events"]["time"].dropna()]
        )
    if found.empty:
        return None, None
    return found.min().to_pydatetime(), found.max().to_pydatetime()


def _bar_count(
    tables: Mapping[str, pd.DataFrame],
    bars: Mapping[str, pd.DataFrame] | None,
    start: datetime | None,
    end: datetime | None,
) -> tuple[int | None, str]:
    """The most bars any source accounts for (predictions may be pruned, and a killed run
    journals no daemon_stopped event), and which source that is."""
    found: list[tuple[int, str]] = []
    preds = tables["predictions"]
    if len(preds):
        found.append((len(preds[["symbol", "bar_time"]].drop_duplicates()), "bars predicted"))
    stopped = [
        _details(d)
        for k, d in zip(tables["events"]["kind"], tables["events"]["details_json"], strict=True)
        if k == "daemon_stopped"
    ]
    counts = [int(d["bars"]) for d in stopped if isinstance(d, dict) and "bars" in d]
    if counts:
        found.append((sum(counts), "bars processed"))
    if not found and bars is not None and start is not None and end is not None:
        found.append((sum(_bars_between(f, start, end) for f in bars.values()), "bars in period"))
    return max(found) if found else (None, "")


def _bars_between(frame: pd.DataFrame, start: datetime, end: datetime) -> int:
    times = frame["time"]
    return int(((times >= start) & (times <= end)).sum())


def _exposure_inputs(
    closed: pd.DataFrame,
    p: _Params,
    bars: Mapping[str, pd.DataFrame] | None,
    start: datetime | None,
    end: datetime | None,
) -> tuple[np.ndarray | None, int | None, str]:
    """Bars each trade was held, bars in the period, and how they were counted.

    The period's bars are counted in ``bars`` when they cover the period, else
    estimated from its length (which counts weekends as bars: a lower bound).
    """
    if closed.empty or start is None or end is None:
        return None, None, ""
    seconds = (closed["close_time"] - closed["open_time"]).dt.total_seconds().to_numpy()
    held = pd.to_numeric(closed["bars_held"], errors="coerce").to_numpy(dtype=np.float64)
    held = np.where(np.isfinite(held), held, np.round(seconds / p.timeframe_s))
    held = np.where(np.isfinite(held) & (held > 0), held, 0.0)
    traded = sorted(set(closed["symbol"]))
    step = timedelta(seconds=p.timeframe_s)
    covered = bars is not None and all(
        s in bars
        and len(bars[s])
        and bars[s]["time"].iloc[0] <= start + step
        and bars[s]["time"].iloc[-1] >= end - step
        for s in traded
    )
    if bars is not None and covered:
        total = sum(_bars_between(bars[s], start, end) for s in traded)
        basis = "bars of the traded symbols in the period"
    else:
        span_bars = (end - start).total_seconds() / p.timeframe_s
        total = round(span_bars) * len(traded)
        basis = "period length / timeframe (no price data: weekends count, a lower bound)"
    return (held, int(total), basis) if total > 0 else (None, None, "")


def _drift_rows(snap: _Snapshot) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    me = snap.tables["model_events"]
    for r in me.itertuples(index=False):
        event = str(r.event)
        if event.startswith("drift") and event != "drift_check":
            rows.append(
                {
                    "time": r.time,
                    "source": "model_events",
                    "what": f"{r.symbol or '-'}/{r.kind or '-'} {r.version or ''}".strip(),
                    "event": event,
                    "details": _details(r.details_json),
                }
            )
    ev = snap.tables["events"]
    for r in ev.itertuples(index=False):
        if "drift" in str(r.kind):
            rows.append(
                {
                    "time": r.time,
                    "source": f"events ({r.level})",
                    "what": str(r.message),
                    "event": str(r.kind),
                    "details": _details(r.details_json),
                }
            )
    return sorted(rows, key=lambda x: x["time"] if pd.notna(x["time"]) else pd.Timestamp(0))


# -- charts -------------------------------------------------------------------------------


def _naive(times: Iterable[Any]) -> np.ndarray:
    """UTC timestamps as naive datetime64 (what matplotlib's date axis expects)."""
    return pd.DatetimeIndex(list(times)).tz_convert("UTC").tz_localize(None).to_numpy()


def _draw(page: _Page) -> None:
    from ml import report_charts as rc

    curve, closed, labelled = page.derived.curve, page.derived.closed, page.derived.labelled
    if curve is not None and len(curve.equity) > 1 and curve.equity[0] > 0:
        page.charts["equity.png"] = rc.equity_chart(
            _naive(curve.times),
            curve.equity,
            curve.balance,
            equity_label="equity" if curve.balance is not None else "balance (closed trades)",
        )
    if len(closed):
        minutes = (closed["close_time"] - closed["open_time"]).dt.total_seconds() / 60.0
        page.charts["trades.png"] = rc.trades_chart(
            closed["net_profit"].to_numpy(dtype=np.float64),
            minutes.to_numpy(dtype=np.float64),
            closed.groupby("side")["net_profit"].sum().to_dict(),
            closed.groupby(closed["close_reason"].fillna("unknown"))["net_profit"].sum().to_dict(),
        )
    if labelled is not None:
        known = labelled[labelled["label"] >= 0]
        if len(known):
            lines, marks, period = _hit_rate_lines(known, labelled)
            page.charts["prediction_hit_rate.png"] = rc.hit_rate_chart(
                lines, period_label=period, version_marks=marks
            )
            curves = {
                _line_name(key, known): _calibration_bins(group)
                for key, group in known.groupby(["symbol", "model", "stage"], sort=True)
            }
            page.charts["calibration.png"] = rc.calibration_chart(curves)
    markers, runs, lanes = _timeline(page.snapshot)
    if lanes:
        page.charts["model_timeline.png"] = rc.timeline_chart(markers, runs, lanes)


def _line_name(key: Any, frame: pd.DataFrame) -> str:
    symbol, model, stage = key
    name = str(model) if stage in ("production", model) else f"{model} [{stage}]"
    return f"{symbol} {name}" if frame["symbol"].nunique() > 1 else name


def _hit_period(known: pd.DataFrame) -> tuple[str, str]:
    span = known["bar_time"].max() - known["bar_time"].min()
    return ("D", "day") if span >= pd.Timedelta(days=3) else ("h", "hour")


def _hit_rate_lines(
    known: pd.DataFrame, labelled: pd.DataFrame
) -> tuple[dict[str, Any], list[tuple[np.datetime64, str]], str]:
    from ml.report_charts import Series

    freq, period = _hit_period(known)
    lines: dict[str, Series] = {}
    for key, group in known.groupby(["symbol", "model", "stage"], sort=True):
        buckets = group.groupby(group["bar_time"].dt.floor(freq))["hit"].agg(["mean", "size"])
        lines[_line_name(key, known)] = Series(
            times=_naive(buckets.index),
            values=buckets["mean"].to_numpy(dtype=np.float64),
            counts=buckets["size"].to_numpy(dtype=np.int64),
            dashed=key[2] != "production",
        )
    # The first bar of each new serving version; models swapped on the same bar share a mark.
    changes: dict[pd.Timestamp, list[str]] = {}
    serving = labelled[labelled["stage"] == "production"]
    for (_symbol, model), group in serving.groupby(["symbol", "model"], sort=True):
        firsts = group.groupby("version", sort=False)["bar_time"].min().sort_values()
        for version, when in list(firsts.items())[1:]:
            changes.setdefault(when, []).append(f"{model} {version}")
    marks = [(_naive([when])[0], ", ".join(names)) for when, names in sorted(changes.items())]
    return lines, marks[-12:], period


def _timeline(snap: _Snapshot) -> tuple[list[Any], list[Any], list[str]]:
    from ml.report_charts import Marker, Run

    markers: list[Marker] = []
    runs: list[Run] = []
    me = snap.tables["model_events"]
    for r in me.itertuples(index=False):
        event = str(r.event).replace(" ", "_")
        category = _EVENT_CATEGORY.get(event, "other")
        if category is None or not r.symbol or not r.kind or pd.isna(r.time):
            continue
        markers.append(
            Marker(_naive([r.time])[0], f"{r.symbol}/{r.kind}", category, str(r.version or ""))
        )
    tr = snap.tables["training_runs"]
    for r in tr.itertuples(index=False):
        if pd.isna(r.started):
            continue
        end = None if pd.isna(r.finished) else _naive([r.finished])[0]
        runs.append(Run(_naive([r.started])[0], end, f"{r.symbol}/{r.kind}", str(r.status)))
    lanes = sorted({m.lane for m in markers} | {run.lane for run in runs})
    return markers, runs, lanes


# -- formatting ---------------------------------------------------------------------------


def _when(moment: Any) -> str:
    if moment is None or (not isinstance(moment, datetime) and pd.isna(moment)):
        return "-"
    stamp = pd.Timestamp(moment).tz_convert("UTC")
    return stamp.strftime("%Y-%m-%d %H:%M")


def _money(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+,.2f}" if round(x, 2) != 0 else "0.00"


def _pct(x: float | None, *, signed: bool = True, digits: int = 2) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf"
    return f"{x * 100:+.{digits}f} %" if signed and x != 0 else f"{x * 100:.{digits}f} %"


def _num(x: float | None, digits: int = 2) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:,.{digits}f}"


def _duration(periods: int, s: ReportStats) -> str:
    """A drawdown duration in periods as days (daily closes) or hours."""
    if s.equity_period_hours == 24:
        return f"{periods} trading day" + ("" if periods == 1 else "s")
    hours = periods * s.equity_period_hours
    return f"{hours} hour" + ("" if hours == 1 else "s")


def _period_text(s: ReportStats) -> str:
    if s.period_start is None or s.period_end is None:
        return "no market data yet"
    days = (s.period_end - s.period_start).total_seconds() / 86_400
    return f"{_when(s.period_start)} .. {_when(s.period_end)} UTC ({days:,.1f} days)"


def _fit(line: str, width: int = SUMMARY_WIDTH) -> str:
    if len(line) <= width:
        return line
    keep = width - 3
    return line[: keep // 2] + "..." + line[len(line) - (keep - keep // 2) :]


def _short_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def format_text_summary(
    stats: ReportStats, *, html_path: Path, png_paths: Sequence[Path] = ()
) -> str:
    """One terminal screen: at most 25 lines of at most 100 columns, its own text ASCII."""
    s, t, e = stats, stats.trades, stats.equity
    symbols = ", ".join(s.symbols) or "no symbols"
    bars = f"{s.bars:,} {s.bars_source}" if s.bars is not None else "bars unknown"
    lines = [
        f"Report on {s.journal.name} ({s.broker}; {symbols})",
        f"period    {_period_text(s)}",
        f"activity  {bars}; {s.closed_trades:,} closed trades, {s.open_trades} open",
    ]
    if s.closed_trades or e is not None:
        ret = (
            "n/a"
            if e is None
            else f"{_pct(e.total_return)}, annualised {_pct(e.annualised_return)}"
        )
        lines.append(f"net P&L   {_money(t.net_profit)} (return {ret})")
    else:
        lines.append("net P&L   no closed trades and no equity yet")
    if e is not None:
        lines.append(
            f"risk      Sharpe {_num(e.sharpe)}, Sortino {_num(e.sortino)}, max drawdown "
            f"{_pct(e.max_drawdown)} over {_duration(e.max_drawdown_duration, s)} "
            f"({s.equity_period} closes)"
        )
    if s.closed_trades:
        lines.append(
            f"trades    win rate {_pct(t.win_rate, signed=False, digits=1)}, profit factor "
            f"{_num(t.profit_factor)}, expectancy {_money(t.expectancy)}, avg win "
            f"{_money(t.avg_win)} / loss {_money(t.avg_loss)}"
        )
    lines.append(
        f"models    {s.promoted} promoted, {s.rejected} rejected, {s.rolled_back} rolled back; "
        f"{s.drift_alarms} drift alarm{'s' if s.drift_alarms != 1 else ''}; "
        f"{s.alerts} alert{'s' if s.alerts != 1 else ''} (error/critical)"
    )
    if s.prediction_quality:
        parts = [
            f"{q.symbol} {q.name} {_pct(q.hit_rate, signed=False, digits=1)}"
            for q in s.prediction_quality
            if q.labelled
        ]
        head = "hit rate  "
        for i in range(0, min(len(parts), 12), 3):
            lines.append(head + ", ".join(parts[i : i + 3]))
            head = "          "
    elif s.prediction_note == NO_PREDICTIONS:
        lines.append(f"hit rate  {NO_PREDICTIONS}")
    elif s.prediction_note:
        lines.append("hit rate  needs the price bars (the HTML says how to give them)")
    lines.append(f"report    {_short_path(html_path)}")
    if png_paths:
        lines.append(f"charts    {_short_path(png_paths[0].parent)} ({len(png_paths)} PNG files)")
    return "\n".join(_fit(line) for line in lines[:25])


# -- HTML -------------------------------------------------------------------------------------


class _Html(str):
    """Markup that is inserted as is (everything else is escaped)."""


def _esc(value: object) -> str:
    return value if isinstance(value, _Html) else html.escape(str(value), quote=True)


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    numeric: Iterable[int] = (),
    cls: str = "",
) -> str:
    num = set(numeric)
    head = "".join(
        f'<th class="num">{_esc(h)}</th>' if i in num else f"<th>{_esc(h)}</th>"
        for i, h in enumerate(headers)
    )
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_esc(c)}</td>' if i in num else f"<td>{_esc(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _empty(text: str) -> str:
    return f'<p class="empty">{_esc(text)}</p>'


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _img(charts: Mapping[str, bytes], name: str, alt: str) -> str:
    data = charts.get(name)
    if data is None:
        return ""
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{_esc(alt)}">'


def _sign_class(x: float | None) -> str:
    if x is None or not math.isfinite(x) or x == 0:
        return ""
    return "pos" if x > 0 else "neg"


def _tile(label: str, value: str, sub: str = "", tone: str = "") -> str:
    klass = f"value {tone}".strip()
    sub_html = f'<div class="sub">{_esc(sub)}</div>' if sub else ""
    return (
        f'<div class="tile"><div class="label">{_esc(label)}</div>'
        f'<div class="{klass}">{_esc(value)}</div>{sub_html}</div>'
    )


def _kpis(s: ReportStats) -> str:
    t, e = s.trades, s.equity
    tiles = [
        _tile(
            "Net P&L",
            _money(t.net_profit),
            "after spread, commission, swap",
            _sign_class(t.net_profit),
        ),
        _tile(
            "Return",
            _pct(e.total_return) if e else "n/a",
            f"annualised {_pct(e.annualised_return)}" if e else "no equity",
            _sign_class(e.total_return if e else None),
        ),
        _tile(
            "Sharpe",
            _num(e.sharpe) if e else "n/a",
            f"{s.equity_period}, Sortino {_num(e.sortino)}" if e else "",
        ),
        _tile(
            "Max drawdown",
            _pct(e.max_drawdown) if e else "n/a",
            _duration(e.max_drawdown_duration, s) if e else "",
            "neg" if e and e.max_drawdown < 0 else "",
        ),
        _tile(
            "Win rate",
            _pct(t.win_rate, signed=False, digits=1),
            f"{s.wins} of {t.trade_count} trades",
        ),
        _tile("Profit factor", _num(t.profit_factor), f"expectancy {_money(t.expectancy)}"),
        _tile("Trades", f"{s.closed_trades:,}", f"{s.open_trades} open now"),
        _tile(
            "Models",
            f"{s.promoted} / {s.rejected} / {s.rolled_back}",
            "promoted / rejected / rolled back",
        ),
    ]
    return f'<div class="tiles">{"".join(tiles)}</div>'


def _header(page: _Page) -> str:
    s, snap = page.stats, page.snapshot
    items = [
        ("Period", _period_text(s)),
        ("Symbols", ", ".join(s.symbols) or "none"),
        ("Broker", s.broker),
        ("Timeframe", page.params.timeframe),
        ("Schema", f"v{snap.schema_version}"),
        ("Generated", f"{_when(s.generated)} UTC"),
    ]
    meta = "".join(f"<span>{_esc(k)} <b>{_esc(v)}</b></span>" for k, v in items)
    return (
        f"<header><h1>Trading report: {_esc(snap.path.name)}</h1>"
        f'<div class="path">{_esc(str(snap.path))}</div>'
        f'<div class="meta">{meta}</div></header>'
    )


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_esc(title)}</h2>{body}</section>"


def _equity_section(page: _Page) -> str:
    s = page.stats
    if not s.equity_source:
        return _section("1. Equity and drawdown", _empty("No equity snapshots and no trades yet."))
    body = _img(page.charts, "equity.png", "equity and drawdown") + _note(
        f"Source: {s.equity_source}."
    )
    if "equity.png" not in page.charts:
        body = _empty("Only one equity point so far: nothing to draw.")
    return _section("1. Equity and drawdown", body)


def _monthly_section(s: ReportStats) -> str:
    title = "2. Monthly returns"
    if not s.monthly_returns:
        return _section(title, _empty("No equity series: no monthly returns."))
    values = list(s.monthly_returns.values())
    scale = max(max(abs(v) for v in values), 1e-9)
    rows = []
    for year in sorted({y for y, _ in s.monthly_returns}):
        cells: list[object] = [year]
        compound = 1.0
        for month in range(1, 13):
            r = s.monthly_returns.get((year, month))
            if r is None:
                cells.append("")
                continue
            compound *= 1.0 + r
            alpha = 0.12 + 0.68 * min(1.0, abs(r) / scale)
            rgb = "22,163,74" if r >= 0 else "220,38,38"
            style = f"background:rgba({rgb},{alpha:.2f})"
            cells.append(_Html(f'<span class="cell" style="{style}">{_pct(r)}</span>'))
        cells.append(_Html(f"<b>{_pct(compound - 1.0)}</b>"))
        rows.append(cells)
    table = _table(["Year", *_MONTHS, "Total"], rows, numeric=range(1, 14), cls="monthly")
    return _section(
        title,
        table
        + _note(
            "Month-end equity over the previous month-end (the first month: over the first point)."
        ),
    )


def _trades_section(page: _Page) -> str:
    s = page.stats
    title = "3. Trade distribution"
    if not s.closed_trades:
        extra = f" {s.open_trades} trade(s) still open." if s.open_trades else ""
        return _section(title, _empty(f"No closed trades yet.{extra}"))
    closed = page.derived.closed
    wins, losses = s.wins, s.losses
    minutes = (closed["close_time"] - closed["open_time"]).dt.total_seconds() / 60.0
    summary = _table(
        ["Wins", "Losses", "Break-even", "Median hold", "Longest hold", "Open now"],
        [
            [
                wins,
                losses,
                s.closed_trades - wins - losses,
                f"{minutes.median():,.1f} min",
                f"{minutes.max():,.1f} min",
                s.open_trades,
            ]
        ],
        numeric=range(6),
    )
    groups = []
    for column, label in (("side", "Side"), ("close_reason", "Close reason")):
        keyed = closed.assign(key=closed[column].fillna("unknown"))
        rows = []
        for key, g in keyed.groupby("key", sort=True):
            tm = trade_metrics(g["net_profit"].to_numpy(dtype=np.float64))
            rows.append(
                [
                    key,
                    tm.trade_count,
                    _money(tm.net_profit),
                    _pct(tm.win_rate, signed=False, digits=1),
                    _money(tm.expectancy),
                ]
            )
        groups.append(
            _table(
                [label, "Trades", "Net P&L", "Win rate", "Expectancy"], rows, numeric=(1, 2, 3, 4)
            )
        )
    return _section(
        title,
        summary
        + _img(page.charts, "trades.png", "trade distribution")
        + f'<div class="grid2"><div>{groups[0]}</div><div>{groups[1]}</div></div>',
    )


def _per_year(s: ReportStats) -> int:
    return round(TRADING_DAYS_PER_YEAR * 24 / max(1, s.equity_period_hours))


def _metrics_section(s: ReportStats) -> str:
    t, e = s.trades, s.equity
    rows: list[list[object]] = []
    if e is not None:
        unit = s.equity_period
        rows += [
            ["Total return", _pct(e.total_return), "last equity / first - 1"],
            [
                "Annualised return (CAGR)",
                _pct(e.annualised_return),
                f"{e.n_periods} periods ({unit} closes, {_per_year(s):,} a year)",
            ],
            ["Sharpe ratio", _num(e.sharpe), f"{unit} returns, annualised, risk-free 0"],
            ["Sortino ratio", _num(e.sortino), "downside deviation over all periods"],
            ["Max drawdown", _pct(e.max_drawdown), f"on {unit} closes"],
            [
                "Max drawdown, every snapshot",
                _pct(s.max_drawdown_snapshots),
                "intra-period dips included",
            ],
            ["Max drawdown duration", _duration(e.max_drawdown_duration, s), "peak to recovery"],
            ["Calmar ratio", _num(e.calmar), "annualised return / |max drawdown|"],
        ]
    rows += [
        ["Trades (closed)", f"{t.trade_count:,}", f"{s.open_trades} open, not counted"],
        ["Net profit", _money(t.net_profit), "after spread, commission and swap"],
        ["Gross profit / loss", f"{_money(t.gross_profit)} / {_money(t.gross_loss)}", ""],
        ["Win rate", _pct(t.win_rate, signed=False, digits=1), "net P&L > 0"],
        ["Profit factor", _num(t.profit_factor), "gross profit / |gross loss|"],
        ["Expectancy", _money(t.expectancy), "mean net P&L per trade"],
        ["Average win / loss", f"{_money(t.avg_win)} / {_money(t.avg_loss)}", ""],
        [
            "Exposure",
            _pct(t.exposure, signed=False, digits=1),
            f"bars held / {s.exposure_basis}" if s.exposure_basis else "",
        ],
    ]
    notes = "All figures are computed by ml.metrics from net P&L and the equity curve."
    if e is not None and e.n_periods < 30:
        notes += f" Only {e.n_periods} periods: annualised figures are not meaningful yet."
    return _section(
        "4. Metrics", _table(["Metric", "Value", "How"], rows, numeric=(1,)) + _note(notes)
    )


def _predictions_section(page: _Page) -> str:
    s = page.stats
    title = "5. Prediction quality per model"
    if not s.prediction_quality:
        if s.prediction_note == NO_PREDICTIONS:
            return _section(title, _empty("No predictions in the journal."))
        how = (
            "Run `python main.py report --journal PATH` where the daemon ran: a paper run's "
            "bars are rebuilt from its journaled settings (the synthetic market, or its "
            "paper.data CSV file). A backtest writes its report with its bars. Live runs: "
            "back-test the same period with the broker's exported bars."
        )
        return _section(title, _empty(_sentence(s.prediction_note) + ".") + _note(how))
    rows = [
        [
            q.symbol,
            q.name,
            ", ".join(q.versions[-3:]) + (" ..." if len(q.versions) > 3 else ""),
            f"{q.predictions:,}",
            f"{q.labelled:,}",
            _pct(q.hit_rate, signed=False, digits=1),
            _pct(q.best_constant, signed=False, digits=1),
            _num(q.log_loss, 4),
            _num(q.mean_confidence, 3),
            _num(q.calibration_error, 3),
        ]
        for q in s.prediction_quality
    ]
    table = _table(
        [
            "Symbol",
            "Model",
            "Versions",
            "Predictions",
            "Labelled",
            "Hit rate",
            "Best constant",
            "Log-loss",
            "Mean max-p",
            "ECE",
        ],
        rows,
        numeric=range(3, 10),
    )
    p = page.params
    note = (
        f"The outcome of a prediction is its bar's training label: the close {p.horizon} "
        f"bar(s) later against {p.threshold_atr:g} x the bar's ATR (strategy.labels). Hit rate: "
        "the most likely class was the outcome. Best constant: always answering the most "
        "frequent outcome. ECE: expected calibration error of the max-probability. "
        "Unlabelled: the last bars of the data and bars missing from the price data."
    )
    charts = _img(page.charts, "prediction_hit_rate.png", "hit rate per model over time")
    charts += _img(page.charts, "calibration.png", "calibration")
    return _section(title, table + _note(note) + charts)


def _event_reason(event: str, details: object) -> str:
    if details is None:
        return ""
    if not isinstance(details, dict):
        return str(details)
    parts: list[str] = []
    gates = details.get("gates")
    if isinstance(gates, list):
        failed = [g for g in gates if isinstance(g, dict) and not g.get("passed", True)]
        if failed:
            parts.append(
                "failed gates: "
                + "; ".join(
                    f"{g.get('name')} {_gate_value(g.get('value'))} "
                    f"(needs {g.get('op', '')} {_gate_value(g.get('threshold'))})"
                    for g in failed
                )
            )
    if not parts and details.get("reasons"):
        parts.append(str(details["reasons"]))
    for key, label in (
        ("why", ""),
        ("error", "error: "),
        ("problems", "problems: "),
        ("replaced", "replaced "),
        ("rolled_back", "rolled back "),
        ("rejected", "rejected "),
        ("refused", "refused "),
    ):
        value = details.get(key)
        if value:
            parts.append(f"{label}{value}")
    if event.startswith("drift"):
        parts.append(_drift_text(details))
    trigger = details.get("reason")
    if trigger:
        parts.append(f"trigger: {trigger}" if event in ("validated", "rejected") else str(trigger))
    return "; ".join(p for p in parts if p)


def _gate_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _drift_text(details: Mapping[str, Any]) -> str:
    parts = []
    if "share_drifted" in details:
        parts.append(
            f"{details.get('n_drifted', '?')}/{details.get('n_tested', '?')} features drifted "
            f"(share {details['share_drifted']})"
        )
    top = details.get("drifted")
    if isinstance(top, list) and top:
        parts.append(
            "top: "
            + ", ".join(
                f"{f.get('name')} (KS {f.get('ks')}, PSI {f.get('psi')})"
                for f in top[:5]
                if isinstance(f, dict)
            )
        )
    return "; ".join(parts)


def _timeline_section(page: _Page) -> str:
    title = "6. Model versions"
    me = page.snapshot.tables["model_events"]
    runs = page.snapshot.tables["training_runs"]
    if me.empty and runs.empty:
        return _section(title, _empty("No model events or training runs yet."))
    shown = me[me["event"] != "drift_check"]
    checks = len(me) - len(shown)
    recent = shown.iloc[::-1].head(TABLE_ROWS_MAX)
    rows = [
        [
            _when(r.time),
            f"{r.symbol or '-'}/{r.kind or '-'}",
            r.version or "",
            str(r.event),
            _event_reason(str(r.event), _details(r.details_json)),
        ]
        for r in recent.itertuples(index=False)
    ]
    body = _img(page.charts, "model_timeline.png", "model version timeline")
    body += _note(
        "Model events carry the journal's clock (the wall clock in a paper replay); trades, "
        "equity and predictions carry market time."
    )
    status = runs["status"].value_counts().sort_index()
    if len(runs):
        body += _note(
            f"Training runs: {len(runs)} ("
            + ", ".join(f"{k} {v}" for k, v in status.items())
            + ")."
        )
    if rows:
        body += _table(["Time (UTC)", "Symbol/kind", "Version", "Event", "Details"], rows)
    if len(shown) > TABLE_ROWS_MAX:
        body += _note(f"The newest {TABLE_ROWS_MAX} of {len(shown)} events are listed.")
    if checks:
        body += _note(f"{checks} drift check(s) without alarm are not listed.")
    return _section(title, body)


def _alerts_section(page: _Page) -> str:
    title = "7. Drift and operational alerts"
    drift = _drift_rows(page.snapshot)
    body = "<h3>Drift</h3>"
    if drift:
        rows = [
            [
                _when(d["time"]),
                d["source"],
                d["event"],
                d["what"],
                _drift_text(d["details"]) if isinstance(d["details"], dict) else "",
            ]
            for d in drift[-TABLE_ROWS_MAX:]
        ]
        body += _table(["Time (UTC)", "Source", "Event", "Model / message", "Statistics"], rows)
    else:
        body += _empty("No drift alarms.")
    ev = page.snapshot.tables["events"]
    alerts = ev[ev["level"].isin(("error", "critical"))].iloc[::-1]
    body += "<h3>Operational alerts (error and critical events)</h3>"
    if len(alerts):
        rows = [
            [
                _when(r.time),
                _Html(f'<span class="badge lvl-{_esc(r.level)}">{_esc(r.level)}</span>'),
                r.kind,
                r.message,
            ]
            for r in alerts.head(TABLE_ROWS_MAX).itertuples(index=False)
        ]
        body += _table(["Time (UTC)", "Level", "Kind", "Message"], rows)
        if len(alerts) > TABLE_ROWS_MAX:
            body += _note(f"The newest {TABLE_ROWS_MAX} of {len(alerts)} alerts are listed.")
    else:
        body += _empty("No error or critical events.")
    warnings = int((ev["level"] == "warning").sum())
    if warnings:
        body += _note(f"{warnings} warning(s) not listed (python main.py status shows the last).")
    return _section(title, body)


_CSS: Final = """
:root{--ink:#1f2937;--muted:#6b7280;--line:#e5e7eb;--bg:#f5f7fa;--card:#fff;
--green:#15803d;--red:#b91c1c}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;
color:var(--ink);background:var(--bg)}
header{background:#0f172a;color:#f8fafc;padding:22px 32px}
header h1{margin:0 0 2px;font-size:22px;font-weight:650}
header .path{color:#94a3b8;font-size:12px;margin-bottom:10px;word-break:break-all}
header .meta{display:flex;flex-wrap:wrap;gap:4px 22px;color:#cbd5e1;font-size:13px}
header .meta b{color:#f8fafc;font-weight:600}
main{max-width:1180px;margin:0 auto;padding:22px 32px 40px}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(165px,1fr));gap:12px;
margin-bottom:22px}
.tile{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.tile .label{color:var(--muted);font-size:11.5px;text-transform:uppercase;letter-spacing:.05em}
.tile .value{font-size:22px;font-weight:650;margin-top:2px;font-variant-numeric:tabular-nums}
.tile .sub{color:var(--muted);font-size:12px}
.pos{color:var(--green)}.neg{color:var(--red)}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;
padding:18px 22px;margin-bottom:18px}
section h2{margin:0 0 12px;font-size:17px}
h3{font-size:14px;margin:16px 0 6px}
img{max-width:100%;height:auto;display:block;margin:10px 0}
table{border-collapse:collapse;width:100%;font-size:12.5px;margin:6px 0}
th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#f1f5f9;font-weight:600;color:#334155}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:hover td{background:#f8fafc}
table.monthly td,table.monthly th{text-align:center}
table.monthly .cell{display:block;border-radius:4px;padding:2px 4px}
.note{color:var(--muted);font-size:12.5px;margin:6px 0}
.empty{color:var(--muted);font-style:italic;margin:4px 0}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:16px}
@media (max-width:820px){.grid2{grid-template-columns:1fr}main{padding:14px}}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:11px;font-weight:600}
.lvl-error{background:#fee2e2;color:#991b1b}.lvl-critical{background:#7f1d1d;color:#fff}
footer{color:var(--muted);font-size:12px;text-align:center;padding:0 0 24px}
@media print{body{background:#fff}section,.tile{break-inside:avoid}}
"""


def _render_html(page: _Page, charts_dir: Path) -> str:
    s = page.stats
    sections = [
        _equity_section(page),
        _monthly_section(s),
        _trades_section(page),
        _metrics_section(s),
        _predictions_section(page),
        _timeline_section(page),
        _alerts_section(page),
    ]
    saved = f"Charts also saved in {charts_dir}. " if page.charts else ""
    footer = _esc(
        f"{_sentence(page.snapshot.settings_note)}. {saved}Generated {iso_utc(s.generated)}."
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Report: {_esc(page.snapshot.path.name)}</title>"
        f"<style>{_CSS}</style></head><body>"
        + _header(page)
        + "<main>"
        + _kpis(s)
        + "".join(sections)
        + "</main>"
        + f"<footer>{footer}</footer>"
        + "</body></html>\n"
    )


__all__ = [
    "CHART_NAMES",
    "ModelQuality",
    "ReportError",
    "ReportResult",
    "ReportStats",
    "bars_for_report",
    "build_report",
    "charts_dir_for",
    "default_out_path",
    "format_text_summary",
    "label_predictions",
]
