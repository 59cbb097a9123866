"""Backtests replay history through the daemon's own kernel: parity, inputs, interruption.

The parity tests are the point: a backtest and a paper ``run`` over the same CSV
make the same trades (same sides, volumes, times, prices and P&L), with the
baseline and with models served from a store. Small CSVs are written here in the
MT5 "Export bars" format an operator's terminal writes.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from config.settings import Settings, load_settings
from main import (
    InvalidInput,
    _copy_production_models,
    backtest_settings,
    main,
    plan_backtest,
    run_backtest,
    run_daemon,
)
from market_data.synthetic import SyntheticMarket
from tests.test_daemon_models import tiny_settings
from utils.clock import FakeClock

MT5_HEADER = "<DATE>\t<TIME>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>\t<VOL>\t<SPREAD>"
TRADE_COLUMNS = (
    "side, volume, open_time, open_price, sl, tp, close_time, close_price, close_reason, "
    "commission, net_profit"
)


def write_mt5_csv(path: Path, frame: pd.DataFrame) -> Path:
    """Bars as the MT5 terminal's "Export bars" writes them (server time = UTC here)."""
    lines = [MT5_HEADER]
    for row in frame.itertuples(index=False):
        t = pd.Timestamp(row.time)
        lines.append(
            f"{t:%Y.%m.%d}\t{t:%H:%M:%S}\t{row.open:.5f}\t{row.high:.5f}\t{row.low:.5f}\t"
            f"{row.close:.5f}\t{int(row.tick_volume)}\t0\t{int(row.spread)}"
        )
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    return path


def synthetic_csv(path: Path, n: int, seed: int = 11) -> Path:
    market = SyntheticMarket(
        symbol="EURUSD",
        seed=seed,
        start=datetime(2025, 3, 3, tzinfo=UTC),
        timeframe_s=60,
        base_price=1.10,
        point=0.00001,
        base_spread_points=8,
    )
    return write_mt5_csv(path, market.generate(n))


def baseline_settings(tmp_path: Path, **extra: str) -> Settings:
    env = {
        "SCALPER__STORAGE__JOURNAL_PATH": str(tmp_path / "data" / "journal.sqlite3"),
        "SCALPER__STORAGE__MODELS_DIR": str(tmp_path / "models"),
        "SCALPER__RISK__KILL_SWITCH_PATH": str(tmp_path / "KILL"),
        "SCALPER__LOGGING__LEVEL": "WARNING",
        "SCALPER__PAPER__HISTORY_BARS": "200",
        **{f"SCALPER__MODELS__{k}__ENABLED": "false" for k in ("RF", "XGB", "LSTM", "MLP")},
    }
    env.update(extra)
    return load_settings(environ=env)


