"""Walk-forward honesty: no edge is found in noise, a planted edge is found and traded.

A walk-forward replays history through the daemon's kernel while the auto-trainer
trains, gates and promotes exactly as live (the replay waits for each job). Two
markets are written as MT5 exports:

- a pure random walk: nothing is learnable, so the real validation gates must
  reject every candidate; with ``trade_without_models = false`` nothing trades and
  the walk-forward return is zero. A leaky feature, label or split would show a
  holdout edge here and get a model promoted.
- a mean-reverting market (price = slow random walk + AR(1) deviation with
  phi 0.8): the next five bars undo most of the deviation, which the features see
  (z-score, momentum) and the momentum baseline trades the wrong way. Models
  must find it, pass the same gates, be promoted, and make money after costs.

Tiny models keep this fast; the gates are the shipped defaults except the
minimum number of simulated trades, scaled to the tiny holdout.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from config.settings import Settings, load_settings
from main import backtest_settings, plan_backtest, run_backtest
from ml.training import InlineBackend
from tests.test_backtest import write_mt5_csv

TINY = {
    "SCALPER__LOGGING__LEVEL": "WARNING",
    "SCALPER__PAPER__HISTORY_BARS": "200",
    "SCALPER__STRATEGY__TRADE_WITHOUT_MODELS": "false",
    "SCALPER__MODELS__INITIAL_TRAIN_BARS": "3000",
    "SCALPER__MODELS__TRAIN_BARS": "3000",
    "SCALPER__MODELS__RF__N_ESTIMATORS": "20",
    "SCALPER__MODELS__RF__MAX_DEPTH": "5",
    "SCALPER__MODELS__XGB__N_ESTIMATORS": "20",
    "SCALPER__MODELS__XGB__MAX_DEPTH": "3",
    "SCALPER__MODELS__LSTM__ENABLED": "false",
    "SCALPER__MODELS__MLP__HIDDEN_1": "16",
    "SCALPER__MODELS__MLP__HIDDEN_2": "8",
    "SCALPER__MODELS__MLP__HIDDEN_3": "8",
    "SCALPER__MODELS__MLP__MAX_STEPS": "150",
    "SCALPER__MODELS__MLP__BATCH_SIZE": "64",
    # One scheduled retrain per kind inside the traded period.
    **{f"SCALPER__MODELS__{k}__RETRAIN_EVERY_S": "86400" for k in ("RF", "XGB", "MLP")},
    "SCALPER__VALIDATION__MIN_TRADES": "10",
    # Whole-day sessions: the synthetic markets trade around the clock.
    "SCALPER__RISK__SESSION_START_HOUR_UTC": "0",
    "SCALPER__RISK__SESSION_END_HOUR_UTC": "24",
}


def settings_for(tmp_path: Path) -> Settings:
    return load_settings(
        environ={
            "SCALPER__STORAGE__JOURNAL_PATH": str(tmp_path / "data" / "journal.sqlite3"),
            "SCALPER__STORAGE__MODELS_DIR": str(tmp_path / "models"),
            "SCALPER__RISK__KILL_SWITCH_PATH": str(tmp_path / "KILL"),
            **TINY,
        }
    )


def market(n: int, *, seed: int, phi: float | None) -> pd.DataFrame:
    """M1 bars from 2025-03-03: a random walk, or a random walk plus an AR(1) deviation."""
    rng = np.random.default_rng(seed)
    sigma = 0.00025
    if phi is None:
        log_price = np.cumsum(rng.normal(0.0, sigma, n))
    else:
        trend = np.cumsum(rng.normal(0.0, sigma * 0.3, n))
        deviation = np.zeros(n)
        shocks = rng.normal(0.0, sigma, n)
        for i in range(1, n):
            deviation[i] = phi * deviation[i - 1] + shocks[i]
        log_price = trend + deviation
    close = 1.10 * np.exp(log_price)
    open_ = np.concatenate([[close[0]], close[:-1]])
    wick = np.abs(rng.normal(0.0, sigma * 0.3, (2, n)))
    return pd.DataFrame(
        {
            "time": pd.date_range(datetime(2025, 3, 3, tzinfo=UTC), periods=n, freq="1min"),
            "open": open_,
            "high": np.maximum(open_, close) + wick[0] * 1.10,
            "low": np.minimum(open_, close) - wick[1] * 1.10,
            "close": close,
            "tick_volume": rng.integers(20, 200, n),
            "spread": np.full(n, 5),
        }
    )


def walk_forward(tmp_path: Path, frame: pd.DataFrame) -> dict[str, object]:
    settings = settings_for(tmp_path)
    csv = write_mt5_csv(tmp_path / "EURUSD_M1.csv", frame)
    plan = plan_backtest(settings, symbol="EURUSD", data=str(csv), walk_forward=True)
    plan.journal.parent.mkdir(parents=True, exist_ok=True)
    run = backtest_settings(settings, plan, settings.models.enabled_kinds)
    code = asyncio.run(run_backtest(run, plan, install_signals=False, backend=InlineBackend()))
    assert code == 0
    conn = sqlite3.connect(plan.journal)
    try:
        runs = conn.execute("SELECT kind, status FROM training_runs").fetchall()
        promoted = conn.execute(
            "SELECT kind, version FROM model_events "
            "WHERE event IN ('auto_promoted', 'promoted', 'shadow_promoted')"
        ).fetchall()
        net = [r[0] for r in conn.execute("SELECT net_profit FROM trades WHERE status='closed'")]
        equity = [r[0] for r in conn.execute("SELECT equity FROM equity ORDER BY id")]
        served = conn.execute(
            "SELECT DISTINCT model FROM predictions WHERE stage = 'production'"
        ).fetchall()
    finally:
        conn.close()
    assert not (tmp_path / "models").exists(), "a walk-forward never writes the live store"
    return {
        "plan": plan,
        "runs": runs,
        "promoted": promoted,
        "net": net,
        "equity": equity,
        "served": {r[0] for r in served},
    }


def test_on_a_random_walk_no_model_is_promoted_and_nothing_is_earned(tmp_path: Path) -> None:
    result = walk_forward(tmp_path, market(6000, seed=1, phi=None))
    runs = result["runs"]
    assert isinstance(runs, list) and len(runs) >= 6  # first models and the scheduled retrains
    assert {status for _, status in runs} == {"rejected"}
    assert result["promoted"] == []
    assert result["net"] == []
    equity = result["equity"]
    assert isinstance(equity, list) and equity and max(equity) == min(equity) == 10_000.0


def test_on_a_planted_mean_reversion_models_are_promoted_and_earn_after_costs(
    tmp_path: Path,
) -> None:
    result = walk_forward(tmp_path, market(6000, seed=2, phi=0.8))
    promoted = result["promoted"]
    assert isinstance(promoted, list) and len(promoted) >= 2
    served = result["served"]
    assert isinstance(served, set) and served  # trades were decided by trained models
    net = result["net"]
    assert isinstance(net, list) and len(net) >= 30
    assert sum(net) > 0
    wins = sum(1 for p in net if p > 0) / len(net)
    assert wins > 0.5
