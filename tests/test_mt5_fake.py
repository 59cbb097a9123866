"""The fake MetaTrader5 module keeps the real package's contract (MT5_API.md)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.mt5_fixtures import _core, mt5


@pytest.fixture(autouse=True)
def fresh() -> None:
    _core.terminal.reset({})


def test_surface_has_the_real_names_and_values_only() -> None:
    assert mt5.__version__ == "5.0.6231"
    for missing in ("SYMBOL_FILLING_FOK", "SYMBOL_FILLING_IOC", "TRADE_RETCODE_HEDGE_PROHIBITED"):
        assert not hasattr(mt5, missing)
    assert (mt5.TIMEFRAME_H1, mt5.TIMEFRAME_D1, mt5.TIMEFRAME_W1, mt5.TIMEFRAME_MN1) == (
        16385,
        16408,
        32769,
        49153,
    )
    assert (mt5.ORDER_FILLING_FOK, mt5.ORDER_FILLING_IOC, mt5.ORDER_FILLING_RETURN) == (0, 1, 2)
    assert (mt5.TRADE_ACTION_DEAL, mt5.TRADE_ACTION_SLTP, mt5.TRADE_ACTION_CLOSE_BY) == (1, 6, 10)
    assert mt5.RES_E_INTERNAL_FAIL_CONNECT == -10004
    assert callable(mt5.Buy) and callable(mt5.Sell) and callable(mt5.Close)
    functions = [n for n in _core.__all__ if n[0].islower()]
    assert len(functions) == 32


def test_calls_before_initialize_fail_with_no_ipc_connection() -> None:
    assert mt5.account_info() is None
    assert mt5.last_error() == (-10004, "No IPC connection")
    assert mt5.initialize() is True
    assert mt5.last_error() == (1, "Success")


def test_none_means_error_and_empty_means_no_match() -> None:
    mt5.initialize()
    assert mt5.positions_get(symbol="NOPE") == ()
    assert mt5.last_error() == (1, "Success")
    assert mt5.positions_get("EURUSD") is None
    assert mt5.last_error() == (-2, "Unnamed arguments not allowed")
    assert mt5.symbol_info("NOPE") is None
    assert mt5.last_error() == (-4, "Terminal: Not found")
    assert mt5.copy_rates_from_pos("NOPE", mt5.TIMEFRAME_M1, 0, 5) is None
    assert mt5.last_error() == (-1, "Terminal: Call failed")
    assert mt5.initialize(login="5550123") is False
    assert mt5.last_error() == (-2, 'Invalid "login" argument')


def test_records_have_the_real_fields_in_order() -> None:
    mt5.initialize()
    mt5.symbol_select("EURUSD", True)
    tick = mt5.symbol_info_tick("EURUSD")
    assert list(tick._asdict()) == [
        "time",
        "bid",
        "ask",
        "last",
        "volume",
        "time_msc",
        "flags",
        "volume_real",
    ]
    assert tick[1] == tick.bid
    assert len(mt5.symbol_info("EURUSD")) == 96
    assert len(mt5.account_info()) == 28
    assert len(mt5.terminal_info()) == 22
    assert not hasattr(tick, "_replace")


def test_rates_have_the_exact_dtype_oldest_first_and_a_maxbars_cap() -> None:
    _core.terminal.reset({"maxbars": 1000})
    mt5.initialize()
    mt5.symbol_select("EURUSD", True)
    rates = mt5.copy_rates_from_pos("EURUSD", mt5.TIMEFRAME_M5, 0, 10)
    assert rates.dtype == np.dtype(
        [
            ("time", "<i8"),
            ("open", "<f8"),
            ("high", "<f8"),
            ("low", "<f8"),
            ("close", "<f8"),
            ("tick_volume", "<u8"),
            ("spread", "<i4"),
            ("real_volume", "<u8"),
        ]
    )
    assert len(rates) == 10 and (np.diff(rates["time"]) == 300).all()
    assert mt5.copy_rates_from_pos("EURUSD", mt5.TIMEFRAME_M1, 0, 1001) is None
    assert mt5.last_error() == (-2, "Terminal: Invalid params")
    assert mt5.copy_rates_from_pos("EURUSD", 32768, 0, 10) is None


def test_order_send_validates_fields_and_comment_length() -> None:
    mt5.initialize()
    base = {"action": mt5.TRADE_ACTION_DEAL, "symbol": "EURUSD", "volume": 0.1, "type": 0}
    assert mt5.order_send({**base, "sl": None}) is None
    assert mt5.last_error() == (-2, 'Invalid "sl" argument')
    assert mt5.order_send({**base, "comment": "x" * 40}) is None
    assert mt5.last_error() == (-2, 'Invalid "comment" argument')


def test_hedging_netting_and_sl_tp_hits_keep_the_account_coherent() -> None:
    _core.terminal.reset({"account": {"margin_mode": "netting"}})
    mt5.initialize()
    mt5.symbol_select("EURUSD", True)
    first = mt5.Buy("EURUSD", 0.2)
    second = mt5.Sell("EURUSD", 0.5)  # netting: closes 0.2 and reverses to 0.3 short
    assert first.retcode == second.retcode == 10009
    (pos,) = mt5.positions_get()
    assert pos.type == mt5.POSITION_TYPE_SELL and pos.volume == pytest.approx(0.3)
    assert pos.ticket == first.order
    entries = [d.entry for d in mt5.history_deals_get(position=first.order)]
    assert entries == [mt5.DEAL_ENTRY_IN, mt5.DEAL_ENTRY_INOUT]
    _core.terminal.reset({})
    mt5.initialize()
    mt5.symbol_select("EURUSD", True)
    tick = mt5.symbol_info_tick("EURUSD")
    res = mt5.order_send(
        {
            "action": 1,
            "symbol": "EURUSD",
            "volume": 1.0,
            "type": 0,
            "price": tick.ask,
            "sl": round(tick.bid - 0.0005, 5),
            "tp": round(tick.bid + 0.0005, 5),
            "magic": 9,
        }
    )
    balance = mt5.account_info().balance
    _core.terminal.advance(6 * 3600)
    assert mt5.positions_get() == ()
    out = [d for d in mt5.history_deals_get(ticket=res.order)]
    assert len(out) == 1  # history ticket= filters on the deal's order
    close = next(d for d in mt5.history_deals_get(position=res.order) if d.entry == 1)
    assert close.reason in (mt5.DEAL_REASON_SL, mt5.DEAL_REASON_TP)
    assert mt5.account_info().balance == pytest.approx(balance + close.profit)
