"""The self-learning loop in one short paper run: ``python -m bench.autotrain_demo``.

Runs the real daemon (paper broker, strategy, APScheduler thread, spawned
training worker, validation gates, shadow trials) on the embedded synthetic
market with a schedule measured in market minutes, so in about two minutes it
shows candidates trained, rejected with reasons, one promoted through shadow,
and an automatic rollback. The rollback is forced: once a shadow candidate has
been promoted, this script sabotages it (it answers confidently wrong, as a
model broken by a regime change would), and the rollback watch must catch it
and put the previous model back by itself.

It writes into a temporary directory (or ``--dir``) and prints ``status`` and
``models events`` at the end. Fault injection lives here, never in the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

DEMO_ENV = {
    "SCALPER__TRADING__SYMBOLS": '["EURUSD"]',
    "SCALPER__PAPER__REPLAY_BARS_PER_S": "40",
    "SCALPER__MODELS__INITIAL_TRAIN_BARS": "6000",
    "SCALPER__MODELS__TRAIN_BARS": "6000",
    # Small models: a retrain takes seconds, so the schedule below is visible.
    "SCALPER__MODELS__RF__N_ESTIMATORS": "40",
    "SCALPER__MODELS__XGB__N_ESTIMATORS": "60",
    "SCALPER__MODELS__LSTM__ENABLED": "false",
    "SCALPER__MODELS__MLP__MAX_STEPS": "400",
    # Retrain every 30 market minutes; decide shadow and rollback within a few minutes.
    **{f"SCALPER__MODELS__{k}__RETRAIN_EVERY_S": "1800" for k in ("RF", "XGB", "MLP")},
    "SCALPER__AUTOTRAIN__SHADOW_MIN_BARS": "150",
    "SCALPER__AUTOTRAIN__SHADOW_MAX_BARS": "600",
    "SCALPER__AUTOTRAIN__ROLLBACK_MIN_BARS": "150",
    "SCALPER__AUTOTRAIN__ROLLBACK_MAX_BARS": "600",
    "SCALPER__AUTOTRAIN__DRIFT_CHECK_EVERY_S": "14400",
    # The synthetic market has no edge to learn after costs, so nearly every candidate
    # fails the trading gates by default; the demo relaxes those three so some pass
    # and go on to shadow. The others (log-loss, vs production, trade count) stay.
    "SCALPER__VALIDATION__MIN_SHARPE": "-1000",
    "SCALPER__VALIDATION__MIN_ACCURACY_EDGE": "-0.05",
    "SCALPER__VALIDATION__BEAT_BASELINE": "false",
    "SCALPER__LOGGING__LEVEL": "WARNING",
}


class Sabotaged:
    """A served model whose up/down answers are swapped: same kind, version and stage."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.kind = inner.kind
        self.version = inner.version
        self.feature_hash = inner.feature_hash

    @property
    def stage(self) -> str:
        return str(self._inner.stage)

    @stage.setter
    def stage(self, value: str) -> None:
        self._inner.stage = value

    def observe(self, row: np.ndarray) -> None:
        self._inner.observe(row)

    def predict_proba(self, row: np.ndarray) -> np.ndarray:
        # Confidently wrong: most of the mass on what the model finds least likely.
        p = np.asarray(self._inner.predict_proba(row))
        out = np.full(3, 0.05)
        out[int(np.argmin(p))] = 0.9
        return out


def lifecycle_summary(journal: Path) -> str:
    """What the self-learning loop did, counted from the journal."""
    import sqlite3

    conn = sqlite3.connect(journal)
    try:
        runs = conn.execute(
            "SELECT status, count(*) FROM training_runs GROUP BY status ORDER BY 2 DESC"
        ).fetchall()
        events = conn.execute(
            "SELECT event, count(*) FROM model_events WHERE event IN ('validated', 'rejected', "
            "'shadow_started', 'shadow_promoted', 'shadow_rejected', 'auto_promoted', "
            "'auto_rolled_back', 'watch_ended', 'drift_alarm', 'swap_failed') "
            "GROUP BY event ORDER BY 2 DESC"
        ).fetchall()
        key = conn.execute(
            "SELECT time, kind, version, event FROM model_events WHERE event IN "
            "('shadow_promoted', 'auto_rolled_back', 'auto_promoted') ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    lines = ["training runs: " + ", ".join(f"{n} {status}" for status, n in runs)]
    lines.append("lifecycle events: " + ", ".join(f"{n} {event}" for event, n in events))
    lines += [f"  {t} {k} {v} {e}" for t, k, v, e in key]
    return "\n".join(lines)


async def demo(workdir: Path, max_bars: int) -> int:
    from config.settings import load_settings
    from main import cmd_status, serve, start_daemon
    from ml.auto_trainer import AutoTrainer, Trial
    from ml.cli_models import models_events
    from utils.clock import SystemClock

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SCALPER__")},
        **DEMO_ENV,
        "SCALPER__STORAGE__JOURNAL_PATH": str(workdir / "journal.sqlite3"),
        "SCALPER__STORAGE__MODELS_DIR": str(workdir / "models"),
        "SCALPER__RISK__KILL_SWITCH_PATH": str(workdir / "KILL"),
    }
    settings = load_settings(environ=env)
    sabotaged: list[str] = []
    original = AutoTrainer._promote_shadow

    def promote_then_sabotage(
        self: AutoTrainer, symbol: str, kind: str, trial: Trial, details: dict[str, Any]
    ) -> None:
        original(self, symbol, kind, trial, details)
        if sabotaged:
            return
        predictors = self._predictors

        def sabotage() -> None:
            serving = predictors.snapshot(symbol).get(kind)
            if serving is not None and serving.version == trial.version:
                predictors.swap(symbol, kind, Sabotaged(serving))
                sabotaged.append(f"{symbol} {kind} {trial.version}")
                print(f"demo: sabotaged {symbol} {kind} {trial.version} after its promotion")

        self._manager.call_in_loop(sabotage)

    AutoTrainer._promote_shadow = promote_then_sabotage  # type: ignore[method-assign]
    try:
        daemon = await start_daemon(settings, clock=SystemClock(), max_bars=max_bars)
        try:
            code = await serve(daemon, install_signals=True, command_poll_s=1.0)
        finally:
            daemon.journal.close()
    finally:
        AutoTrainer._promote_shadow = original  # type: ignore[method-assign]
    out = io.StringIO()
    cmd_status(workdir / "journal.sqlite3", check=False, clock=SystemClock(), out=out)
    print("\n$ python main.py status\n" + out.getvalue())
    print("$ python main.py models events --symbol EURUSD   (the last 25)")
    models_events(settings, "EURUSD", None, 25, out=sys.stdout, clock=SystemClock())
    print("\n" + lifecycle_summary(workdir / "journal.sqlite3"))
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="work directory (kept)")
    parser.add_argument("--max-bars", type=int, default=5000)
    args = parser.parse_args(argv)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(demo(args.dir, args.max_bars))
    with tempfile.TemporaryDirectory(prefix="scalper-demo-") as tmp:
        return asyncio.run(demo(Path(tmp), args.max_bars))


if __name__ == "__main__":
    sys.exit(main())
