"""``python main.py run`` with broker.kind = mt5 on the fake terminal, with and without faults.

The fake runs in step mode: every poll of the feed moves its market one bar on,
so a daemon on the wall clock sees a new closed bar per poll. Its deal history
is dumped at shutdown and compared with the journal.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.mt5_fixtures import FAKES, MAGIC, assert_journal_matches_fake

ROOT = Path(__file__).resolve().parent.parent


def run_daemon(
    tmp_path: Path, fake: dict[str, Any], max_bars: int, **extra: str
) -> subprocess.CompletedProcess[str]:
    config = {
        "start": "now",
        "step_s": 60,
        "server_timezone": "Europe/Athens",
        "symbols": {"EURUSD": {}},
        "account": {"commission_per_lot": 3.5},
        **fake,
    }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SCALPER__")},
        "PYTHONPATH": os.pathsep.join([str(FAKES), str(ROOT)]),
        "MT5FAKE_CONFIG": json.dumps(config),
        "MT5FAKE_DUMP": str(tmp_path / "fake.json"),
        "SCALPER__BROKER__KIND": "mt5",
        "SCALPER__BROKER__SERVER_TIMEZONE": "Europe/Athens",
        "SCALPER__BROKER__POLL_INTERVAL_S": "0.01",
        "SCALPER__BROKER__RECONNECT_BACKOFF_MAX_S": "1",
        "SCALPER__STORAGE__JOURNAL_PATH": str(tmp_path / "journal.sqlite3"),
        "SCALPER__STORAGE__MODELS_DIR": str(tmp_path / "models"),
        "SCALPER__RISK__KILL_SWITCH_PATH": str(tmp_path / "KILL"),
        "SCALPER__PAPER__HISTORY_BARS": "200",
        "SCALPER__LOGGING__LEVEL": "WARNING",
        "SCALPER__LOGGING__FORMAT": "json",
        "SCALPER__STRATEGY__TRADE_WITHOUT_MODELS": "true",
        "SCALPER__STRATEGY__MIN_CONFIDENCE": "0.34",
        "SCALPER__STRATEGY__MAX_HOLDING_BARS": "3",
        **{f"SCALPER__MODELS__{k}__ENABLED": "false" for k in ("RF", "XGB", "LSTM", "MLP")},
        **extra,
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "run", "--max-bars", str(max_bars)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "faults",
    [
        {},
        {
            "random": {
                "seed": 3,
                "requote": 0.15,
                "reject": 0.05,
                "lost_request": 0.05,
                "lost_result": 0.1,
                "timeout_executed": 0.05,
                "disconnect_per_call": 0.01,
            }
        },
    ],
    ids=["clean", "faults"],
)
def test_daemon_trades_live_on_the_fake_terminal(tmp_path: Path, faults: dict[str, Any]) -> None:
    proc = run_daemon(tmp_path, {"faults": faults}, max_bars=50)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dump = json.loads((tmp_path / "fake.json").read_text(encoding="utf-8"))
    compared = assert_journal_matches_fake(tmp_path / "journal.sqlite3", dump["deals"], MAGIC)
    assert compared >= 5
    assert dump["concurrent_calls"] == 0 and dump["threads"] == 1
    status = subprocess.run(
        [
            sys.executable,
            str(ROOT / "main.py"),
            "status",
            "--journal",
            str(tmp_path / "journal.sqlite3"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert status.returncode == 0 and "broker: connected since" in status.stdout
    conn = sqlite3.connect(tmp_path / "journal.sqlite3")
    try:
        (started,) = conn.execute("SELECT message FROM events WHERE kind = 'daemon_started'")
        adopted = conn.execute("SELECT count(*) FROM trades WHERE model_set = 'adopted'")
        assert adopted.fetchone() == (0,)  # a reconnect mid-send adopts nothing
    finally:
        conn.close()
    assert started[0].startswith("mt5 daemon started on EURUSD")
    if faults:
        assert dump["init_calls"] > 1  # it lost the link and came back


def test_unknown_symbols_only_exit_2_with_the_fix(tmp_path: Path) -> None:
    proc = run_daemon(tmp_path, {}, max_bars=5, SCALPER__TRADING__SYMBOLS='["EURUSD.z"]')
    assert proc.returncode == 2
    assert "EURUSD.z" in proc.stderr and "suffix" in proc.stderr


@pytest.mark.parametrize(
    "faults",
    [
        {},
        {
            "random": {
                "seed": 5,
                "requote": 0.1,
                "reject": 0.05,
                "lost_result": 0.1,
                "disconnect_per_call": 0.01,
            }
        },
    ],
    ids=["clean", "faults"],
)
def test_daemon_trades_live_with_its_own_models_on_the_fake_terminal(
    tmp_path: Path, faults: dict[str, Any]
) -> None:
    """Models included: the first ones train (and pass the opened gates) before trading."""
    tiny = {
        "SCALPER__MODELS__XGB__ENABLED": "true",
        "SCALPER__MODELS__MLP__ENABLED": "true",
        "SCALPER__MODELS__INITIAL_TRAIN_BARS": "1500",
        "SCALPER__PAPER__HISTORY_BARS": "1500",
        "SCALPER__MODELS__RETRAIN_FIRST_WHEN_STALE": "true",
        "SCALPER__MODELS__XGB__N_ESTIMATORS": "8",
        "SCALPER__MODELS__XGB__MAX_DEPTH": "3",
        "SCALPER__MODELS__MLP__MAX_STEPS": "20",
        "SCALPER__MODELS__MLP__HIDDEN_1": "8",
        "SCALPER__MODELS__MLP__HIDDEN_2": "8",
        "SCALPER__MODELS__MLP__HIDDEN_3": "8",
        "SCALPER__VALIDATION__MIN_ACCURACY_EDGE": "-1",
        "SCALPER__VALIDATION__MAX_LOG_LOSS": "100",
        "SCALPER__VALIDATION__MIN_TRADES": "0",
        "SCALPER__VALIDATION__MIN_SHARPE": "-1000000",
        "SCALPER__VALIDATION__MAX_DRAWDOWN_PCT": "100",
        "SCALPER__VALIDATION__BEAT_BASELINE": "false",
        "SCALPER__VALIDATION__MAX_LATENCY_P99_MS": "1000",
    }
    proc = run_daemon(tmp_path, {"faults": faults}, max_bars=40, **tiny)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dump = json.loads((tmp_path / "fake.json").read_text(encoding="utf-8"))
    assert assert_journal_matches_fake(tmp_path / "journal.sqlite3", dump["deals"], MAGIC) >= 1
    conn = sqlite3.connect(tmp_path / "journal.sqlite3")
    try:
        runs = conn.execute("SELECT kind, status FROM training_runs ORDER BY id").fetchall()
        model_sets = {r[0] for r in conn.execute("SELECT model_set FROM trades")}
        predicted = {r[0] for r in conn.execute("SELECT DISTINCT model FROM predictions")}
    finally:
        conn.close()
    assert sorted(runs) == [("mlp", "passed"), ("xgb", "passed")]
    assert {"xgb", "mlp"} <= predicted
    assert all("xgb:1.0.0" in s and "mlp:1.0.0" in s for s in model_sets)


def test_status_says_whether_the_broker_is_connected(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from main import cmd_status
    from utils.clock import FakeClock
    from utils.trade_journal import Journal

    clock = FakeClock(datetime(2026, 1, 5, tzinfo=UTC))
    journal = Journal(tmp_path / "journal.sqlite3", clock=clock)
    journal.open()
    journal.record_event("info", "daemon_started", "mt5 daemon started on EURUSD", {})
    journal.record_event("info", "broker_connected", "MetaTrader 5 connected", {})
    journal.record_event(
        "error",
        "broker_connect_failed",
        "MetaTrader 5 initialize failed: (-6, 'Terminal: Authorization failed'): check "
        "SCALPER__BROKER__LOGIN; retry 1 in 1 s",
        {},
    )
    journal.close()
    out = io.StringIO()
    assert cmd_status(tmp_path / "journal.sqlite3", check=False, clock=clock, out=out) == 0
    line = next(x for x in out.getvalue().splitlines() if x.startswith("broker:"))
    assert line.startswith("broker: NOT CONNECTED, not trading since ")
    assert "Authorization failed" in line
