"""The journal report: self-contained HTML, metrics from the journal, prediction outcomes,
refusals of files that are not journals, and a journal left exactly as it was."""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ml.report import (
    ReportError,
    ReportResult,
    bars_for_report,
    build_report,
    format_text_summary,
    label_predictions,
)
from utils.clock import FakeClock
from utils.trade_journal import Journal, PredictionRow, TradeClose, TradeOpen

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROBA = ("p_down", "p_flat", "p_up")
REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2024, 1, 29, tzinfo=UTC)  # a Monday; the equity runs into February
NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
# Net P&L of the four closed trades: profit - 0.5 commission at open and at close.
NETS = (30.0, -10.0, 20.0, -5.0)
EQUITY = [10_000.0 + 5.0 * i - (12.0 if i in (7, 8) else 0.0) for i in range(20)]  # 6-hourly


def settings_dict(**models: Any) -> dict[str, Any]:
    return {
        "broker": {"kind": "paper", "server_timezone": "UTC"},
        "trading": {"symbols": ["EURUSD"], "timeframe": "M1"},
        "paper": {
            "data": "synthetic",
            "synthetic_seed": 7,
            "synthetic_start": "2024-01-01T00:00:00Z",
            "initial_balance": 10_000.0,
        },
        "models": {"horizon_bars": 2, "label_threshold_atr": 0.5, **models},
        "symbols": {"EURUSD": {"point": 0.00001, "default_spread_points": 10}},
    }


def open_journal(path: Path) -> Journal:
    journal = Journal(path, clock=FakeClock(T0))
    journal.open()
    return journal


def add_trade(
    journal: Journal, n: int, net: float, opened: datetime, *, close: bool = True
) -> None:
    coid = f"T{n}"
    journal.open_trade(
        TradeOpen(
            client_order_id=coid,
            symbol="EURUSD",
            side="buy" if n % 2 else "sell",
            volume=0.1,
            open_time=opened,
            open_price=1.1,
            sl=None,
            tp=None,
            broker_position_id=n,
            commission=-0.5,
            confidence=0.6,
            model_set="rf",
            mode="paper",
        )
    )
    if close:
        journal.close_trade(
            TradeClose(
                client_order_id=coid,
                close_time=opened + timedelta(minutes=7 * n),
                close_price=1.1,
                close_reason="tp" if net > 0 else "sl",
                profit=net + 1.0,
                commission=-0.5,
                swap=0.0,
                bars_held=7 * n,
            )
        )


def m1_bars(n: int, start: datetime, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 1.1 + np.cumsum(rng.normal(0.0, 0.0002, n))
    return pd.DataFrame(
        {
            "time": pd.date_range(start, periods=n, freq="min", tz="UTC"),
            "open": np.concatenate([[close[0]], close[:-1]]),
            "high": close + 0.0003,
            "low": close - 0.0003,
            "close": close,
        }
    )


def write_full_journal(path: Path, bars: pd.DataFrame) -> None:
    """Trades, equity over two months, predictions of two models, model events, alerts."""
    journal = open_journal(path)
    try:
        journal.record_event(
            "info", "daemon_started", "paper daemon started", {"settings": settings_dict()}, time=T0
        )
        for i, value in enumerate(EQUITY):
            journal.record_equity(T0 + timedelta(hours=6 * i), value, value, 0.0, value, 0)
        for n, net in enumerate(NETS, start=1):
            add_trade(journal, n, net, T0 + timedelta(hours=13 * n))
        add_trade(journal, 9, 0.0, T0 + timedelta(days=4), close=False)
        rng = np.random.default_rng(11)
        rows = []
        for when in bars["time"].iloc[:400]:
            for model in ("rf", "xgb"):
                p = rng.dirichlet((2.0, 2.0, 2.0))
                rows.append(
                    PredictionRow(
                        time=T0,
                        bar_time=when.to_pydatetime(),
                        symbol="EURUSD",
                        model=model,
                        version="1.0.0" if when < bars["time"].iloc[200] else "1.0.1",
                        stage="production",
                        p_down=float(p[0]),
                        p_flat=float(p[1]),
                        p_up=float(p[2]),
                    )
                )
        journal.record_predictions(rows)
        t = T0 + timedelta(hours=1)
        run = journal.record_training_run(
            started=t, symbol="EURUSD", kind="rf", status="running"
        ).result()
        journal.finish_training_run(
            run, finished=t + timedelta(minutes=2), status="rejected", version="1.0.0"
        )
        gates = [
            {"name": "sim_sharpe", "value": -1.8, "threshold": -1.0, "passed": False, "op": ">="},
            {
                "name": "max_log_loss",
                "value": 1.05,
                "threshold": 1.0986,
                "passed": True,
                "op": "<=",
            },
        ]
        for minutes, event, version, details in (
            (2, "registered", "1.0.0", {}),
            (3, "rejected", "1.0.0", {"reason": "schedule", "reasons": "...", "gates": gates}),
            (60, "registered", "1.0.1", {}),
            (61, "validated", "1.0.1", {"reason": "schedule", "gates": []}),
            (62, "promoted", "1.0.1", {"replaced": "0.9.0"}),
            (63, "swapped", "1.0.1", {"weight": 1.0}),
            (120, "auto_rolled_back", "0.9.0", {"rejected": "1.0.1", "why": "worse live"}),
            (120, "rolled_back", "0.9.0", {"rolled_back": "1.0.1"}),
            (150, "drift_check", "0.9.0", {"alarm": False}),
        ):
            journal.record_model_event(
                event,
                symbol="EURUSD",
                kind="rf",
                version=version,
                details=details,
                time=t + timedelta(minutes=minutes),
            )
        journal.record_model_event(
            "drift_alarm",
            symbol="EURUSD",
            kind="xgb",
            version="2.0.0",
            details={
                "alarm": True,
                "share_drifted": 0.4,
                "n_tested": 20,
                "n_drifted": 8,
                "drifted": [{"name": "spread_atr", "ks": 0.31, "psi": 0.52}],
            },
            time=t + timedelta(hours=3),
        )
        journal.record_event(
            "error", "broker_order_failed", "EURUSD order refused: retcode 10019", time=t
        )
        journal.record_event("critical", "journal_disk_low", "12 MB free under data/", time=t)
        journal.record_event("warning", "slow_bar", "bar took 80 ms", time=t)
    finally:
        journal.close()


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, pd.DataFrame]]:
    base = tmp_path_factory.mktemp("full")
    bars = m1_bars(600, T0)
    path = base / "journal.sqlite3"
    write_full_journal(path, bars)
    yield path, bars