def trades(journal: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(journal)
    try:
        query = f"SELECT {TRADE_COLUMNS} FROM trades ORDER BY open_time, id"  # noqa: S608
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def paper_run(settings: Settings, csv: Path, journal: Path) -> list[tuple[object, ...]]:
    run = settings.model_copy(
        update={
            "paper": settings.paper.model_copy(update={"data": str(csv), "replay_bars_per_s": 0.0}),
            "storage": settings.storage.model_copy(update={"journal_path": str(journal)}),
        }
    )
    code = asyncio.run(
        run_daemon(
            run,
            clock=FakeClock(datetime(2030, 1, 1, tzinfo=UTC)),
            install_signals=False,
            command_poll_s=None,
        )
    )
    assert code == 0
    return trades(journal)


def backtest(settings: Settings, csv: Path, **kwargs: object) -> tuple[Path, int]:
    plan = plan_backtest(settings, symbol="EURUSD", data=str(csv), **kwargs)  # type: ignore[arg-type]
    kinds: list[str] = []
    if not plan.walk_forward:
        versions, _ = _copy_production_models(settings, plan)
        kinds = list(versions)
    else:
        kinds = list(settings.models.enabled_kinds)
    plan.journal.parent.mkdir(parents=True, exist_ok=True)
    code = asyncio.run(
        run_backtest(backtest_settings(settings, plan, kinds), plan, install_signals=False)
    )
    return plan.journal, code


def test_backtest_and_paper_run_over_the_same_csv_make_identical_trades(tmp_path: Path) -> None:
    csv = synthetic_csv(tmp_path / "EURUSD_M1.csv", 3000)
    settings = baseline_settings(tmp_path)
    ran = paper_run(settings, csv, tmp_path / "paper.sqlite3")
    journal, code = backtest(settings, csv)
    assert code == 0
    assert journal.parent == tmp_path / "data" / "backtests"
    tested = trades(journal)
    assert len(ran) >= 10, "the baseline should trade on this data"
    assert tested == ran


def test_backtest_serving_the_live_stores_models_matches_a_paper_run_serving_them(
    tmp_path: Path,
) -> None:
    from tests.test_daemon_models import run_once

    settings = tiny_settings(tmp_path)
    # The live daemon trains its first models (every kind passes the opened gates).
    serving = asyncio.run(run_once(settings, 50))
    assert set(serving) >= {"rf", "xgb", "lstm", "mlp"}
    live_store = sorted(p.relative_to(tmp_path) for p in (tmp_path / "models").rglob("*"))
    csv = synthetic_csv(tmp_path / "EURUSD_M1.csv", 4500, seed=5)
    ran = paper_run(settings, csv, tmp_path / "paper.sqlite3")
    # A paper run with models enabled keeps models.initial_train_bars of history before
    # it trades; the backtest starts at the same bar.
    first = pd.read_csv(csv, sep="\t").iloc[settings.models.initial_train_bars]
    journal, code = backtest(
        settings, csv, start=f"{first['<DATE>']} {first['<TIME>']}".replace(".", "-")
    )
    assert code == 0
    assert ran and trades(journal) == ran
    conn = sqlite3.connect(journal)
    try:
        served = dict(
            conn.execute(
                "SELECT DISTINCT model, version FROM predictions WHERE stage = 'production'"
            )
        )
    finally:
        conn.close()
    assert served == {k: "1.0.0" for k in ("rf", "xgb", "lstm", "mlp")}
    # The live store was only read: the backtest served its own copy.
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "models").rglob("*")) == live_store
    assert (journal.with_name(journal.stem + "_models") / "EURUSD" / "rf").is_dir()


def test_unusable_inputs_are_refused_with_what_is_missing(tmp_path: Path) -> None:
    settings = baseline_settings(tmp_path)
    csv = synthetic_csv(tmp_path / "EURUSD_M1.csv", 150)
    with pytest.raises(InvalidInput, match=r"150 M1 bars .* needs 200 bars first"):
        plan_backtest(settings, symbol="EURUSD", data=str(csv))
    with pytest.raises(InvalidInput, match="M5"):
        plan_backtest(settings, symbol="EURUSD", data=str(csv), timeframe="M5")
    with pytest.raises(InvalidInput, match=r"--symbol FOO: no \[symbols.FOO\]"):
        plan_backtest(settings, symbol="FOO", data=str(csv))
    with pytest.raises(InvalidInput, match="not before --to"):
        plan_backtest(
            settings, symbol="EURUSD", data="synthetic", start="2024-02-01", end="2024-01-01"
        )
    with pytest.raises(InvalidInput, match="--from 'yesterday': not a date"):
        plan_backtest(settings, symbol="EURUSD", data="synthetic", start="yesterday")
    with pytest.raises(InvalidInput, match=r"missing\.csv"):
        plan_backtest(settings, symbol="EURUSD", data=str(tmp_path / "missing.csv"))
    wf = baseline_settings(
        tmp_path,
        SCALPER__MODELS__RF__ENABLED="true",
        SCALPER__MODELS__INITIAL_TRAIN_BARS="1000",
    )
    with pytest.raises(InvalidInput, match=r"initial_train_bars = 1,000 bars before --from"):
        plan_backtest(
            wf, symbol="EURUSD", data=str(csv), start="2025-03-03T02:00Z", walk_forward=True
        )


