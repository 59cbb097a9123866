"""The MT5 adapter when things go wrong mid-run: sends cut by reconnects, stale or
wrong clocks, halts, an offline terminal, a dead bridge, hung calls, DST, netting."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from execution import retcodes as rc
from execution.broker import OrderRequest, Side
from execution.mt5_client import (
    MT5Broker,
    ReconcileReport,
    reconcile_with_journal,
    round_price,
    same_client_id,
    server_epoch_to_utc,
    server_epochs_to_utc_ns,
)
from market_data.mt5_feed import LiveFeed, fetch_history
from tests.mt5_fixtures import Events, Wrapped, _core, make_broker, mt5
from utils.clock import FakeClock
from utils.trade_journal import Journal, TradeClose, TradeOpen

START = datetime(2024, 3, 4, 10, 0, tzinfo=UTC)


def sends() -> int:
    return len(_core.terminal.sent_requests)


def in_deals() -> list[dict[str, Any]]:
    return [d for d in _core.terminal.deals if d["entry"] == 0]


def buy(coid: str, volume: float = 0.1, **kw: Any) -> OrderRequest:
    return OrderRequest(coid, "EURUSD", Side.BUY, volume, **kw)


def step(clock: FakeClock, seconds: float = 60) -> None:
    """The market and our clock move on together."""
    _core.terminal.advance(seconds)
    clock.advance(seconds)


def shifted_ticks(shift: dict[str, int]) -> Callable[[str], Any]:
    """symbol_info_tick with its time moved by shift["s"] seconds (a stale or odd tick)."""

    def tick(symbol: str) -> Any:
        t = mt5.symbol_info_tick(symbol)
        if t is None:
            return None
        s = shift["s"]
        return type(t)(t.time + s, t.bid, t.ask, t.last, t.volume, t.time_msc + s * 1000, *t[6:])

    return tick


# -- a reconnect in the middle of a send -----------------------------------------------


def test_a_reconnect_during_a_send_leaves_its_order_to_that_send(tmp_path: Path) -> None:
    """Reconciliation neither adopts the entry being looked up nor closes the position
    being closed: the sends journal them, with their own model set and reason."""

    async def go() -> None:
        clock = FakeClock(START)
        broker = make_broker(clock)
        journal = Journal(tmp_path / "j.sqlite3", clock=clock)
        journal.open()
        reports: list[ReconcileReport] = []

        async def reconcile() -> None:
            reports.append(await reconcile_with_journal(broker, journal))

        broker.on_connected = reconcile
        await broker.connect()
        _core.terminal.faults.update(lost_results=1, disconnect_after=1)
        opened = await broker.market_order(buy("E" * 16))
        assert opened.ok and broker.reconnects >= 1
        assert all(r.adopted == [] for r in reports)
        assert any(r.in_flight == ["E" * 16] for r in reports)
        await journal.open_trade(
            TradeOpen(
                client_order_id="E" * 16,
                symbol="EURUSD",
                side="buy",
                volume=opened.volume,
                open_time=opened.time or START,
                open_price=float(opened.price or 0.0),
                sl=None,
                tp=None,
                broker_position_id=opened.position_id,
                commission=opened.commission,
                confidence=0.7,
                model_set="xgb:1.0.0",
                mode="live",
            )
        )
        (pos,) = await broker.positions()
        reconnects = broker.reconnects
        _core.terminal.faults.update(lost_results=1, disconnect_after=1)
        closed = await broker.close_position(pos, "F" * 16)
        assert closed.ok and broker.reconnects > reconnects
        assert all(r.closed == [] for r in reports)
        assert await journal.close_trade(
            TradeClose("E" * 16, closed.time or START, float(closed.price or 0), "max_holding",
                       closed.profit, closed.commission, closed.swap, 1)
        )  # fmt: skip
        rows = journal.call(
            lambda c: c.execute("SELECT model_set, close_reason FROM trades").fetchall()
        )
        kinds = journal.call(lambda c: [r[0] for r in c.execute("SELECT kind FROM events")])
        journal.close()
        assert rows == [("xgb:1.0.0", "max_holding")]
        assert "position_adopted" not in kinds
        assert sends() == 2 and len(in_deals()) == 1

    asyncio.run(go())


def test_an_error_after_a_fill_never_frees_the_id_for_a_resend() -> None:
    async def go() -> None:
        failing = {"on": False}

        def deals(*args: Any, **kwargs: Any) -> Any:
            if failing["on"]:
                _core.terminal.error = (-1, "Terminal: Call failed")
                return None
            return mt5.history_deals_get(*args, **kwargs)

        broker = make_broker(FakeClock(START), module=Wrapped(history_deals_get=deals))
        await broker.connect()
        # Filled, but the deal cannot be read back: the fill is kept from its result.
        failing["on"] = True
        result = await broker.market_order(buy("G" * 16))
        assert result.ok and result.position_id == in_deals()[0]["position_id"]
        assert await broker.market_order(buy("G" * 16)) == result and sends() == 1
        # The result is lost and the look-up fails: an error, and the id stays ambiguous.
        _core.terminal.faults["lost_results"] = 1
        with pytest.raises(Exception, match="history_deals_get"):
            await broker.market_order(buy("H" * 16))
        failing["on"] = False
        again = await broker.market_order(buy("H" * 16))  # looked up, not resent
        assert again.ok and sends() == 2 and len(in_deals()) == 2

    asyncio.run(go())


def test_client_ids_cut_short_by_the_server_are_found_by_prefix() -> None:
    assert same_client_id("ABCDEF", "ABCDEFGHIJKLMNOP")
    assert same_client_id("ABCD", "ABCDEFGHIJKLMNOP")
    assert not same_client_id("ABC", "ABCDEFGHIJKLMNOP")
    assert not same_client_id("ABCDEX", "ABCDEFGHIJKLMNOP")

    async def go() -> None:
        broker = make_broker(FakeClock(START), {"stored_comment_max": 6})
        await broker.connect()
        _core.terminal.faults["lost_results"] = 1
        result = await broker.market_order(buy("K" * 16))
        assert result.ok and sends() == 1 and in_deals()[0]["comment"] == "K" * 6

    asyncio.run(go())


# -- the server clock --------------------------------------------------------------------


def test_a_stale_weekend_tick_does_not_halt_trading() -> None:
    async def go() -> None:
        clock = FakeClock(START)
        frozen: list[Any] = []

        def last_friday_tick(symbol: str) -> Any:  # the market is shut: the tick never moves
            if not frozen:
                t = mt5.symbol_info_tick(symbol)
                s = -36 * 3600
                frozen.append(type(t)(t.time + s, t.bid, t.ask, t.last, t.volume,
                                      t.time_msc + s * 1000, *t[6:]))  # fmt: skip
            return frozen[0]

        fake = {"server_timezone": "Europe/Athens"}
        broker = make_broker(
            clock,
            fake,
            server_timezone="Europe/Athens",
            module=Wrapped(symbol_info_tick=last_friday_tick),
        )
        halts: list[str | None] = []
        broker.on_halt = halts.append
        await broker.connect()
        assert broker.halt_reason is None
        for _ in range(3):  # still the same old tick: nothing to judge
            step(clock)
            await broker.closed_bars("EURUSD", 2)
        assert broker.halt_reason is None and halts == []

    asyncio.run(go())


def test_a_clock_halt_lifts_when_fresh_ticks_agree() -> None:
    async def go() -> None:
        clock = FakeClock(START)
        shift = {"s": -2 * 3600}  # a tick exactly two hours old looks like a UTC+0 server
        fake = {"server_timezone": "Europe/Athens"}
        broker = make_broker(
            clock,
            fake,
            server_timezone="Europe/Athens",
            module=Wrapped(symbol_info_tick=shifted_ticks(shift)),
        )
        halts: list[str | None] = []
        broker.on_halt = halts.append
        await broker.connect()
        assert "clock" in broker.halts
        shift["s"] = 0  # the market moves again: a new, fresh tick
        step(clock)
        await broker.closed_bars("EURUSD", 2)
        assert broker.halt_reason is None and halts[-1] is None and len(halts) == 2

    asyncio.run(go())


def test_a_wrong_server_timezone_stays_halted_on_fresh_ticks() -> None:
    async def go() -> None:
        clock = FakeClock(START)
        broker = make_broker(clock, {"server_timezone": "Europe/Athens"}, server_timezone="UTC")
        await broker.connect()
        reason = broker.halts["clock"]
        for _ in range(3):
            step(clock)
            await broker.closed_bars("EURUSD", 2)
        assert broker.halts["clock"] == reason

    asyncio.run(go())


# -- halts -------------------------------------------------------------------------------


def test_a_server_autotrading_halt_is_sticky_until_the_server_allows_it() -> None:
    async def go() -> None:
        clock = FakeClock(START)
        events = Events()
        broker = make_broker(clock, {"server_algo_trading": False}, events=events)
        await broker.connect()
        refused = await broker.market_order(buy("A" * 16))
        assert refused.retcode == rc.SERVER_DISABLES_AT and "server_algo" in broker.halts
        for _ in range(3):  # the terminal's own Algo Trading flag is on: irrelevant
            step(clock, 10)
            await broker.drain_closed_deals()
            await broker.closed_bars("EURUSD", 2)
        assert "server_algo" in broker.halts
        assert (await broker.market_order(buy("B" * 16))).retcode == rc.SERVER_DISABLES_AT
        assert sends() == 1
        _core.terminal.server_algo_trading = True  # the broker turned it back on
        step(clock, 10)
        await broker.drain_closed_deals()
        assert broker.halt_reason is None
        assert [k for k in events.kinds() if k.startswith("trading_")] == [
            "trading_halted",
            "trading_resumed",
        ]
        assert (await broker.market_order(buy("C" * 16))).ok

    asyncio.run(go())


def test_a_server_autotrading_halt_lifts_when_a_later_order_goes_through() -> None:
    async def go() -> None:
        clock = FakeClock(START)

        def account() -> Any:  # a server whose account flag says nothing
            info = mt5.account_info()
            return type(info)(*(True if f == "trade_expert" else v
                                for f, v in info._asdict().items()))  # fmt: skip

        broker = make_broker(clock, module=Wrapped(account_info=account))
        await broker.connect()
        assert (await broker.market_order(buy("A" * 16))).ok
        (pos,) = await broker.positions()
        _core.terminal.server_algo_trading = False
        assert (await broker.market_order(buy("B" * 16))).retcode == rc.SERVER_DISABLES_AT
        step(clock, 10)
        await broker.drain_closed_deals()
        assert "server_algo" in broker.halts
        _core.terminal.server_algo_trading = True
        assert (await broker.close_position(pos, "C" * 16)).ok
        assert broker.halt_reason is None

    asyncio.run(go())


def test_an_offline_terminal_pauses_trading_until_it_is_back_then_reconciles() -> None:
    async def go() -> None:
        clock = FakeClock(START)
        events = Events()
        offline_polls = {"n": 0}

        def terminal_info() -> Any:
            info = mt5.terminal_info()
            if offline_polls["n"] > 0:
                offline_polls["n"] -= 1
                if offline_polls["n"] == 0:
                    _core.terminal.connected = True
            return info

        broker = make_broker(clock, events=events, module=Wrapped(terminal_info=terminal_info))
        reconciled: list[int] = []

        async def hook() -> None:
            reconciled.append(1)

        broker.on_connected = hook
        await broker.connect()
        reconciled.clear()
        _core.terminal.connected = False  # the trade server link drops, the terminal runs
        offline_polls["n"] = 4
        step(clock, 10)
        started = clock.monotonic()
        await broker.closed_bars("EURUSD", 2)
        assert clock.monotonic() - started == pytest.approx(1 + 2 + 4)  # polled with backoff
        assert broker.paused is None and reconciled == [1]
        kinds = events.kinds()
        assert kinds.index("broker_offline") < kinds.index("broker_online")

    asyncio.run(go())


# -- the mt5linux bridge -----------------------------------------------------------------


class _Bridge:
    """A stand-in mt5linux client: the fake behind a link that can die."""

    def __init__(self) -> None:
        self.dead = False

    def __getattr__(self, name: str) -> Any:
        target = getattr(mt5, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.dead:
                raise EOFError("connection closed by peer")
            return target(*args, **kwargs)

        return call


class _BridgeServer:
    def __init__(self, down_for: int) -> None:
        self.down_for = down_for
        self.clients: list[_Bridge] = []
        self.threads: set[int] = set()

    def connect(self) -> _Bridge:
        self.threads.add(threading.get_ident())
        if self.down_for > 0:
            self.down_for -= 1
            raise ConnectionRefusedError(111, "Connection refused")
        self.clients.append(_Bridge())
        return self.clients[-1]


def test_a_bridge_down_at_start_is_retried_and_a_dead_one_is_rebuilt() -> None:
    async def go() -> None:
        clock = FakeClock(START)
        events = Events()
        server = _BridgeServer(down_for=2)
        broker = make_broker(clock, events=events, kind="mt5linux", module_factory=server.connect)
        await broker.connect()  # retried with backoff: no set-up error (exit 2)
        assert clock.monotonic() == pytest.approx(1 + 2) and len(server.clients) == 1
        (message,) = [m for _, k, m in events.items if k == "broker_connect_failed"]
        assert "not reachable" in message and "python -m mt5linux" in message
        server.clients[0].dead = True  # the Wine side restarted: the old client is dead
        assert (await broker.account()).balance == 10_000.0
        assert len(server.clients) == 2 and broker.reconnects == 1
        assert threading.get_ident() not in server.threads  # built on the terminal thread

    asyncio.run(go())


# -- hung calls ----------------------------------------------------------------------------


def test_a_hung_call_is_abandoned_and_close_never_blocks_the_loop() -> None:
    async def go() -> None:
        release = threading.Event()
        hang = {"account_info": False, "shutdown": False}

        def hanging(name: str) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                if hang[name]:
                    hang[name] = False
                    release.wait()
                return getattr(mt5, name)(*args, **kwargs)

            return call

        events = Events()
        module = Wrapped(account_info=hanging("account_info"), shutdown=hanging("shutdown"))
        broker = make_broker(FakeClock(START), events=events, module=module, call_timeout_s=0.05)
        await broker.connect()
        hang["account_info"] = True
        try:
            account = await broker.account()  # times out, reconnects, asks again
            assert account.balance == 10_000.0
            assert broker.call_timeouts == 1 and broker.reconnects == 1
            assert "broker_call_timeout" in events.kinds()
            hang["shutdown"] = True
            await asyncio.wait_for(broker.close(), 5)  # returns although shutdown hangs
            assert broker.call_timeouts == 2
        finally:
            release.set()

    asyncio.run(go())


# -- DST -----------------------------------------------------------------------------------

FALL_BACK = datetime(2024, 10, 27, 0, 50, tzinfo=UTC)  # Athens: 04:00 EEST -> 03:00 EET at 01:00


def test_the_repeated_autumn_hour_converts_by_order_and_now() -> None:
    wall = int(datetime(2024, 10, 27, 3, 30, tzinfo=UTC).timestamp())  # 03:30 server time
    first, second = FALL_BACK.replace(minute=30), FALL_BACK.replace(hour=1, minute=30)
    assert server_epoch_to_utc(wall, "Europe/Athens") == first
    assert server_epoch_to_utc(wall, "Europe/Athens", first + timedelta(minutes=1)) == first
    assert server_epoch_to_utc(wall, "Europe/Athens", second) == second
    # A series: the wall clock goes 03:58, 03:59, 03:00, 03:01 (the second time round).
    base = wall - 30 * 60
    times = np.array([base + 58 * 60, base + 59 * 60, base, base + 60])
    got = server_epochs_to_utc_ns(times, "Europe/Athens", second) // 10**9
    start = int(FALL_BACK.replace(minute=58).timestamp())
    assert list(got) == [start, start + 60, start + 120, start + 180]


def test_live_bars_fills_and_history_cross_the_repeated_autumn_hour() -> None:
    async def go() -> None:
        clock = FakeClock(FALL_BACK)
        fake = {"start": FALL_BACK.isoformat(), "server_timezone": "Europe/Athens"}
        broker = make_broker(clock, fake, server_timezone="Europe/Athens")
        await broker.connect()
        assert broker.halt_reason is None
        history = await broker.closed_bars("EURUSD", 3)
        feed = LiveFeed(broker, ["EURUSD"], clock=clock, timeframe_s=60, history=history)
        got = []
        for _ in range(40):  # 00:50 -> 01:30 UTC: the server shows 03:50 ... 03:59, 03:00 ...
            step(clock)
            got += [b.time for b in await feed.poll_once()]
        assert got == [FALL_BACK + timedelta(minutes=m) for m in range(40)]
        assert broker.halt_reason is None
        result = await broker.market_order(buy("D" * 16))
        assert result.time == clock.now()
        (pos,) = await broker.positions()
        assert pos.open_time == clock.now()
        frame = await fetch_history(broker, "EURUSD", 200)
        times = frame["time"]
        assert (times.diff().dropna() == timedelta(minutes=1)).all()
        assert times.iloc[-1] == clock.now() - timedelta(minutes=1)

    asyncio.run(go())


# -- orders --------------------------------------------------------------------------------


def test_a_netting_account_refuses_an_entry_that_would_merge_into_a_position() -> None:
    async def go() -> None:
        events = Events()
        fake = {"account": {"margin_mode": "netting"}}
        broker = make_broker(FakeClock(START), fake, events=events)
        await broker.connect()
        first = await broker.market_order(buy("A" * 16))
        assert first.ok
        for coid, side in (("B" * 16, Side.BUY), ("C" * 16, Side.SELL), ("D" * 16, Side.BUY)):
            refused = await broker.market_order(OrderRequest(coid, "EURUSD", side, 0.3))
            assert refused.retcode == rc.LIMIT_POSITIONS and not refused.ok
        assert sends() == 1
        (pos,) = await broker.positions()
        assert pos.volume == 0.1 and pos.client_order_id == "A" * 16
        assert events.kinds().count("entry_refused_netting") == 1  # once per position
        assert (await broker.close_position(pos, "E" * 16)).ok
        assert (await broker.market_order(buy("F" * 16))).ok  # flat again: entries go

    asyncio.run(go())


def test_invalid_volume_is_corrected_from_a_fresh_symbol_spec_or_not_resent() -> None:
    async def go() -> None:
        stale = {"n": 0}

        def symbol_info(symbol: str) -> Any:
            info = mt5.symbol_info(symbol)
            if stale["n"] > 0:  # the broker changed the step; our first read is old
                stale["n"] -= 1
                values = {**info._asdict(), "volume_step": 0.01, "volume_min": 0.01}
                return type(info)(*values.values())
            return info

        fake = {"symbols": {"EURUSD": {"volume_step": 0.1, "volume_min": 0.1}}}
        broker = make_broker(FakeClock(START), fake, module=Wrapped(symbol_info=symbol_info))
        await broker.connect()
        stale["n"] = 1
        result = await broker.market_order(buy("A" * 16, volume=0.12))
        assert result.ok and [r["volume"] for r in _core.terminal.sent_requests] == [0.12, 0.1]
        _core.terminal.faults["send_retcodes"] = [rc.INVALID_VOLUME]
        refused = await broker.market_order(buy("B" * 16, volume=0.2))
        assert refused.retcode == rc.INVALID_VOLUME and sends() == 3  # same request: not resent

    asyncio.run(go())


def test_prices_are_rounded_to_the_tick_size() -> None:
    assert round_price(2050.37, 2, tick_size=0.25) == 2050.25
    assert round_price(2050.38, 2, tick_size=0.25) == 2050.50
    assert round_price(1.123456, 5, tick_size=0.00001) == 1.12346

    async def go() -> None:
        fake = {"symbols": {"XAUUSD": {"tick_size": 0.25, "stops_level": 10}}}
        broker = make_broker(FakeClock(START), fake, symbols=("XAUUSD",))
        await broker.connect()
        bid, _ask = _core.terminal.quote("XAUUSD")
        request = OrderRequest("A" * 16, "XAUUSD", Side.BUY, 0.1, bid - 3.1, bid + 3.1)
        await broker.market_order(request)
        sent = _core.terminal.sent_requests[-1]
        for key in ("price", "sl", "tp"):
            assert sent[key] / 0.25 == pytest.approx(round(sent[key] / 0.25)), key
        assert sent["sl"] <= bid - 3.1 and sent["tp"] >= bid + 3.1  # rounded outwards

    asyncio.run(go())


def test_a_close_only_symbol_gives_no_bars_to_trade_while_we_hold_nothing_there() -> None:
    async def go() -> None:
        fake = {"symbols": {"EURUSD": {}, "GBPUSD": {"trade_mode": 3}}}
        broker: MT5Broker = make_broker(FakeClock(START), fake, symbols=("EURUSD", "GBPUSD"))
        await broker.connect()
        assert "GBPUSD" in broker.restricted and broker.tradable_symbols == ["EURUSD", "GBPUSD"]
        assert await broker.closed_bars("GBPUSD", 3) == []
        assert len(await broker.closed_bars("EURUSD", 3)) == 3

    asyncio.run(go())


def test_a_close_refused_as_already_closed_is_closed_from_history(tmp_path: Path) -> None:
    """10036 while our close is being sent: the reconciliation it triggers still closes
    the trade from the deal history (the in-flight rule must not hold it back)."""

    async def go() -> None:
        clock = FakeClock(START)
        by_hand = {"on": False}

        def order_send(request: dict[str, Any]) -> Any:
            if by_hand["on"]:  # someone closes it in the terminal just before our close
                by_hand["on"] = False
                assert mt5.Close("EURUSD", ticket=request["position"]) is True
            return mt5.order_send(request)

        broker = make_broker(clock, module=Wrapped(order_send=order_send))
        journal = Journal(tmp_path / "j.sqlite3", clock=clock)
        journal.open()

        async def reconcile() -> None:
            await reconcile_with_journal(broker, journal)

        broker.on_connected = reconcile
        await broker.connect()
        opened = await broker.market_order(buy("E" * 16))
        await journal.open_trade(
            TradeOpen("E" * 16, "EURUSD", "buy", opened.volume, opened.time or START,
                      float(opened.price or 0), None, None, opened.position_id,
                      opened.commission, None, "test", "live")
        )  # fmt: skip
        (pos,) = await broker.positions()
        by_hand["on"] = True
        refused = await broker.close_position(pos, "F" * 16)
        assert refused.retcode == rc.POSITION_CLOSED
        rows = journal.call(
            lambda c: c.execute("SELECT status, close_reason FROM trades").fetchall()
        )
        journal.close()
        assert rows == [("closed", "external")]

    asyncio.run(go())
