"""Risk manager: stop distance, SL/TP rounding, sizing and entry filters (hand-computed)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from config.settings import RiskSettings
from execution.broker import Side, SymbolSpec
from execution.risk import RiskManager

DAY1 = datetime(2024, 1, 2, 9, 0, tzinfo=UTC)

EURUSD = SymbolSpec(
    symbol="EURUSD",
    contract_size=100_000.0,
    point=0.00001,
    digits=5,
    volume_min=0.01,
    volume_step=0.01,
    volume_max=50.0,
    profit_currency="USD",
    base_currency="EUR",
)
USDJPY = SymbolSpec(
    symbol="USDJPY",
    contract_size=100_000.0,
    point=0.001,
    digits=3,
    volume_min=0.01,
    volume_step=0.01,
    volume_max=50.0,
    profit_currency="JPY",
    base_currency="USD",
)


def manager(tmp_path: Path, **overrides: Any) -> RiskManager:
    values: dict[str, Any] = {"kill_switch_path": str(tmp_path / "KILL")}
    values.update(overrides)
    return RiskManager(RiskSettings(**values), account_currency="USD")


def check(risk: RiskManager, **overrides: Any) -> tuple[bool, str | None]:
    args: dict[str, Any] = {
        "symbol": "EURUSD",
        "bar_time": DAY1,
        "spread_points": 10,
        "open_positions_symbol": 0,
        "open_positions_total": 0,
        "equity": 10_000.0,
    }
    args.update(overrides)
    decision = risk.check_entry(**args)
    return decision.allowed, decision.reason


# -- stop distance and SL/TP ---------------------------------------------------------------


def test_stop_distance_is_atr_times_multiplier(tmp_path: Path) -> None:
    risk = manager(tmp_path, stop_atr_mult=1.5, min_stop_points=50)
    # 0.00100 * 1.5 = 0.00150 = 150 points (not 151 from float noise)
    assert risk.stop_distance(0.00100, EURUSD) == pytest.approx(0.0015, abs=1e-15)


def test_stop_distance_is_rounded_up_to_whole_points(tmp_path: Path) -> None:
    risk = manager(tmp_path, stop_atr_mult=1.5, min_stop_points=50)
    # 0.00100010 * 1.5 = 0.00150015 = 150.015 points -> 151 points
    assert risk.stop_distance(0.0010001, EURUSD) == pytest.approx(0.00151, abs=1e-15)


def test_stop_distance_never_below_min_stop_points_or_stops_level(tmp_path: Path) -> None:
    risk = manager(tmp_path, stop_atr_mult=1.5, min_stop_points=50)
    # 0.00010 * 1.5 = 15 points < 50 points minimum -> 0.00050
    assert risk.stop_distance(0.0001, EURUSD) == pytest.approx(0.0005, abs=1e-15)
    wide = SymbolSpec("EURUSD", 100_000.0, 0.00001, 5, 0.01, 0.01, 50.0, stops_level_points=80)
    # stops level 80 points beats both 15 and 50
    assert risk.stop_distance(0.0001, wide) == pytest.approx(0.0008, abs=1e-15)


def test_stop_distance_with_missing_atr_falls_back_to_the_floor(tmp_path: Path) -> None:
    risk = manager(tmp_path, min_stop_points=50)
    assert risk.stop_distance(float("nan"), EURUSD) == pytest.approx(0.0005, abs=1e-15)
    assert risk.stop_distance(-1.0, EURUSD) == pytest.approx(0.0005, abs=1e-15)


def test_sl_tp_for_a_buy_and_a_sell(tmp_path: Path) -> None:
    risk = manager(tmp_path, take_profit_r=1.5)
    # buy at 1.10010, stop 0.00150: SL 1.09860, TP 1.10010 + 1.5 * 0.00150 = 1.10235
    assert risk.sl_tp(Side.BUY, 1.10010, 0.0015, EURUSD) == (1.09860, 1.10235)
    # sell at 1.10000: SL 1.10150, TP 1.10000 - 0.00225 = 1.09775
    assert risk.sl_tp(Side.SELL, 1.10000, 0.0015, EURUSD) == (1.10150, 1.09775)


def test_sl_is_rounded_away_from_an_off_grid_entry(tmp_path: Path) -> None:
    risk = manager(tmp_path, take_profit_r=1.5)
    # buy at 1.100105: raw SL 1.098605 -> floored to 1.09860 (a further stop, never closer)
    sl, _ = risk.sl_tp(Side.BUY, 1.100105, 0.0015, EURUSD)
    assert sl == 1.09860
    # sell at 1.100105: raw SL 1.101605 -> ceiled to 1.10161
    sl, _ = risk.sl_tp(Side.SELL, 1.100105, 0.0015, EURUSD)
    assert sl == 1.10161


# -- sizing ------------------------------------------------------------------------------


def test_size_risks_the_configured_percent_of_equity(tmp_path: Path) -> None:
    risk = manager(tmp_path, risk_per_trade_pct=0.5)
    # 10,000 * 0.5% = 50 USD; 0.0015 * 100,000 = 150 USD per lot -> 0.333 -> 0.33 lots
    decision = risk.size(10_000.0, EURUSD, 1.10010, 0.0015)
    assert decision.volume == 0.33
    assert decision.risk_amount == pytest.approx(49.50)  # 0.33 * 150
    assert decision.reason is None


def test_size_for_a_base_currency_account_divides_by_the_price(tmp_path: Path) -> None:
    risk = manager(tmp_path, risk_per_trade_pct=0.5)
    # 0.150 * 100,000 = 15,000 JPY per lot / 150.0 = 100 USD per lot; 50 USD -> 0.50 lots
    decision = risk.size(10_000.0, USDJPY, 150.0, 0.150)
    assert decision.volume == 0.5
    assert decision.risk_amount == pytest.approx(50.0)


def test_size_floors_to_the_step_without_float_drift(tmp_path: Path) -> None:
    risk = manager(tmp_path, risk_per_trade_pct=0.5)
    # 5,800 * 0.5% = 29 USD; 0.001 * 100,000 = 100 USD per lot -> exactly 0.29 lots.
    # Naively 0.29 / 0.01 = 28.999999999999996 would floor to 0.28.
    decision = risk.size(5_800.0, EURUSD, 1.1, 0.001)
    assert decision.volume == 0.29
    assert repr(decision.volume) == "0.29"


def test_size_is_clamped_to_volume_max(tmp_path: Path) -> None:
    risk = manager(tmp_path, risk_per_trade_pct=0.5)
    # 10,000,000 * 0.5% = 50,000 USD / 150 per lot = 333 lots > 50
    decision = risk.size(10_000_000.0, EURUSD, 1.1, 0.0015)
    assert decision.volume == 50.0
    assert decision.risk_amount == pytest.approx(7_500.0)  # 50 * 150
    assert decision.reason is not None and "volume_max" in decision.reason


def test_size_below_volume_min_refuses_the_trade(tmp_path: Path) -> None:
    risk = manager(tmp_path, risk_per_trade_pct=0.5)
    # 200 * 0.5% = 1 USD / 150 per lot = 0.0067 lots < 0.01; 0.01 lot would risk 1.50 USD
    decision = risk.size(200.0, EURUSD, 1.1, 0.0015)
    assert decision.volume == 0.0 and decision.risk_amount == 0.0
    assert decision.reason is not None
    assert "volume_min" in decision.reason and "1.50" in decision.reason


def test_size_refuses_without_equity_or_stop(tmp_path: Path) -> None:
    risk = manager(tmp_path)
    assert risk.size(0.0, EURUSD, 1.1, 0.0015).volume == 0.0
    assert risk.size(10_000.0, EURUSD, 1.1, 0.0).volume == 0.0


def test_size_refuses_a_symbol_it_cannot_convert(tmp_path: Path) -> None:
    risk = manager(tmp_path)
    eurgbp = SymbolSpec("EURGBP", 100_000.0, 0.00001, 5, 0.01, 0.01, 50.0, 0, "GBP", "EUR")
    decision = risk.size(10_000.0, eurgbp, 0.85, 0.0015)
    assert decision.volume == 0.0
    assert decision.reason is not None and "EURGBP" in decision.reason


# -- entry filters -----------------------------------------------------------------------


def test_entry_is_allowed_when_every_filter_passes(tmp_path: Path) -> None:
    assert check(manager(tmp_path)) == (True, None)


def test_kill_switch_file_blocks_entries_first(tmp_path: Path) -> None:
    risk = manager(tmp_path, session_start_hour_utc=10)
    kill = tmp_path / "KILL"
    kill.write_text("stop", encoding="utf-8")
    # also outside the session (09:00 < 10:00), but the kill switch is named first
    allowed, reason = check(risk)
    assert not allowed
    assert reason == f"kill switch file {kill} present"
    kill.unlink()
    assert check(risk, bar_time=DAY1.replace(hour=10))[0]


def test_daily_loss_limit_blocks_until_the_next_utc_day(tmp_path: Path) -> None:
    risk = manager(tmp_path, daily_loss_limit_pct=3.0)
    assert check(risk, equity=10_000.0) == (True, None)  # the day starts at 10,000
    assert risk.day_start_equity == 10_000.0
    # down 299 < 3% of 10,000 = 300
    assert check(risk, bar_time=DAY1 + timedelta(hours=1), equity=9_701.0)[0]
    # down 300 >= 300: blocked
    allowed, reason = check(risk, bar_time=DAY1 + timedelta(hours=2), equity=9_700.0)
    assert not allowed
    assert reason is not None and "300.00" in reason and "3%" in reason
    # a recovery the same day does not lift the block
    assert not check(risk, bar_time=DAY1 + timedelta(hours=3), equity=9_900.0)[0]
    # the next UTC day starts afresh from that day's first equity
    next_day = datetime(2024, 1, 3, 0, 0, tzinfo=UTC)
    assert check(risk, bar_time=next_day, equity=9_800.0) == (True, None)
    assert risk.day_start_equity == 9_800.0


def test_daily_loss_day_is_the_utc_day_of_the_bar(tmp_path: Path) -> None:
    from zoneinfo import ZoneInfo

    risk = manager(tmp_path, daily_loss_limit_pct=3.0)
    check(risk, equity=10_000.0)
    # 2024-01-03 01:00 in Athens (UTC+2) is still 2024-01-02 23:00 UTC: same day
    athens = datetime(2024, 1, 3, 1, 0, tzinfo=ZoneInfo("Europe/Athens"))
    assert not check(risk, bar_time=athens, equity=9_600.0)[0]


def test_session_hours_are_half_open_in_utc(tmp_path: Path) -> None:
    risk = manager(tmp_path, session_start_hour_utc=7, session_end_hour_utc=20)
    allowed, reason = check(risk, bar_time=DAY1.replace(hour=6, minute=59))
    assert not allowed and reason is not None and "session" in reason
    assert check(risk, bar_time=DAY1.replace(hour=7))[0]
    assert check(risk, bar_time=DAY1.replace(hour=19, minute=59))[0]
    assert not check(risk, bar_time=DAY1.replace(hour=20))[0]


def test_spread_above_the_maximum_blocks_entries(tmp_path: Path) -> None:
    risk = manager(tmp_path, max_spread_points=30)
    assert check(risk, spread_points=30)[0]
    allowed, reason = check(risk, spread_points=31)
    assert not allowed and reason is not None and "31" in reason and "30" in reason


def test_position_limits_per_symbol_and_in_total(tmp_path: Path) -> None:
    risk = manager(tmp_path, max_positions_per_symbol=1, max_positions_total=3)
    allowed, reason = check(risk, open_positions_symbol=1, open_positions_total=1)
    assert not allowed and reason is not None and "max_positions_per_symbol" in reason
    allowed, reason = check(risk, open_positions_symbol=0, open_positions_total=3)
    assert not allowed and reason is not None and "max_positions_total" in reason
    assert check(risk, open_positions_symbol=0, open_positions_total=2)[0]


# -- state -------------------------------------------------------------------------------


def test_state_restore_keeps_the_day_start_equity_across_a_restart(tmp_path: Path) -> None:
    before = manager(tmp_path, daily_loss_limit_pct=3.0)
    check(before, equity=10_000.0)
    state = json.loads(json.dumps(before.state()))  # as the journal stores it
    assert state["day"] == "2024-01-02" and state["day_start_equity"] == 10_000.0
    after = manager(tmp_path, daily_loss_limit_pct=3.0)
    after.restore(state)
    # without the state, 9,690 would become the day's start; with it, the loss is 310
    assert not check(after, bar_time=DAY1 + timedelta(hours=5), equity=9_690.0)[0]


def test_restored_block_holds_even_if_equity_recovered(tmp_path: Path) -> None:
    before = manager(tmp_path, daily_loss_limit_pct=3.0)
    check(before, equity=10_000.0)
    assert not check(before, equity=9_600.0)[0]
    after = manager(tmp_path, daily_loss_limit_pct=3.0)
    after.restore(before.state())
    assert not check(after, equity=9_990.0)[0]


def test_restore_of_an_empty_or_malformed_state_starts_fresh(tmp_path: Path) -> None:
    risk = manager(tmp_path)
    assert risk.state() == {}
    risk.restore({})
    risk.restore({"day": "not a date", "day_start_equity": 1.0})
    assert risk.day_start_equity is None
    assert check(risk, equity=5_000.0)[0]
    assert risk.day_start_equity == 5_000.0