def test_gaps_duplicates_and_weekends_in_the_data_are_cleaned_and_reported(
    tmp_path: Path,
) -> None:
    market = SyntheticMarket(
        symbol="EURUSD",
        seed=3,
        start=datetime(2025, 3, 6, tzinfo=UTC),
        timeframe_s=60,
        base_price=1.1,
        point=0.00001,
        base_spread_points=8,
    )
    frame = market.generate(6000)
    # A weekend (Fri 22:00 to Sun 22:00 is missing), a duplicated bar and a hole.
    t = frame["time"]
    weekend = (t >= pd.Timestamp("2025-03-07T22:00Z")) & (t < pd.Timestamp("2025-03-09T22:00Z"))
    frame = frame[~weekend]
    frame = pd.concat(
        [frame.iloc[:1000], frame.iloc[999:1000], frame.iloc[1000:1500], frame.iloc[1530:]],
        ignore_index=True,
    )
    csv = write_mt5_csv(tmp_path / "EURUSD_M1.csv", frame)
    plan = plan_backtest(baseline_settings(tmp_path), symbol="EURUSD", data=str(csv))
    note = plan.notes[0]
    assert "1 rejected" in note or "duplicate" in note
    assert "1 weekends" in note
    assert plan.bars == len(frame) - 1 - plan.warmup_bars


def test_an_interrupted_backtest_leaves_a_valid_journal(tmp_path: Path) -> None:
    settings = baseline_settings(tmp_path)
    csv = synthetic_csv(tmp_path / "EURUSD_M1.csv", 3000)
    plan = plan_backtest(settings, symbol="EURUSD", data=str(csv))
    plan.journal.parent.mkdir(parents=True)

    async def interrupted() -> int:
        stop = asyncio.Event()
        seen = 0

        def on_bar(_bar: object) -> None:
            nonlocal seen
            seen += 1
            if seen == 1200:
                stop.set()  # what Ctrl-C does through the signal handler

        return await run_backtest(
            backtest_settings(settings, plan, []),
            plan,
            on_bar=on_bar,
            stop=stop,
            install_signals=False,
        )

    assert asyncio.run(interrupted()) == 0
    conn = sqlite3.connect(plan.journal)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        last = conn.execute(
            "SELECT value FROM state WHERE key = 'feed.last_bar_time.EURUSD'"
        ).fetchone()
        stopped = conn.execute(
            "SELECT message FROM events WHERE kind = 'daemon_stopped'"
        ).fetchone()
    finally:
        conn.close()
    assert last is not None and stopped == ("stopped: signal",)


def test_cli_backtest_on_synthetic_data_prints_the_journal_under_data_backtests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for key, value in {
        "SCALPER__STORAGE__JOURNAL_PATH": "data/journal.sqlite3",
        "SCALPER__STORAGE__MODELS_DIR": "models",
        "SCALPER__RISK__KILL_SWITCH_PATH": "KILL",
        "SCALPER__LOGGING__LEVEL": "ERROR",
    }.items():
        monkeypatch.setenv(key, value)
    code = main(["backtest", "--symbol", "EURUSD", "--data", "synthetic", "--to", "2024-01-03"])
    out = capsys.readouterr().out
    assert code == 0
    assert "backtest EURUSD M1 on synthetic" in out
    assert "the baseline predictor trades" in out
    journals = list((tmp_path / "data" / "backtests").glob("*.sqlite3"))
    assert len(journals) == 1 and f"journal: {Path('data/backtests') / journals[0].name}" in out
    html = journals[0].with_suffix(".html")
    assert html.is_file() and f"report    {Path('data/backtests') / html.name}" in out
    assert main(["backtest", "--symbol", "EURUSD", "--data", "nope.csv"]) == 2
    assert "nope.csv" in capsys.readouterr().err
    # `report` makes one for any journal, e.g. again with another name.
    again = tmp_path / "again.html"
    assert main(["report", "--journal", str(journals[0]), "--out", str(again)]) == 0
    assert again.is_file() and "closed trades" in capsys.readouterr().out
    assert main(["report", "--journal", "missing.sqlite3"]) == 2
    assert "missing.sqlite3" in capsys.readouterr().err