def fingerprint(path: Path) -> tuple[str, int, int]:
    return (
        hashlib.sha256(path.read_bytes()).hexdigest(),
        path.stat().st_mtime_ns,
        path.stat().st_size,
    )


@dataclass(frozen=True)
class Built:
    result: ReportResult
    html: str
    journal: Path
    before: tuple[str, int, int]  # the journal's fingerprint before the report


@pytest.fixture(scope="module")
def built(full: tuple[Path, pd.DataFrame], tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The report of the full journal with its bars, made once (charts take a second)."""
    journal, bars = full
    before = fingerprint(journal)
    out = tmp_path_factory.mktemp("report") / "r.html"
    result = build_report(journal, out, bars={"EURUSD": bars}, now=NOW)
    return Built(result, result.html_path.read_text(encoding="utf-8"), journal, before)


# -- the full report ----------------------------------------------------------------------


def test_report_is_one_self_contained_html_with_its_pngs(built: Built) -> None:
    result, text = built.result, built.html
    assert result.html_path.name == "r.html"
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "<link" not in text.lower()
    names = sorted(p.name for p in result.png_paths)
    assert names == sorted(
        [
            "equity.png",
            "trades.png",
            "prediction_hit_rate.png",
            "calibration.png",
            "model_timeline.png",
        ]
    )
    for png in result.png_paths:
        assert png.parent == result.html_path.with_name("r_charts")
        assert png.read_bytes().startswith(PNG_MAGIC)
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(embedded) == len(result.png_paths)
    assert all(base64.b64decode(data).startswith(PNG_MAGIC) for data in embedded)
    assert re.findall(r'src="([^"]+)"', text) == [f"data:image/png;base64,{d}" for d in embedded]


def test_kpis_match_hand_computed_numbers(built: Built) -> None:
    s = built.result.stats
    assert (s.closed_trades, s.open_trades) == (4, 1)
    assert s.trades.trade_count == 4
    assert s.trades.net_profit == pytest.approx(35.0)
    assert s.trades.win_rate == pytest.approx(0.5)
    assert s.trades.profit_factor == pytest.approx(50.0 / 15.0)
    assert s.trades.expectancy == pytest.approx(8.75)
    assert s.equity is not None
    assert s.equity.total_return == pytest.approx(EQUITY[-1] / EQUITY[0] - 1.0)
    assert s.max_drawdown_snapshots == pytest.approx(min(EQUITY[7], EQUITY[8]) / EQUITY[6] - 1.0)
    # Snapshots every 6 hours: 6-hour periods; the dip lasts from point 6 to point 9.
    assert (s.equity_period, s.equity.max_drawdown_duration) == ("6-hourly", 3)
    assert (s.promoted, s.rejected, s.rolled_back, s.drift_alarms, s.alerts) == (1, 1, 1, 1, 2)
    assert s.broker == "paper" and s.symbols == ("EURUSD",)
    for shown in (
        "+35.00",
        "50.0 %",
        "3.33",
        "+8.75",
        "Trading report: journal.sqlite3",
        "Broker <b>paper</b>",
        "Symbols <b>EURUSD</b>",
        "Period <b>2024-01-29 00:00 .. 2024-02-02 18:00 UTC",
    ):
        assert shown in built.html


def test_monthly_table_has_the_months_of_the_equity(built: Built) -> None:
    jan = EQUITY[11] / EQUITY[0] - 1.0  # rows 0..11 fall in January (6-hourly from the 29th)
    feb = EQUITY[19] / EQUITY[11] - 1.0
    monthly_returns = dict(built.result.stats.monthly_returns)
    assert monthly_returns == pytest.approx({(2024, 1): jan, (2024, 2): feb})
    monthly = built.html.split('class="monthly"', 1)[1].split("</table>", 1)[0]
    assert "<td>2024</td>" in monthly
    assert f"{jan * 100:+.2f} %" in monthly and f"{feb * 100:+.2f} %" in monthly
    assert monthly.count("%</span>") == 2  # no other month has a value


def test_model_events_drift_and_alerts_are_listed_with_reasons(built: Built) -> None:
    text = built.html
    assert "failed gates: sim_sharpe -1.8 (needs &gt;= -1)" in text
    assert "max_log_loss" not in text  # a passed gate is not a reason
    assert "rolled back 1.0.1" in text and "worse live" in text
    assert "spread_atr (KS 0.31, PSI 0.52)" in text and "8/20 features drifted" in text
    assert "retcode 10019" in text and "12 MB free" in text
    assert "1 drift check(s) without alarm are not listed" in text
    assert "1 warning(s) not listed" in text


def test_text_summary_fits_one_screen(built: Built) -> None:
    result = built.result
    lines = result.summary.splitlines()
    assert len(lines) <= 25
    assert max(len(line) for line in lines) <= 100
    assert result.summary.isascii()
    assert "+35.00" in result.summary and "4 closed trades, 1 open" in result.summary
    assert "1 promoted, 1 rejected, 1 rolled back" in result.summary
    assert "r.html" in result.summary and "5 PNG files" in result.summary
    again = format_text_summary(
        result.stats, html_path=result.html_path, png_paths=result.png_paths
    )
    assert again == result.summary


def test_the_report_does_not_modify_the_journal(built: Built) -> None:
    assert fingerprint(built.journal) == built.before


def test_without_bars_the_prediction_section_says_what_it_needs(
    full: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    journal, _bars = full
    result = build_report(journal, tmp_path / "r.html", now=NOW)
    text = result.html_path.read_text(encoding="utf-8")
    assert "Prediction quality needs the price bars" in text
    assert "python main.py report --journal PATH" in text
    assert result.stats.prediction_quality == ()
    assert "prediction_hit_rate.png" not in {p.name for p in result.png_paths}
    assert (tmp_path / "r_charts" / "equity.png").exists()


def test_default_paths_sit_beside_the_journal(tmp_path: Path) -> None:
    journal = tmp_path / "data" / "backtests" / "x.sqlite3"
    journal.parent.mkdir(parents=True)
    j = open_journal(journal)
    add_trade(j, 1, 5.0, T0)
    j.close()
    result = build_report(journal, now=NOW)
    assert result.html_path == journal.with_name("x.html")
    assert result.png_paths and all(
        p.parent == journal.with_name("x_charts") for p in result.png_paths
    )
    with pytest.raises(ReportError, match="overwrite the journal"):
        build_report(journal, journal, now=NOW)


# -- prediction outcomes ----------------------------------------------------------------------

# Horizon 1 and a negligible threshold: the label is the sign of the next close's move.
CRAFTED_CLOSES = (1.0, 1.1, 1.1, 1.0, 1.2, 1.3)
CRAFTED_LABELS = (2, 1, 0, 2, 2, -1)  # up, flat, down, up, up, unknowable (last bar)
PICKS = {"a": (2, 1, 0, 0, 2, 2), "b": (0, 0, 0, 2, 1, 1)}  # a: 4 of 5 right, b: 2 of 5


def crafted_bars() -> pd.DataFrame:
    close = np.array(CRAFTED_CLOSES)
    return pd.DataFrame(
        {
            "time": pd.date_range(T0, periods=close.size, freq="min", tz="UTC"),
            "open": close,
            "high": close + 0.01,
            "low": close - 0.01,
            "close": close,
        }
    )


def one_hot(cls: int) -> tuple[float, float, float]:
    p = [0.15, 0.15, 0.15]
    p[cls] = 0.7
    return p[0], p[1], p[2]


def test_label_predictions_uses_the_training_labels() -> None:
    bars = crafted_bars()
    rows = [
        {"symbol": "EURUSD", "bar_time": t, **dict(zip(PROBA, one_hot(c), strict=True))}
        for t, c in zip(bars["time"], PICKS["a"], strict=True)
    ]
    rows.append({"symbol": "EURUSD", "bar_time": T0 + timedelta(days=1), "p_down": 0.2,
                 "p_flat": 0.2, "p_up": 0.6})  # fmt: skip
    out = label_predictions(pd.DataFrame(rows), {"EURUSD": bars}, horizon=1, threshold_atr=1e-6)
    assert out["label"].tolist() == [*CRAFTED_LABELS, -1]
    assert out["in_bars"].tolist() == [True] * 6 + [False]
    assert out["hit"].tolist() == [True, True, True, False, True, False, False]


def test_hit_rate_per_model_on_crafted_bars(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    bars = crafted_bars()
    journal = open_journal(path)
    journal.record_event(
        "info",
        "daemon_started",
        "paper daemon started",
        {"settings": settings_dict(horizon_bars=1, label_threshold_atr=1e-6)},
        time=T0,
    )
    journal.record_predictions(
        [
            PredictionRow(
                T0, t.to_pydatetime(), "EURUSD", model, "1.0.0", "production", *one_hot(c)
            )
            for model, picks in PICKS.items()
            for t, c in zip(bars["time"], picks, strict=True)
        ]
    )
    journal.close()
    result = build_report(path, bars={"EURUSD": bars}, now=NOW)
    quality = {q.model: q for q in result.stats.prediction_quality}
    assert set(quality) == {"a", "b"}
    assert quality["a"].hit_rate == pytest.approx(4 / 5)
    assert quality["b"].hit_rate == pytest.approx(2 / 5)
    assert (quality["a"].predictions, quality["a"].labelled) == (6, 5)
    assert quality["a"].best_constant == pytest.approx(3 / 5)  # "up" 3 times in 5
    assert quality["a"].log_loss == pytest.approx(-(4 * np.log(0.7) + np.log(0.15)) / 5)
    text = result.html_path.read_text(encoding="utf-8")
    assert "80.0 %" in text and "40.0 %" in text
    assert "hit rate  EURUSD a 80.0 %, EURUSD b 40.0 %" in result.summary


def test_unusable_bars_are_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    bars = crafted_bars()
    journal = open_journal(path)
    journal.record_predictions(
        [PredictionRow(T0, T0, "EURUSD", "rf", "1.0.0", "production", 0.2, 0.3, 0.5)]
    )
    journal.close()
    naive = bars.assign(time=bars["time"].dt.tz_localize(None))
    result = build_report(path, bars={"EURUSD": naive}, now=NOW)
    assert result.stats.prediction_quality == ()
    assert "the price bars of EURUSD cannot be used" in result.html_path.read_text(encoding="utf-8")


def test_auto_bars_rebuild_the_synthetic_market_of_a_paper_run(tmp_path: Path) -> None:
    settings = settings_dict()
    bars = bars_for_report(settings)
    assert bars is not None
    frame = bars["EURUSD"]
    path = tmp_path / "j.sqlite3"
    journal = open_journal(path)
    journal.record_event("info", "daemon_started", "started", {"settings": settings}, time=T0)
    journal.record_predictions(
        [
            PredictionRow(
                T0, t.to_pydatetime(), "EURUSD", "rf", "1.0.0", "production", 0.3, 0.4, 0.3
            )
            for t in frame["time"].iloc[100:160]
        ]
    )
    journal.close()
    result = build_report(path, now=NOW, auto_bars=True)
    (q,) = result.stats.prediction_quality
    assert (q.model, q.predictions, q.labelled) == ("rf", 60, 60)
    assert "calibration.png" in {p.name for p in result.png_paths}


def test_importing_the_report_does_not_import_matplotlib() -> None:
    code = "import sys, ml.report; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


# -- bars from the journaled settings -----------------------------------------------------------


def test_synthetic_bars_are_the_daemons_replay(tmp_path: Path) -> None:
    import main
    from config.settings import load_settings

    config = tmp_path / "settings.toml"
    config.write_text(
        '[trading]\nsymbols = ["EURUSD", "XAUUSD"]\n[paper]\nsynthetic_seed = 3\n'
        'synthetic_start = "2024-02-05T00:00:00Z"\n',
        encoding="utf-8",
    )
    settings = load_settings(config, environ={})
    ours = bars_for_report(settings.public_dict())
    assert ours is not None and set(ours) == {"EURUSD", "XAUUSD"}
    for symbol, source in main._replay_sources(settings).items():
        first = next(iter(source()))
        pd.testing.assert_frame_equal(ours[symbol], first)


def test_csv_bars_load_when_the_file_is_there(tmp_path: Path) -> None:
    csv = tmp_path / "EURUSD_M1.csv"
    lines = ["time,open,high,low,close,volume"] + [
        f"2024-01-02T00:0{i}:00Z,1.1,1.1002,1.0998,1.1001,{10 + i}" for i in range(5)
    ]
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = settings_dict()
    settings["paper"]["data"] = str(tmp_path / "{symbol}_M1.csv")
    bars = bars_for_report(settings)
    assert bars is not None and len(bars["EURUSD"]) == 5
    settings["paper"]["data"] = str(tmp_path / "missing.csv")
    assert bars_for_report(settings) is None
    live = settings_dict()
    live["broker"]["kind"] = "mt5"
    assert bars_for_report(live) is None


# -- empty, damaged and foreign files ---------------------------------------------------------


def test_an_empty_journal_gives_a_report_of_empty_sections(tmp_path: Path) -> None:
    path = tmp_path / "empty.sqlite3"
    open_journal(path).close()
    result = build_report(path, now=NOW)
    text = result.html_path.read_text(encoding="utf-8")
    for line in (
        "No equity snapshots and no trades yet.",
        "No equity series: no monthly returns.",
        "No closed trades yet.",
        "No predictions in the journal.",
        "No model events or training runs yet",
        "No drift alarms.",
        "No error or critical events.",
    ):
        assert line in text
    assert result.png_paths == ()
    assert "no closed trades" in result.summary
    assert result.stats.trades.trade_count == 0


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"this is not a database, just text\n" * 20, "not an SQLite database"),
        (None, "no such journal"),
    ],
)
def test_garbage_and_missing_files_are_refused(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    path = tmp_path / "bad.sqlite3"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ReportError, match=expected) as err:
        build_report(path, now=NOW)
    assert str(path) in str(err.value) and "--journal" in str(err.value)
    assert not (tmp_path / "bad.html").exists()


def test_a_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (text TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(ReportError, match="another application") as err:
        build_report(path, now=NOW)
    assert str(path) in str(err.value)


def test_a_truncated_journal_is_refused(full: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    path = tmp_path / "cut.sqlite3"
    data = full[0].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReportError, match=r"damaged|truncated") as err:
        build_report(path, now=NOW)
    assert str(path) in str(err.value) and "restore it from a backup" in str(err.value)


# -- the journal is only read -----------------------------------------------------------------


def test_the_report_reads_while_a_writer_holds_a_transaction(
    full: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    path = tmp_path / "j.sqlite3"
    shutil.copy2(full[0], path)
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("PRAGMA journal_mode = WAL")
        writer.execute("BEGIN IMMEDIATE")
        writer.execute(
            "INSERT INTO events (time, level, kind, message) VALUES "
            "('2024-02-01T00:00:00Z', 'error', 'pending', 'not committed yet')"
        )
        result = build_report(path, tmp_path / "r.html", now=NOW)
        assert "not committed yet" not in result.html_path.read_text(encoding="utf-8")
        assert result.stats.closed_trades == 4
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_journal_whose_writer_died_reports_what_was_committed(tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    journal = open_journal(live / "j.sqlite3")
    try:
        add_trade(journal, 1, 12.0, T0)
        add_trade(journal, 2, 0.0, T0 + timedelta(hours=1), close=False)
        journal.record_equity(T0, 10_000.0, 10_000.0, 0.0, 10_000.0, 0).result()
        # The files as a SIGKILL would leave them: the committed writes sit in the WAL.
        dead = tmp_path / "dead"
        dead.mkdir()
        for name in ("j.sqlite3", "j.sqlite3-wal"):
            shutil.copy2(live / name, dead / name)
    finally:
        journal.close()
    result = build_report(dead / "j.sqlite3", now=NOW)
    assert (result.stats.closed_trades, result.stats.open_trades) == (1, 1)
    assert result.stats.trades.net_profit == pytest.approx(12.0)
