"""Paper broker: fills, costs, P&L, margin, SL/TP inside bars, restore (hand-computed)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from config.settings import SymbolSettings
from execution import retcodes
from execution.broker import (
    BarDrivenBroker,
    CloseReason,
    OrderRequest,
    OrderResult,
    Position,
    Side,
    SymbolSpec,
)
from execution.errors import OperationalError
from execution.paper import PaperBroker, specs_from_settings
from market_data.bars import Bar

T0 = datetime(2024, 1, 2, 9, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)

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


def make_broker(
    *,
    balance: float = 10_000.0,
    leverage: int = 100,
    slippage_points: int = 0,
    commission_per_lot: float = 0.0,
    specs: dict[str, SymbolSpec] | None = None,
) -> PaperBroker:
    return PaperBroker(
        specs or {"EURUSD": EURUSD, "USDJPY": USDJPY},
        account_currency="USD",
        initial_balance=balance,
        leverage=leverage,
        slippage_points=slippage_points,
        commission_per_lot=commission_per_lot,
        timeframe_s=60,
        default_spread_points={"EURUSD": 10, "USDJPY": 10},
    )


def bar(
    close: float,
    *,
    minute: int = 0,
    open_: float | None = None,
    high: float | None = None,
    low: float | None = None,
    spread: int = 10,
    symbol: str = "EURUSD",
) -> Bar:
    o = close if open_ is None else open_
    return Bar(
        symbol=symbol,
        time=T0 + minute * MINUTE,
        open=o,
        high=max(o, close) if high is None else high,
        low=min(o, close) if low is None else low,
        close=close,
        spread=spread,
    )


def feed(broker: PaperBroker, *bars: Bar) -> None:
    async def go() -> None:
        for b in bars:
            await broker.on_bar(b)

    asyncio.run(go())


def order(
    broker: PaperBroker,
    side: Side,
    volume: float,
    *,
    sl: float | None = None,
    tp: float | None = None,
    symbol: str = "EURUSD",
    coid: str = "c1",
) -> OrderResult:
    return asyncio.run(broker.market_order(OrderRequest(coid, symbol, side, volume, sl, tp)))


def positions(broker: PaperBroker, symbol: str | None = None) -> list[Position]:
    return asyncio.run(broker.positions(symbol))


def test_paper_broker_satisfies_the_bar_driven_protocol() -> None:
    broker = make_broker()
    assert isinstance(broker, BarDrivenBroker)
    assert broker.name == "paper"
    asyncio.run(broker.connect())
    assert broker.connected
    asyncio.run(broker.close())
    assert not broker.connected


def test_specs_from_settings_copies_the_contract_tables() -> None:
    specs = specs_from_settings(
        {"XAUUSD": SymbolSettings(contract_size=100.0, point=0.01, digits=2, base_currency="XAU")}
    )
    spec = specs["XAUUSD"]
    assert spec.symbol == "XAUUSD" and spec.contract_size == 100.0 and spec.digits == 2
    assert spec.point == 0.01 and spec.base_currency == "XAU" and spec.profit_currency == "USD"


def test_buy_fills_at_ask_plus_slippage_and_sell_at_bid_minus_slippage() -> None:
    broker = make_broker(slippage_points=2)
    feed(broker, bar(1.10000, spread=10))
    buy = order(broker, Side.BUY, 0.1)
    sell = order(broker, Side.SELL, 0.1, coid="c2")
    # ask = 1.10000 + 10 * 0.00001 = 1.10010; buy = ask + 2 points = 1.10012
    assert buy.retcode == retcodes.DONE and buy.ok
    assert buy.price == pytest.approx(1.10012, abs=1e-12)
    # sell = bid - 2 points = 1.09998
    assert sell.price == pytest.approx(1.09998, abs=1e-12)
    # the fill happens at the close of the decided bar: 09:00 + 60 s
    assert buy.time == T0 + MINUTE and sell.time == T0 + MINUTE
    assert buy.volume == 0.1


def test_bar_without_spread_uses_the_symbol_default_spread() -> None:
    broker = make_broker()
    feed(broker, bar(1.10000, spread=0))
    # default 10 points: ask = 1.10010
    assert order(broker, Side.BUY, 0.1).price == pytest.approx(1.10010, abs=1e-12)


def test_position_ids_and_deal_ids_increase_monotonically() -> None:
    broker = make_broker()
    feed(broker, bar(1.10000))
    first = order(broker, Side.BUY, 0.1)
    second = order(broker, Side.BUY, 0.1, coid="c2")
    assert first.position_id is not None and second.position_id is not None
    assert first.deal_id is not None and second.deal_id is not None
    assert second.position_id > first.position_id
    assert second.deal_id > first.deal_id
    assert [p.client_order_id for p in positions(broker)] == ["c1", "c2"]


def test_commission_is_charged_on_open_and_on_close() -> None:
    broker = make_broker(commission_per_lot=3.5)
    feed(broker, bar(1.10000))
    opened = order(broker, Side.BUY, 0.1)
    # 3.5 per lot * 0.1 lot = 0.35 charged at once
    assert opened.commission == pytest.approx(-0.35)
    assert asyncio.run(broker.account()).balance == pytest.approx(9_999.65)
    (pos,) = positions(broker)
    assert pos.commission == pytest.approx(-0.35)
    closed = asyncio.run(broker.close_position(pos, "x1"))
    # closes at bid 1.10000 against the open at ask 1.10010:
    # -0.00010 * 100,000 * 0.1 = -1.00 gross, -0.35 commission
    assert closed.commission == pytest.approx(-0.35)
    assert closed.profit == pytest.approx(-1.00)
    assert asyncio.run(broker.account()).balance == pytest.approx(10_000 - 0.35 - 0.35 - 1.00)


def test_eurusd_profit_is_in_usd_as_is() -> None:
    broker = make_broker()
    feed(broker, bar(1.10000))
    order(broker, Side.BUY, 1.0)  # ask 1.10010
    feed(broker, bar(1.10210, minute=1))
    (pos,) = positions(broker)
    result = asyncio.run(broker.close_position(pos, "x1"))
    # (1.10210 - 1.10010) * 100,000 * 1 lot = 200.00 USD
    assert result.retcode == retcodes.DONE
    assert result.price == pytest.approx(1.10210, abs=1e-12)
    assert result.profit == pytest.approx(200.00)
    assert result.time == T0 + 2 * MINUTE
    assert asyncio.run(broker.account()).balance == pytest.approx(10_200.00)
    assert positions(broker) == []


def test_sell_profit_uses_the_ask_on_close() -> None:
    broker = make_broker()
    feed(broker, bar(1.10000))
    order(broker, Side.SELL, 1.0)  # bid 1.10000
    feed(broker, bar(1.09800, minute=1, spread=20))
    (pos,) = positions(broker)
    result = asyncio.run(broker.close_position(pos, "x1"))
    # closes at ask 1.09800 + 20 points = 1.09820: (1.10000 - 1.09820) * 100,000 = 180.00
    assert result.price == pytest.approx(1.09820, abs=1e-12)
    assert result.profit == pytest.approx(180.00)


def test_usdjpy_profit_is_converted_by_the_close_price() -> None:
    broker = make_broker()
    feed(broker, bar(150.000, symbol="USDJPY"))
    opened = order(broker, Side.BUY, 1.0, symbol="USDJPY")
    # ask = 150.000 + 10 * 0.001 = 150.010
    assert opened.price == pytest.approx(150.010, abs=1e-9)
    feed(broker, bar(150.310, minute=1, symbol="USDJPY"))
    (pos,) = positions(broker)
    result = asyncio.run(broker.close_position(pos, "x1"))
    # (150.310 - 150.010) * 100,000 = 30,000 JPY; / 150.310 = 199.5875... -> 199.59 USD
    assert result.profit == pytest.approx(199.59)
    assert asyncio.run(broker.account()).balance == pytest.approx(10_199.59)


def test_margin_for_eurusd_uses_the_price_and_for_usdjpy_the_notional() -> None:
    broker = make_broker(balance=100_000.0)
    feed(broker, bar(1.10000), bar(150.000, symbol="USDJPY"))
    order(broker, Side.BUY, 1.0)
    # EURUSD: 1 lot * 100,000 * 1.10010 / 100 = 1,100.10 USD
    assert asyncio.run(broker.account()).margin == pytest.approx(1_100.10)
    order(broker, Side.BUY, 1.0, symbol="USDJPY", coid="c2")
    # USDJPY (base USD = account): 1 lot * 100,000 / 100 = 1,000.00 USD, total 2,100.10
    assert asyncio.run(broker.account()).margin == pytest.approx(2_100.10)


def test_order_needing_more_than_free_margin_is_refused_with_no_money() -> None:
    broker = make_broker(balance=1_000.0)
    feed(broker, bar(1.10000))
    # 1 lot needs 1,100.10 > 1,000 free
    refused = order(broker, Side.BUY, 1.0)
    assert refused.retcode == retcodes.NO_MONEY and not refused.ok
    assert positions(broker) == []
    # 0.5 lot needs 550.05 <= 1,000
    assert order(broker, Side.BUY, 0.5).retcode == retcodes.DONE
    # a second 0.5 lot: free = 1,000 - 5.00 floating (spread) - 550.05 = 444.95 < 550.05
    assert order(broker, Side.BUY, 0.5, coid="c2").retcode == retcodes.NO_MONEY


@pytest.mark.parametrize("volume", [0.0, 0.005, 0.015, 50.01, -1.0, float("nan")])
def test_volume_outside_limits_or_off_step_is_invalid_volume(volume: float) -> None:
    broker = make_broker(balance=10_000_000.0)
    feed(broker, bar(1.10000))
    assert order(broker, Side.BUY, volume).retcode == retcodes.INVALID_VOLUME


def test_volume_on_the_step_is_accepted_without_float_drift() -> None:
    broker = make_broker()
    feed(broker, bar(1.10000))
    result = order(broker, Side.BUY, 0.07)
    assert result.retcode == retcodes.DONE
    assert result.volume == 0.07
    assert positions(broker)[0].volume == 0.07


def test_order_before_any_price_is_refused_market_closed() -> None:
    broker = make_broker()
    assert order(broker, Side.BUY, 0.1).retcode == retcodes.MARKET_CLOSED


def test_order_for_an_unconfigured_symbol_is_refused_invalid() -> None:
    broker = make_broker()
    feed(broker, bar(1.10000))
    result = order(broker, Side.BUY, 0.1, symbol="GBPUSD")
    assert result.retcode == retcodes.INVALID
    assert "GBPUSD" in result.comment


@pytest.mark.parametrize(
    ("side", "sl", "tp"),
    [
        (Side.BUY, 1.10020, None),  # buy fill 1.10010: SL above the price
        (Side.BUY, None, 1.10000),  # TP below the price
        (Side.SELL, 1.09990, None),  # sell fill 1.10000: SL below the price
        (Side.SELL, None, 1.10010),  # TP above the price
        (Side.BUY, 1.10010, None),  # SL at the price itself
    ],
)
def test_stops_on_the_wrong_side_are_invalid_stops(
    side: Side, sl: float | None, tp: float | None
) -> None:
    broker = make_broker()
    feed(broker, bar(1.10000))
    result = order(broker, side, 0.1, sl=sl, tp=tp)
    assert result.retcode == retcodes.INVALID_STOPS
    assert positions(broker) == []


def test_stops_closer_than_the_stops_level_are_invalid_stops() -> None:
    spec = SymbolSpec(
        symbol="EURUSD",
        contract_size=100_000.0,
        point=0.00001,
        digits=5,
        volume_min=0.01,
        volume_step=0.01,
        volume_max=50.0,
        stops_level_points=20,
    )
    broker = make_broker(specs={"EURUSD": spec})
    feed(broker, bar(1.10000))
    # buy fills at 1.10010; SL 1.10000 is 10 points away < 20
    assert order(broker, Side.BUY, 0.1, sl=1.10000).retcode == retcodes.INVALID_STOPS
    # TP 1.10025 is 15 points away < 20
    assert order(broker, Side.BUY, 0.1, tp=1.10025).retcode == retcodes.INVALID_STOPS
    # exactly 20 points on both sides is allowed
    ok = order(broker, Side.BUY, 0.1, sl=1.09990, tp=1.10030)
    assert ok.retcode == retcodes.DONE
    (pos,) = positions(broker)
    assert pos.sl == 1.09990 and pos.tp == 1.10030


def _long_with_stops(broker: PaperBroker) -> Position:
    feed(broker, bar(1.10000))
    # buy 1 lot at ask 1.10010, SL 110 points below, TP 190 points above
    assert order(broker, Side.BUY, 1.0, sl=1.09900, tp=1.10200).ok
    (pos,) = positions(broker)
    return pos


def test_buy_stop_loss_hit_inside_a_bar_closes_at_the_stop() -> None:
    broker = make_broker()
    pos = _long_with_stops(broker)
    feed(broker, bar(1.09950, minute=1, open_=1.10000, high=1.10050, low=1.09890))
    (deal,) = asyncio.run(broker.drain_closed_deals())
    # (1.09900 - 1.10010) * 100,000 = -110.00
    assert deal.reason is CloseReason.SL and deal.position_id == pos.position_id
    assert deal.price == pytest.approx(1.09900, abs=1e-12)
    assert deal.profit == pytest.approx(-110.00)
    assert deal.time == T0 + MINUTE  # the bar's open time: the moment inside it is unknown
    assert deal.client_order_id == pos.client_order_id
    assert positions(broker) == []
    assert asyncio.run(broker.account()).balance == pytest.approx(9_890.00)
    assert asyncio.run(broker.drain_closed_deals()) == []


def test_buy_take_profit_hit_inside_a_bar_closes_at_the_target() -> None:
    broker = make_broker()
    _long_with_stops(broker)
    feed(broker, bar(1.10150, minute=1, open_=1.10100, high=1.10250, low=1.10050))
    (deal,) = asyncio.run(broker.drain_closed_deals())
    # (1.10200 - 1.10010) * 100,000 = 190.00
    assert deal.reason is CloseReason.TP
    assert deal.price == pytest.approx(1.10200, abs=1e-12)
    assert deal.profit == pytest.approx(190.00)


def test_stop_and_target_in_one_bar_assumes_stop_first() -> None:
    broker = make_broker()
    _long_with_stops(broker)
    feed(broker, bar(1.10100, minute=1, open_=1.10000, high=1.10250, low=1.09850))
    (deal,) = asyncio.run(broker.drain_closed_deals())
    assert deal.reason is CloseReason.SL
    assert deal.price == pytest.approx(1.09900, abs=1e-12)


def test_gap_through_the_stop_fills_at_the_open_not_the_stop() -> None:
    broker = make_broker()
    _long_with_stops(broker)
    feed(broker, bar(1.09850, minute=1, open_=1.09800, high=1.09880, low=1.09750))
    (deal,) = asyncio.run(broker.drain_closed_deals())
    # (1.09800 - 1.10010) * 100,000 = -210.00 (worse than the stop's -110)
    assert deal.reason is CloseReason.SL
    assert deal.price == pytest.approx(1.09800, abs=1e-12)
    assert deal.profit == pytest.approx(-210.00)
    assert deal.time == T0 + MINUTE


def test_gap_through_the_target_fills_at_the_better_open() -> None:
    broker = make_broker()
    _long_with_stops(broker)
    # opens beyond the TP, then falls through the SL: the open came first, so TP
    feed(broker, bar(1.09850, minute=1, open_=1.10300, high=1.10320, low=1.09850))
    (deal,) = asyncio.run(broker.drain_closed_deals())
    # (1.10300 - 1.10010) * 100,000 = 290.00
    assert deal.reason is CloseReason.TP
    assert deal.profit == pytest.approx(290.00)


def test_stop_fill_is_worsened_by_slippage() -> None:
    broker = make_broker(slippage_points=3)
    feed(broker, bar(1.10000))
    # buy at ask 1.10010 + 3 points = 1.10013
    assert order(broker, Side.BUY, 1.0, sl=1.09900, tp=1.10200).ok
    feed(broker, bar(1.09950, minute=1, open_=1.10000, low=1.09890, high=1.10000))
    (deal,) = asyncio.run(broker.drain_closed_deals())
    # SL 1.09900 - 3 points = 1.09897; (1.09897 - 1.10013) * 100,000 = -116.00
    assert deal.price == pytest.approx(1.09897, abs=1e-12)
    assert deal.profit == pytest.approx(-116.00)


def test_sell_stop_loss_is_hit_by_the_ask_not_the_bid() -> None:
    broker = make_broker()
    feed(broker, bar(1.10000))
    # sell 1 lot at bid 1.10000; SL 1.10100, TP 1.09800
    assert order(broker, Side.SELL, 1.0, sl=1.10100, tp=1.09800).ok
    # bid high 1.10092 < SL, but ask high = 1.10092 + 10 points = 1.10102 >= 1.10100
    feed(broker, bar(1.10050, minute=1, open_=1.10000, high=1.10092, low=1.09990))
    (deal,) = asyncio.run(broker.drain_closed_deals())
    # (1.10000 - 1.10100) * 100,000 = -100.00
    assert deal.reason is CloseReason.SL and deal.side is Side.SELL
    assert deal.price == pytest.approx(1.10100, abs=1e-12)
    assert deal.profit == pytest.approx(-100.00)


def test_sell_take_profit_needs_the_ask_to_reach_the_target() -> None:
    broker = make_broker()
    feed(broker, bar(1.10000))
    assert order(broker, Side.SELL, 1.0, sl=1.10100, tp=1.09800).ok
    # bid low 1.09795 is below the TP, but ask low = 1.09805 is not
    feed(broker, bar(1.09900, minute=1, open_=1.10000, high=1.10000, low=1.09795))
    assert asyncio.run(broker.drain_closed_deals()) == []
    # bid low 1.09790 -> ask low 1.09800 touches the TP
    feed(broker, bar(1.09900, minute=2, open_=1.09900, high=1.09950, low=1.09790))
    (deal,) = asyncio.run(broker.drain_closed_deals())
    # (1.10000 - 1.09800) * 100,000 = 200.00
    assert deal.reason is CloseReason.TP
    assert deal.profit == pytest.approx(200.00)


def test_sell_gap_through_the_stop_fills_at_the_opening_ask() -> None:
    broker = make_broker()
    feed(broker, bar(1.10000))
    assert order(broker, Side.SELL, 1.0, sl=1.10100).ok
    # opens at bid 1.10150: ask 1.10160 is beyond the SL
    feed(broker, bar(1.10150, minute=1, open_=1.10150, high=1.10200, low=1.10100))
    (deal,) = asyncio.run(broker.drain_closed_deals())
    # (1.10000 - 1.10160) * 100,000 = -160.00
    assert deal.price == pytest.approx(1.10160, abs=1e-12)
    assert deal.profit == pytest.approx(-160.00)


def test_equity_and_free_margin_include_the_floating_position() -> None:
    broker = make_broker(commission_per_lot=3.5)
    feed(broker, bar(1.10000))
    order(broker, Side.BUY, 1.0)  # ask 1.10010, commission -3.50
    feed(broker, bar(1.10110, minute=1))
    account = asyncio.run(broker.account())
    # floating (1.10110 - 1.10010) * 100,000 = +100.00
    assert account.balance == pytest.approx(9_996.50)
    assert account.equity == pytest.approx(10_096.50)
    assert account.margin == pytest.approx(1_100.10)
    assert account.free_margin == pytest.approx(10_096.50 - 1_100.10)
    assert account.leverage == 100 and account.currency == "USD"
    (pos,) = positions(broker)
    assert pos.profit == pytest.approx(100.00)


def test_close_by_client_goes_to_history_but_not_to_drained_deals() -> None:
    broker = make_broker()
    feed(broker, bar(1.10000))
    order(broker, Side.BUY, 0.1)
    (pos,) = positions(broker)
    result = asyncio.run(broker.close_position(pos, "x1"))
    assert result.ok and result.request.side is Side.SELL
    assert result.request.position_id == pos.position_id
    assert asyncio.run(broker.drain_closed_deals()) == []
    deals = asyncio.run(broker.history_deals(T0, T0 + 2 * MINUTE))
    assert [(d.reason, d.client_order_id) for d in deals] == [(CloseReason.CLIENT, "x1")]
    # the window is half-open: a deal at T0 + 1 min is outside [T0, T0 + 1 min)
    assert asyncio.run(broker.history_deals(T0, T0 + MINUTE)) == []


def test_closing_an_unknown_position_is_position_closed() -> None:
    broker = make_broker()
    feed(broker, bar(1.10000))
    order(broker, Side.BUY, 0.1)
    (pos,) = positions(broker)
    assert asyncio.run(broker.close_position(pos, "x1")).ok
    again = asyncio.run(broker.close_position(pos, "x2"))
    assert again.retcode == retcodes.POSITION_CLOSED


def test_partial_close_keeps_the_rest_with_proportional_commission_and_margin() -> None:
    broker = make_broker(commission_per_lot=3.5)
    feed(broker, bar(1.10000))
    order(broker, Side.BUY, 1.0)  # ask 1.10010, commission -3.50
    feed(broker, bar(1.10110, minute=1))
    (pos,) = positions(broker)
    result = asyncio.run(broker.close_position(pos, "x1", volume=0.4))
    # 0.4 lot: (1.10110 - 1.10010) * 100,000 * 0.4 = 40.00; commission -1.40
    assert result.volume == pytest.approx(0.4)
    assert result.profit == pytest.approx(40.00)
    assert result.commission == pytest.approx(-1.40)
    (rest,) = positions(broker)
    assert rest.position_id == pos.position_id
    assert rest.volume == 0.6
    assert rest.commission == pytest.approx(-2.10)  # -3.50 * 0.6
    account = asyncio.run(broker.account())
    assert account.margin == pytest.approx(660.06)  # 0.6 * 100,000 * 1.10010 / 100
    assert account.balance == pytest.approx(10_000 - 3.50 + 40.00 - 1.40)


def test_partial_close_larger_than_the_position_is_refused() -> None:
    broker = make_broker()
    feed(broker, bar(1.10000))
    order(broker, Side.BUY, 0.1)
    (pos,) = positions(broker)
    result = asyncio.run(broker.close_position(pos, "x1", volume=0.2))
    assert result.retcode == retcodes.INVALID_CLOSE_VOLUME


def test_market_order_with_a_position_id_closes_that_position() -> None:
    broker = make_broker()
    feed(broker, bar(1.10000))
    order(broker, Side.BUY, 0.1)
    (pos,) = positions(broker)
    req = OrderRequest("x1", "EURUSD", Side.SELL, 0.1, position_id=pos.position_id)
    assert asyncio.run(broker.market_order(req)).ok
    assert positions(broker) == []


def test_modify_position_validates_against_the_current_price() -> None:
    broker = make_broker()
    feed(broker, bar(1.10000))
    order(broker, Side.BUY, 0.1)
    (pos,) = positions(broker)
    # a long is checked against the bid 1.10000: SL above it is refused
    bad = asyncio.run(broker.modify_position(pos, 1.10005, None))
    assert bad.retcode == retcodes.INVALID_STOPS
    good = asyncio.run(broker.modify_position(pos, 1.09900, 1.10300))
    assert good.retcode == retcodes.DONE
    (moved,) = positions(broker)
    assert moved.sl == 1.09900 and moved.tp == 1.10300
    assert asyncio.run(broker.close_position(moved, "x1")).ok
    gone = asyncio.run(broker.modify_position(moved, 1.09900, None))
    assert gone.retcode == retcodes.POSITION_CLOSED


def test_unknown_symbol_spec_raises_operational_error_naming_it() -> None:
    broker = make_broker()
    with pytest.raises(OperationalError, match="GBPUSD"):
        asyncio.run(broker.symbol_spec("GBPUSD"))
    assert asyncio.run(broker.symbol_spec("EURUSD")) == EURUSD


def test_symbol_not_convertible_to_the_account_currency_is_refused_at_start() -> None:
    eurgbp = SymbolSpec("EURGBP", 100_000.0, 0.00001, 5, 0.01, 0.01, 50.0, 0, "GBP", "EUR")
    with pytest.raises(ValueError, match="EURGBP"):
        make_broker(specs={"EURGBP": eurgbp})


def test_restore_then_new_ids_do_not_repeat() -> None:
    broker = make_broker()
    restored = Position(
        position_id=41,
        symbol="EURUSD",
        side=Side.BUY,
        volume=0.5,
        open_price=1.10010,
        open_time=T0 - MINUTE,
        sl=1.09900,
        tp=None,
        client_order_id="old",
        commission=-1.75,
    )
    # the journal says the next id is 5, but position 41 is open: ids continue at 42
    broker.restore(9_000.0, [restored], next_position_id=5, next_deal_id=5)
    account = asyncio.run(broker.account())
    assert account.balance == pytest.approx(9_000.0)
    assert account.margin == pytest.approx(550.05)  # 0.5 * 100,000 * 1.10010 / 100
    feed(broker, bar(1.10000))
    new = order(broker, Side.BUY, 0.1)
    assert new.position_id == 42
    assert new.deal_id is not None and new.deal_id >= 5
    ids = [p.position_id for p in positions(broker)]
    assert ids == [41, 42]


def test_restore_never_moves_the_counters_backwards() -> None:
    broker = make_broker()
    feed(broker, bar(1.10000))
    first = order(broker, Side.BUY, 0.1)
    second = order(broker, Side.BUY, 0.1, coid="c2")
    assert first.position_id == 1 and second.position_id == 2
    broker.restore(10_000.0, [], next_position_id=1, next_deal_id=1)
    assert order(broker, Side.BUY, 0.1, coid="c3").position_id == 3


def test_restored_position_is_stopped_out_by_a_later_bar() -> None:
    broker = make_broker()
    restored = Position(41, "EURUSD", Side.BUY, 1.0, 1.10010, T0, 1.09900, None, "old")
    broker.restore(10_000.0, [restored], next_position_id=42, next_deal_id=42)
    feed(broker, bar(1.09950, minute=1, open_=1.10000, high=1.10000, low=1.09890))
    (deal,) = asyncio.run(broker.drain_closed_deals())
    assert deal.position_id == 41 and deal.reason is CloseReason.SL
    assert deal.deal_id == 42


def test_position_is_not_checked_against_the_bar_it_was_decided_on() -> None:
    broker = make_broker()
    feed(broker, bar(1.10000, low=1.09000))
    assert order(broker, Side.BUY, 1.0, sl=1.09900).ok
    # the same bar again (before the fill time) must not stop it out
    feed(broker, bar(1.10000, low=1.09000))
    assert asyncio.run(broker.drain_closed_deals()) == []
    assert len(positions(broker)) == 1


def test_last_bar_is_the_latest_bar_of_the_symbol() -> None:
    broker = make_broker()
    assert broker.last_bar("EURUSD") is None
    second = bar(1.10100, minute=1)
    feed(broker, bar(1.10000), second)
    assert broker.last_bar("EURUSD") == second
