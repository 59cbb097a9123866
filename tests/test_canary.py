"""Canary: a configured fraction of position size follows the candidate in shadow."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from config.settings import load_settings
from execution.paper import PaperBroker, specs_from_settings
from execution.risk import RiskManager
from ml.predictor_map import PredictorMap
from strategy.features import FeatureSpec
from strategy.scalper import ScalpingStrategy
from tests.test_auto_trainer import synthetic_bars
from utils.clock import FakeClock
from utils.trade_journal import Journal

SPEC = FeatureSpec()
FLAT = (0.3, 0.4, 0.3)
UP = (0.1, 0.2, 0.7)


@dataclass
class Fixed:
    kind: str
    version: str
    proba: tuple[float, float, float]
    stage: str = "production"
    feature_hash: str = SPEC.hash

    def predict_proba(self, row: np.ndarray) -> np.ndarray:
        return np.array(self.proba)

    def observe(self, row: np.ndarray) -> None:
        """Stateless."""


def first_trade(
    tmp_path: Path, *, production: tuple[float, ...], shadow: tuple[float, ...] | None, f: float
) -> tuple[float, str] | None:
    """Run bars until the first entry; return its (volume, model_set)."""
    settings = load_settings(
        environ={
            "SCALPER__TRADING__SYMBOLS": '["EURUSD"]',
            "SCALPER__AUTOTRAIN__CANARY_FRACTION": str(f),
            "SCALPER__RISK__KILL_SWITCH_PATH": str(tmp_path / "KILL"),
        }
    )
    clock = FakeClock(datetime(2026, 1, 5, tzinfo=UTC))
    journal = Journal(tmp_path / f"{production}{shadow}{f}.sqlite3", clock=clock)
    journal.open()
    specs = specs_from_settings({"EURUSD": settings.symbols["EURUSD"]})
    broker = PaperBroker(specs, initial_balance=10_000.0, leverage=100, timeframe_s=60)
    predictors = PredictorMap()
    predictors.swap("EURUSD", "xgb", Fixed("xgb", "1.0.0", production))  # type: ignore[arg-type]
    if shadow is not None:
        predictors.swap_shadow("EURUSD", "xgb", Fixed("xgb", "1.0.1", shadow, "shadow"))  # type: ignore[arg-type]
    strategy = ScalpingStrategy(
        settings=settings,
        broker=broker,
        risk=RiskManager(settings.risk, account_currency="USD"),
        journal=journal,
        predictors=predictors,
        specs=specs,
        clock=clock,
        feature_spec=SPEC,
        mode="paper",
    )

    async def go() -> tuple[float, str] | None:
        for bar in synthetic_bars(400):
            await broker.on_bar(bar)
            await strategy.on_bar(bar)
            if strategy.status.entries:
                break
        await journal.flush()
        rows = journal.call(lambda c: c.execute("SELECT volume, model_set FROM trades").fetchall())
        return (float(rows[0][0]), str(rows[0][1])) if rows else None

    try:
        return asyncio.run(go())
    finally:
        journal.close()


def test_a_canary_entry_takes_its_fraction_of_the_size(tmp_path: Path) -> None:
    full = first_trade(tmp_path, production=UP, shadow=None, f=0.0)
    assert full is not None
    canary = first_trade(tmp_path, production=FLAT, shadow=UP, f=0.25)
    assert canary is not None
    # Only the candidate wants in: a quarter of the risk budget, floored to the step.
    assert canary[0] == pytest.approx(int(full[0] * 0.25 / 0.01) * 0.01, abs=0.011)
    assert "canary 0.25" in canary[1]
    # Both want in: the whole size.
    both = first_trade(tmp_path, production=UP, shadow=UP, f=0.25)
    assert both is not None and both[0] == pytest.approx(full[0], abs=0.011)


def test_without_a_canary_the_shadow_never_trades(tmp_path: Path) -> None:
    assert first_trade(tmp_path, production=FLAT, shadow=UP, f=0.0) is None
