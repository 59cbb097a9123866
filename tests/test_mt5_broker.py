"""The MT5 adapter against the fake terminal: orders, the retcode table, reconnects, time."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from execution import retcodes as rc
from execution.broker import OrderRequest, Side
from execution.errors import TemporaryBrokerError
from execution.mt5_client import (
    RETCODE_POLICY,
    MT5Broker,
    Policy,
    adjust_stops,
    filling_modes,
    normalise_volume,
    policy_for,
    same_client_id,
    server_epoch_to_utc,
)
from tests.mt5_fixtures import MAGIC, Events, _core, make_broker
from utils.clock import FakeClock

START = datetime(2024, 3, 4, 10, 0, tzinfo=UTC)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def clock() -> FakeClock:
    return FakeClock(START)


async def connected(broker: MT5Broker) -> MT5Broker:
    await broker.connect()
    return broker


def buy(coid: str = "AAAAAAAAAAAAAAA1", volume: float = 0.1, **kw: Any) -> OrderRequest:
    return OrderRequest(coid, "EURUSD", Side.BUY, volume, **kw)


def sends() -> int:
    return len(_core.terminal.sent_requests)


def in_deals() -> list[dict[str, Any]]:
    return [d for d in _core.terminal.deals if d["entry"] == 0]


# -- pure rules -------------------------------------------------------------------------


def test_volume_is_rounded_to_the_step_and_clamped() -> None:
    assert normalise_volume(0.123, 0.01, 0.01, 50) == 0.12
    assert normalise_volume(0.126, 0.01, 0.01, 50) == 0.13
    assert normalise_volume(0.001, 0.01, 0.01, 50) == 0.01
    assert normalise_volume(75.0, 0.01, 0.01, 50) == 50.0
    assert normalise_volume(0.35, 0.1, 0.1, 1.05) == 0.4
    assert normalise_volume(7.0, 0.1, 0.1, 1.05) == 1.0


def test_stops_keep_the_stops_level_from_a_fresh_tick_and_the_right_side() -> None:
    # Buy: bid 1.10000, 50 points = 0.00050 minimum distance.
    assert adjust_stops(Side.BUY, 1.1, 1.1001, 1.0999, 1.1002, 0.0005, 5) == (1.0995, 1.1005)
    assert adjust_stops(Side.BUY, 1.1, 1.1001, 1.099, 1.102, 0.0005, 5) == (1.099, 1.102)
    # Sell: the ask is the reference.
    assert adjust_stops(Side.SELL, 1.1, 1.1001, 1.1002, 1.0999, 0.0005, 5) == (1.1006, 1.0996)
    assert adjust_stops(Side.SELL, 1.1, 1.1001, None, None, 0.0005, 5) == (0.0, 0.0)
    with pytest.raises(ValueError, match="sl"):
        adjust_stops(Side.BUY, 1.1, 1.1001, 1.1001, None, 0.0, 5)


def test_filling_mode_comes_from_the_bitmask() -> None:
    assert filling_modes(1, 2) == [0]
    assert filling_modes(2, 2) == [1]
    assert filling_modes(3, 2) == [0, 1]
    assert filling_modes(0, 2) == [2]
    assert filling_modes(3, 3) == [0, 1, 2]


def test_client_ids_match_by_prefix_when_the_server_cut_them() -> None:
    assert same_client_id("ABCDEFGHIJKLMNOP", "ABCDEFGHIJKLMNOP")
    assert same_client_id("ABCDEFGHIJ", "ABCDEFGHIJKLMNOP")
    assert not same_client_id("ABC", "ABCDEFGHIJKLMNOP")
    assert not same_client_id("", "ABCDEFGHIJKLMNOP")


def test_server_time_converts_to_utc_with_dst() -> None:
    # Athens: UTC+2 in winter, UTC+3 in summer.
    winter = int(datetime(2024, 1, 10, 12, 0, tzinfo=UTC).timestamp())
    summer = int(datetime(2024, 7, 10, 12, 0, tzinfo=UTC).timestamp())
    assert server_epoch_to_utc(winter, "Europe/Athens") == datetime(2024, 1, 10, 10, tzinfo=UTC)
    assert server_epoch_to_utc(summer, "Europe/Athens") == datetime(2024, 7, 10, 9, tzinfo=UTC)
    assert server_epoch_to_utc(summer, "NY+7") == datetime(2024, 7, 10, 9, tzinfo=UTC)


# -- orders ----------------------------------------------------------------------------


def test_open_and_close_round_trip_with_magic_comment_and_deal_values() -> None:
    async def go() -> None:
        broker = await connected(make_broker(clock(), {"account": {"commission_per_lot": 7.0}}))
        result = await broker.market_order(buy(volume=0.123, sl=1.09, tp=1.12))
        assert result.retcode == rc.DONE and result.volume == 0.12
        sent = _core.terminal.sent_requests[-1]
        assert sent["magic"] == MAGIC and sent["comment"] == "AAAAAAAAAAAAAAA1"
        assert sent["deviation"] == 10 and sent["type_filling"] == 0
        assert result.commission == pytest.approx(-0.84)
        (pos,) = await broker.positions()
        assert pos.position_id == result.position_id and pos.client_order_id == "AAAAAAAAAAAAAAA1"
        assert pos.open_time == START
        closed = await broker.close_position(pos, "CCCCCCCCCCCCCCC1")
        assert closed.ok and closed.position_id == pos.position_id
        assert _core.terminal.sent_requests[-1]["position"] == pos.position_id
        assert closed.profit == pytest.approx(-1.2)  # the spread: 10 points x 0.12 lots
        assert await broker.positions() == []
        assert await broker.drain_closed_deals() == []  # our close is answered by its result
        await broker.close()

    run(go())


def test_positions_of_other_magic_numbers_are_not_ours() -> None:
    async def go() -> None:
        broker = await connected(make_broker(clock()))
        assert _core.terminal.initialized
        import MetaTrader5 as mt5

        assert mt5.Buy("EURUSD", 0.1).retcode == 10009  # magic 0: someone else's
        assert await broker.positions() == []

    run(go())


def test_stops_too_close_are_widened_and_wrong_side_stops_are_not_sent() -> None:
    async def go() -> None:
        fake = {"symbols": {"EURUSD": {"stops_level": 50}}}
        broker = await connected(make_broker(clock(), fake))
        bid, _ask = _core.terminal.quote("EURUSD")
        result = await broker.market_order(buy(sl=bid - 0.0001, tp=bid + 0.0001))
        assert result.ok
        sent = _core.terminal.sent_requests[-1]
        assert bid - sent["sl"] >= 0.0005 - 1e-9 and sent["tp"] - bid >= 0.0005 - 1e-9
        before = sends()
        bad = await broker.market_order(buy("BBBBBBBBBBBBBBB1", sl=bid + 0.001))
        assert bad.retcode == rc.INVALID_STOPS and sends() == before

    run(go())


@pytest.mark.parametrize(("mask", "exemode", "expected"), [(1, 2, 0), (2, 2, 1), (0, 3, 2)])
def test_filling_mode_sent_matches_the_symbol(mask: int, exemode: int, expected: int) -> None:
    async def go() -> None:
        fake = {"symbols": {"EURUSD": {"filling_mode": mask, "exemode": exemode}}}
        broker = await connected(make_broker(clock(), fake))
        assert (await broker.market_order(buy())).ok
        assert _core.terminal.sent_requests[-1]["type_filling"] == expected

    run(go())


def _expected_sends(retcode: int, policy: Policy) -> int:
    if retcode in (rc.INVALID_VOLUME, rc.INVALID_STOPS):
        return 1  # re-read and re-rounded, the request is the same: not resent unchanged
    return {
        Policy.RETRY_FRESH_PRICE: 2,
        Policy.CORRECT_ONCE: 2,
        Policy.WAIT_RETRY: 2,
    }.get(policy, 1)


@pytest.mark.parametrize(
    "retcode", sorted(c for c in RETCODE_POLICY if c not in (10008, 10009, 10010))
)
def test_each_retcode_row_of_the_policy_table(retcode: int) -> None:
    """One injected retcode, then a market that would fill: what the adapter does."""
    policy = policy_for(retcode)

    async def go() -> None:
        events = Events()
        halts: list[str | None] = []
        reconciled: list[int] = []
        broker = await connected(make_broker(clock(), {}, events=events))
        broker.on_halt = halts.append

        async def hook() -> None:
            reconciled.append(1)

        broker.on_connected = hook
        _core.terminal.faults["send_retcodes"] = [retcode]
        ticks_before = _core.terminal.calls.get("symbol_info_tick", 0)
        result = await broker.market_order(buy())
        assert sends() == _expected_sends(retcode, policy), policy
        if sends() == 2:
            assert result.retcode == rc.DONE  # corrected or retried, then filled
            # Each send was built from a tick read just before it.
            assert _core.terminal.calls["symbol_info_tick"] - ticks_before == 2
        else:
            assert result.retcode == retcode and not result.ok
            assert in_deals() == []  # nothing was filled, and nothing was resent
        if policy is Policy.REFUSE_ALERT:
            assert ("error", "order_refused") in [(lv, k) for lv, k, _ in events.items]
        if policy is Policy.HALT_ALERT:
            assert halts and halts[-1] and "autotrading" in halts[-1]
            blocked = await broker.market_order(buy("ZZZZZZZZZZZZZZZ1"))
            assert blocked.retcode == retcode and sends() == 1
        if policy is Policy.WAIT_SESSION:
            blocked = await broker.market_order(buy("ZZZZZZZZZZZZZZZ1"))
            assert blocked.retcode == rc.MARKET_CLOSED and sends() == 1
            broker._clock.advance(61)  # type: ignore[attr-defined]
            assert (await broker.market_order(buy("ZZZZZZZZZZZZZZZ2"))).ok
        if policy is Policy.RECONNECT:
            assert "broker_offline" in events.kinds() and reconciled
        if policy is Policy.RECONCILE:
            assert reconciled and "position_already_closed" in events.kinds()
        if policy is Policy.LOOKUP:
            assert "order_ambiguous" in events.kinds()

    run(go())


def test_requotes_are_retried_up_to_n_times_with_a_fresh_tick() -> None:
    async def go() -> None:
        broker = await connected(make_broker(clock(), price_retries=3))
        _core.terminal.faults["send_retcodes"] = [rc.REQUOTE] * 4
        result = await broker.market_order(buy())
        assert result.retcode == rc.REQUOTE and sends() == 4 and in_deals() == []

    run(go())


def test_unsupported_filling_is_corrected_once_to_the_next_mode() -> None:
    async def go() -> None:
        broker = await connected(make_broker(clock()))
        _core.terminal.faults["send_retcodes"] = [rc.INVALID_FILL]
        assert (await broker.market_order(buy())).ok
        assert [r["type_filling"] for r in _core.terminal.sent_requests] == [0, 1]
        _core.terminal.faults["send_retcodes"] = [rc.INVALID_FILL, rc.INVALID_FILL]
        result = await broker.market_order(buy("BBBBBBBBBBBBBBB1"))
        assert result.retcode == rc.INVALID_FILL and sends() == 4

    run(go())


def test_timeout_that_executed_is_found_by_client_id_and_not_resent() -> None:
    async def go() -> None:
        broker = await connected(make_broker(clock()))
        _core.terminal.faults["executed_retcodes"] = [rc.TIMEOUT]
        result = await broker.market_order(buy())
        assert result.retcode == rc.DONE and result.position_id is not None
        assert sends() == 1 and len(in_deals()) == 1

    run(go())


def test_a_lost_result_is_looked_up_by_client_id_and_never_sent_twice() -> None:
    async def go() -> None:
        events = Events()
        broker = await connected(make_broker(clock(), events=events))
        _core.terminal.faults["lost_results"] = 1
        _core.terminal.faults["disconnect_after"] = 1  # and the link drops right after
        result = await broker.market_order(buy())
        assert result.retcode == rc.DONE and result.position_id == in_deals()[0]["position_id"]
        again = await broker.market_order(buy())  # the same decision again: answered, not sent
        assert again == result
        assert sends() == 1 and len(in_deals()) == 1
        assert "order_result_lost" in events.kinds() and broker.reconnects >= 1

    run(go())


def test_a_request_lost_before_the_server_is_not_resent() -> None:
    async def go() -> None:
        broker = await connected(make_broker(clock()))
        _core.terminal.faults["lost_requests"] = 1
        result = await broker.market_order(buy())
        assert not result.ok and sends() == 1 and in_deals() == []
        assert not (await broker.market_order(buy())).ok and sends() == 1

    run(go())


def test_partial_fill_journals_the_filled_volume_and_does_not_resend_the_rest() -> None:
    async def go() -> None:
        events = Events()
        fake = {"symbols": {"EURUSD": {"filling_mode": 2}}, "faults": {"partial_fills": 1}}
        broker = await connected(make_broker(clock(), fake, events=events))
        result = await broker.market_order(buy(volume=0.4))
        assert result.retcode == rc.DONE_PARTIAL and result.ok and result.volume == 0.2
        assert sends() == 1 and "order_partial_fill" in events.kinds()

    run(go())


def test_sltp_modification_uses_trade_action_sltp() -> None:
    async def go() -> None:
        broker = await connected(make_broker(clock()))
        await broker.market_order(buy())
        (pos,) = await broker.positions()
        bid, _ = _core.terminal.quote("EURUSD")
        result = await broker.modify_position(pos, round(bid - 0.002, 5), round(bid + 0.003, 5))
        assert result.retcode == rc.DONE
        assert _core.terminal.sent_requests[-1]["action"] == 6
        (pos,) = await broker.positions()
        assert pos.sl == round(bid - 0.002, 5) and pos.tp == round(bid + 0.003, 5)

    run(go())


# -- connection ------------------------------------------------------------------------


def test_reconnect_uses_capped_exponential_backoff_on_the_clock() -> None:
    async def go() -> None:
        events = Events()
        fake_clock = clock()
        broker = await connected(make_broker(fake_clock, events=events, backoff_max_s=4.0))
        _core.terminal.faults.update(
            disconnect_after=0, init_failures=[-10005, -10005, -10005, -10005]
        )
        started = fake_clock.monotonic()
        account = await broker.account()  # waits for the link, then answers
        assert account.balance == 10_000.0
        assert fake_clock.monotonic() - started == pytest.approx(1 + 2 + 4 + 4)
        assert broker.reconnects == 1 and broker.paused is None
        kinds = events.kinds()
        assert kinds.count("broker_disconnected") == 1
        assert kinds.count("broker_connect_failed") == 1  # the same error is journaled once
        assert "broker_connected" in kinds

    run(go())


def test_initialize_failure_names_the_code_message_and_fix() -> None:
    async def go() -> None:
        events = Events()
        broker = make_broker(
            clock(), {"faults": {"init_failures": [-6] * 5}}, events=events, reconnect_attempts=3
        )
        with pytest.raises(TemporaryBrokerError) as info:
            await broker.connect()
        text = str(info.value)
        assert "(-6, 'Terminal: Authorization failed')" in text
        assert "SCALPER__BROKER__PASSWORD" in text
        assert "\n" not in events.items[0][2]

    run(go())


def test_credentials_are_passed_with_login_as_int() -> None:
    async def go() -> None:
        fake = {"account": {"login": 777, "password": "pw", "server": "S-1"}}
        broker = make_broker(clock(), fake, login=777, password="pw", server="S-1")  # noqa: S106
        await broker.connect()
        assert _core.terminal.initialized

    run(go())


def test_unknown_and_close_only_symbols_are_refused_and_the_others_trade() -> None:
    async def go() -> None:
        events = Events()
        fake = {"symbols": {"EURUSD": {}, "GBPUSD": {"trade_mode": 3}}}
        broker = make_broker(clock(), fake, symbols=("EURUSD", "GBPUSD", "EURUSD.x"), events=events)
        await broker.connect()
        assert broker.tradable_symbols == ["EURUSD", "GBPUSD"]
        assert "EURUSD.x" in broker.unavailable and "suffix" in broker.unavailable["EURUSD.x"]
        blocked = await broker.market_order(OrderRequest("G" * 16, "GBPUSD", Side.BUY, 0.1))
        assert not blocked.ok and sends() == 0
        assert (await broker.market_order(buy())).ok
        assert {"symbol_unavailable", "symbol_restricted"} <= set(events.kinds())

    run(go())


def test_a_wrong_server_timezone_halts_trading_with_the_fix() -> None:
    async def go() -> None:
        halts: list[str | None] = []
        fake = {"server_timezone": "Europe/Athens"}
        broker = make_broker(clock(), fake, server_timezone="UTC")
        broker.on_halt = halts.append
        await broker.connect()
        reason = broker.halt_reason
        assert reason and "broker.server_timezone = 'UTC'" in reason and "UTC+2" in reason
        assert halts == [reason]  # the daemon was told (it stops entries on this)
        assert not (await broker.market_order(buy())).ok and sends() == 0

    run(go())


def test_times_from_the_server_are_utc_at_the_edge() -> None:
    async def go() -> None:
        fake = {"server_timezone": "Europe/Athens"}
        broker = await connected(make_broker(clock(), fake, server_timezone="Europe/Athens"))
        assert broker.halt_reason is None
        result = await broker.market_order(buy())
        assert result.time == START
        (pos,) = await broker.positions()
        assert pos.open_time == START
        bars = await broker.closed_bars("EURUSD", 3)
        assert [b.time for b in bars] == [START - timedelta(minutes=m) for m in (3, 2, 1)]

    run(go())


def test_no_two_terminal_calls_ever_overlap() -> None:
    async def go() -> None:
        broker = await connected(make_broker(clock()))
        await asyncio.gather(*(broker.account() for _ in range(50)), broker.positions())
        assert _core.terminal.concurrent_calls == 0
        # One thread made every call, and not the event loop's.
        assert len(_core.terminal.threads) == 1
        assert threading.get_ident() not in _core.terminal.threads

    run(go())
