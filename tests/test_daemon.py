"""The daemon end to end: a paper run with a fake clock, resume, status, bad input, crashes.

In-process runs use ``FakeClock`` (replay pacing costs no wall time). The crash
and signal tests start ``python main.py`` as a real process: crashes use the
deterministic crash points of ``SCALPER_CRASH_AT`` rather than timed kills.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from config.settings import Settings, load_settings
from main import EXIT_INVALID, EXIT_OK, cmd_status, main, run_daemon
from utils.clock import FakeClock, SystemClock, parse_iso_utc

ROOT = Path(__file__).resolve().parent.parent


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "SCALPER__STORAGE__JOURNAL_PATH": str(tmp_path / "journal.sqlite3"),
        "SCALPER__RISK__KILL_SWITCH_PATH": str(tmp_path / "KILL"),
        "SCALPER__PAPER__HISTORY_BARS": "100",
        "SCALPER__LOGGING__LEVEL": "WARNING",
        "SCALPER__LOGGING__FORMAT": "json",
        # These tests are about the daemon around the predictors: the baseline serves.
        # tests/test_daemon_models.py runs the daemon with (tiny) trained models.
        "SCALPER__STORAGE__MODELS_DIR": str(tmp_path / "models"),
        **{f"SCALPER__MODELS__{k}__ENABLED": "false" for k in ("RF", "XGB", "LSTM", "MLP")},
    }
    env.update(extra)
    return env


def settings_for(tmp_path: Path, **extra: str) -> Settings:
    return load_settings(environ=env_for(tmp_path, **extra))


def run_in_process(settings: Settings, max_bars: int, clock: FakeClock | None = None) -> int:
    clock = clock or FakeClock(datetime(2026, 1, 5, 8, 0, tzinfo=UTC))
    return asyncio.run(
        run_daemon(
            settings, clock=clock, max_bars=max_bars, install_signals=False, command_poll_s=None
        )
    )


def query(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def double_fills(journal: Path) -> list[tuple[object, ...]]:
    """Client order ids the broker filled more than once (must never happen)."""
    return query(
        journal,
        "SELECT client_order_id, count(*) FROM orders WHERE action='open' AND retcode=10009 "
        "GROUP BY client_order_id HAVING count(*) > 1",
    )


def account_identity(journal: Path, initial: float) -> tuple[float, float]:
    """(balance from the last equity snapshot, initial + closed net P&L + open commissions)."""
    balance = query(journal, "SELECT balance FROM equity ORDER BY id DESC LIMIT 1")[0][0]
    closed = query(journal, "SELECT COALESCE(SUM(net_profit), 0) FROM trades WHERE status='closed'")
    open_comm = query(
        journal, "SELECT COALESCE(SUM(commission), 0) FROM trades WHERE status='open'"
    )
    return float(balance), initial + float(closed[0][0]) + float(open_comm[0][0])  # type: ignore[arg-type]


def test_paper_run_trades_and_journals_everything(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    clock = FakeClock(datetime(2026, 1, 5, 8, 0, tzinfo=UTC))
    assert run_in_process(settings, 2000, clock) == EXIT_OK
    journal = tmp_path / "journal.sqlite3"
    trades = query(journal, "SELECT status, net_profit, client_order_id FROM trades")
    assert len(trades) >= 5, "the baseline should trade on the synthetic market"
    assert any(t[0] == "closed" for t in trades)
    assert double_fills(journal) == []
    assert all(len(str(t[2])) <= 16 and str(t[2]).isalnum() for t in trades)
    orders = query(journal, "SELECT action, retcode FROM orders")
    assert sum(1 for o in orders if o[0] == "open" and o[1] == 10009) == len(trades)
    assert query(journal, "SELECT count(*) FROM predictions")[0][0] > 1000
    kinds = [r[0] for r in query(journal, "SELECT kind FROM events ORDER BY id")]
    assert kinds[0] == "daemon_started" and kinds[-1] == "daemon_stopped"
    balance, expected = account_identity(journal, settings.paper.initial_balance)
    assert balance == pytest.approx(expected, abs=1e-6)
    # Replay pacing went through the fake clock: 2000 bars at 100 bars/s = ~20 s.
    assert clock.monotonic() == pytest.approx(19.99, abs=0.05)
    # Exits respect the configured maximum holding time.
    held = query(journal, "SELECT max(bars_held) FROM trades WHERE close_reason='max_holding'")
    assert held[0][0] is None or held[0][0] <= settings.strategy.max_holding_bars


def test_second_run_resumes_after_the_last_bar_and_restores_positions(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    journal = tmp_path / "journal.sqlite3"
    assert run_in_process(settings, 700) == EXIT_OK
    last_bar = query(journal, "SELECT value FROM state WHERE key='feed.last_bar_time.EURUSD'")[0][0]
    first_ids = {r[0] for r in query(journal, "SELECT client_order_id FROM trades")}
    assert run_in_process(settings, 700) == EXIT_OK
    rows = query(journal, "SELECT client_order_id, open_time FROM trades ORDER BY id")
    later = [r for r in rows if r[0] not in first_ids]
    assert later, "the second run should trade too"
    assert all(str(r[1]) > str(last_bar).strip('"') for r in later)
    assert double_fills(journal) == []
    balance, expected = account_identity(journal, settings.paper.initial_balance)
    assert balance == pytest.approx(expected, abs=1e-6)


def test_kill_switch_file_stops_new_entries_and_says_why(tmp_path: Path) -> None:
    (tmp_path / "KILL").write_text("stop", encoding="utf-8")
    assert run_in_process(settings_for(tmp_path), 1500) == EXIT_OK
    journal = tmp_path / "journal.sqlite3"
    assert query(journal, "SELECT count(*) FROM trades")[0][0] == 0
    blocked = query(journal, "SELECT message FROM events WHERE kind='entries_blocked'")
    assert len(blocked) == 1 and "kill switch" in str(blocked[0][0])
    out = io.StringIO()
    assert cmd_status(journal, check=False, clock=SystemClock(), out=out) == EXIT_OK
    assert "new entries blocked" in out.getvalue() and "kill switch" in out.getvalue()


def test_restart_without_a_symbol_that_has_open_positions_is_refused(tmp_path: Path) -> None:
    two = settings_for(tmp_path, SCALPER__TRADING__SYMBOLS='["EURUSD","GBPUSD"]')
    assert run_in_process(two, 400) == EXIT_OK
    journal = tmp_path / "journal.sqlite3"
    open_gbp = query(journal, "SELECT count(*) FROM trades WHERE status='open' AND symbol='GBPUSD'")
    if open_gbp[0][0] == 0:
        # Make sure there is one: an open GBPUSD trade as the paper broker would journal it.
        conn = sqlite3.connect(journal)
        conn.execute(
            "INSERT INTO trades (client_order_id, symbol, side, volume, open_time, open_price, "
            "broker_position_id, status, commission, mode) VALUES "
            "('TESTOPEN1', 'GBPUSD', 'buy', 0.1, '2024-01-01T10:00:00Z', 1.27, 999, 'open', "
            "-0.35, 'paper')"
        )
        conn.commit()
        conn.close()
    with pytest.raises(Exception, match=r"trading\.symbols") as err:
        run_in_process(settings_for(tmp_path), 100)
    assert type(err.value).__name__ == "InvalidInput"


def test_a_symbol_added_later_joins_at_the_current_market_time(tmp_path: Path) -> None:
    assert run_in_process(settings_for(tmp_path), 600) == EXIT_OK
    journal = tmp_path / "journal.sqlite3"
    last = query(journal, "SELECT value FROM state WHERE key='feed.last_bar_time.EURUSD'")[0][0]
    two = settings_for(tmp_path, SCALPER__TRADING__SYMBOLS='["EURUSD","GBPUSD"]')
    assert run_in_process(two, 200) == EXIT_OK
    gbp = query(journal, "SELECT min(bar_time) FROM predictions WHERE symbol='GBPUSD'")[0][0]
    assert gbp is not None and str(gbp) > str(last).strip('"')


def test_status_reads_the_journal(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    assert run_in_process(settings, 1500) == EXIT_OK
    out = io.StringIO()
    code = cmd_status(tmp_path / "journal.sqlite3", check=True, clock=SystemClock(), out=out)
    text = out.getvalue()
    assert code == EXIT_OK
    assert "integrity_check: ok" in text
    assert "equity" in text and "open positions:" in text
    assert "today:" in text and "win rate" in text
    closed_today = query(
        tmp_path / "journal.sqlite3",
        "SELECT count(*) FROM trades WHERE status='closed' AND substr(close_time,1,10) = "
        "(SELECT substr(json_extract(value, '$'),1,10) FROM state "
        "WHERE key='feed.last_bar_time.EURUSD')",
    )[0][0]
    assert f"today: {closed_today} closed trades" in text


def test_bad_setting_exits_2_and_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[risk]\nmax_positions_total = -4\n", encoding="utf-8")
    assert main(["run", "--config", str(bad), "--max-bars", "10"]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "risk.max_positions_total" in err and "-4" in err


def test_foreign_journal_is_refused_and_left_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = tmp_path / "journal.sqlite3"
    foreign.write_bytes(b"these are my notes, not a journal\n" * 10)
    before = foreign.read_bytes()
    for key, value in env_for(tmp_path).items():
        monkeypatch.setenv(key, value)
    assert main(["run", "--max-bars", "10"]) == EXIT_INVALID
    assert foreign.read_bytes() == before
    assert "journal" in capsys.readouterr().err.lower()


def test_csv_without_usable_rows_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bars.csv"
    data.write_text("time,open,high,low,close,volume\nnot,a,bar,at,all,x\n", encoding="utf-8")
    for key, value in env_for(tmp_path, SCALPER__PAPER__DATA=str(data)).items():
        monkeypatch.setenv(key, value)
    assert main(["run", "--max-bars", "10"]) == EXIT_INVALID
    assert str(data) in capsys.readouterr().err


def test_paper_run_on_a_csv_file_trades_and_stops_at_the_end(tmp_path: Path) -> None:
    from market_data.synthetic import SyntheticMarket

    frame = SyntheticMarket(seed=5).generate(1500)
    data = tmp_path / "EURUSD.csv"
    frame.assign(volume=frame["tick_volume"], time=frame["time"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"))[
        ["time", "open", "high", "low", "close", "volume", "spread"]
    ].to_csv(data, index=False)
    settings = settings_for(tmp_path, SCALPER__PAPER__DATA=str(data))
    assert run_in_process(settings, 100_000) == EXIT_OK
    journal = tmp_path / "journal.sqlite3"
    assert query(journal, "SELECT count(*) FROM trades")[0][0] > 0
    stopped = query(journal, "SELECT message FROM events WHERE kind='daemon_stopped'")
    assert "replay finished" in str(stopped[-1][0])


# -- real processes -------------------------------------------------------------------


def daemon_cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), *args]


def process_env(tmp_path: Path, extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SCALPER")}
    env.update(env_for(tmp_path, SCALPER__PAPER__REPLAY_BARS_PER_S="0"))
    env.update(extra)
    return env


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX SIGKILL semantics")
def test_killed_mid_run_and_restarted_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite3"
    initial = Settings().paper.initial_balance
    # Crash 1: right after the broker filled an order, before the journal has it.
    # Crash 2: after a bar was fully processed. Then a clean run to the end.
    for crash in ("order:4", "bar:900", None):
        extra = {"SCALPER_CRASH_AT": crash} if crash else {}
        proc = subprocess.run(
            daemon_cmd("run", "--max-bars", "600" if crash is None else "5000"),
            env=process_env(tmp_path, extra),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if crash is None:
            assert proc.returncode == 0, proc.stderr[-2000:]
        else:
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        check = query(journal, "PRAGMA integrity_check")
        assert check == [("ok",)]
    ids = query(journal, "SELECT client_order_id, broker_position_id FROM trades")
    assert double_fills(journal) == []
    assert len({r[1] for r in ids}) == len(ids), "a paper position id was reused after restart"
    assert len(ids) > 5
    balance, expected = account_identity(journal, initial)
    assert balance == pytest.approx(expected, abs=1e-6)
    # Every trade the journal still calls open is a real open position of the last run.
    opened = query(journal, "SELECT count(*) FROM trades WHERE status='open'")[0][0]
    last = query(journal, "SELECT open_positions FROM equity ORDER BY id DESC LIMIT 1")[0][0]
    assert opened == last


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX SIGKILL semantics")
def test_a_decision_replayed_after_a_crash_is_never_filled_twice(tmp_path: Path) -> None:
    # Several positions per symbol: the risk check alone would not stop a second fill.
    extra = {
        "SCALPER__RISK__MAX_POSITIONS_PER_SYMBOL": "3",
        "SCALPER__STRATEGY__CLOSE_ON_OPPOSITE_SIGNAL": "false",
    }
    journal = tmp_path / "journal.sqlite3"
    for crash in ("trade:2", "trade:3", None):
        env = dict(extra, **({"SCALPER_CRASH_AT": crash} if crash else {}))
        proc = subprocess.run(
            daemon_cmd("run", "--max-bars", "400"),
            env=process_env(tmp_path, env),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == (0 if crash is None else -signal.SIGKILL), proc.stderr[-2000:]
    assert double_fills(journal) == []
    fills = query(journal, "SELECT count(*) FROM orders WHERE action='open' AND retcode=10009")
    trades = query(journal, "SELECT count(*) FROM trades")
    assert fills == trades
    balance, expected = account_identity(journal, Settings().paper.initial_balance)
    assert balance == pytest.approx(expected, abs=1e-6)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM to a child is POSIX")
def test_sigterm_at_full_speed_with_nothing_to_do_still_stops_with_exit_0(tmp_path: Path) -> None:
    (tmp_path / "KILL").write_text("stop", encoding="utf-8")
    env = process_env(tmp_path, {"SCALPER__LOGGING__LEVEL": "INFO"})
    proc = subprocess.Popen(
        daemon_cmd("run"), env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if '"daemon_ready"' in line:
                break
        # status reads the journal while the daemon writes it.
        out = io.StringIO()
        assert (
            cmd_status(tmp_path / "journal.sqlite3", check=True, clock=SystemClock(), out=out) == 0
        )
        assert "integrity_check: ok" in out.getvalue()
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest[-2000:]


def test_max_bars_works_without_the_run_word(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env_for(tmp_path, SCALPER__PAPER__REPLAY_BARS_PER_S="0").items():
        monkeypatch.setenv(key, value)
    assert main(["--max-bars", "150"]) == EXIT_OK
    stopped = query(
        tmp_path / "journal.sqlite3", "SELECT message FROM events WHERE kind='daemon_stopped'"
    )
    assert "max_bars=150" in str(stopped[-1][0])


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM to a child is POSIX")
def test_sigterm_stops_cleanly_with_exit_0(tmp_path: Path) -> None:
    env = process_env(
        tmp_path, {"SCALPER__PAPER__REPLAY_BARS_PER_S": "200", "SCALPER__LOGGING__LEVEL": "INFO"}
    )
    proc = subprocess.Popen(
        daemon_cmd("run"), env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    assert proc.stderr is not None
    try:
        for line in proc.stderr:  # blocks on the daemon's own output, no sleeping
            if '"daemon_ready"' in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest[-2000:]
    journal = tmp_path / "journal.sqlite3"
    kinds = [r[0] for r in query(journal, "SELECT kind FROM events ORDER BY id")]
    assert kinds[-1] == "daemon_stopped"
    assert query(journal, "PRAGMA integrity_check") == [("ok",)]


def test_old_predictions_are_pruned_once_a_market_day(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SCALPER__STORAGE__PREDICTIONS_KEEP_DAYS="1")
    assert run_in_process(settings, 4000) == EXIT_OK  # ~2.8 market days of M1 bars
    journal = tmp_path / "journal.sqlite3"
    first, last = query(journal, "SELECT min(bar_time), max(bar_time) FROM predictions")[0]
    span = parse_iso_utc(str(last)) - parse_iso_utc(str(first))
    assert span < timedelta(days=2), span  # older rows went; the last day or so stays
    assert query(journal, "SELECT count(*) FROM trades")[0][0] > 0  # trades are never pruned
