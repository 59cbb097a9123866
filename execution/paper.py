"""The paper broker: a simulated MT5-like venue driven by replayed bars.

It implements ``BarDrivenBroker`` with no I/O and no sleeping, so backtests,
the paper daemon and tests share one deterministic fill model.

Fill model (every choice errs against the trader where the bar cannot tell):

- Bars carry BID prices. ask = bid + spread * point, with the bar's spread or,
  when the bar says 0, the symbol's default spread.
- A market order is decided on a closed bar and fills at that bar's close, at
  time ``bar.time + timeframe_s`` (the moment the bar closed): buys at the ask,
  sells at the bid, each worsened by ``slippage_points``.
- SL/TP are checked on every later bar of the symbol. BUY positions close on
  the bid (SL when ``low <= sl``, TP when ``high >= tp``); SELL positions on
  the ask (SL when ``high + spread*point >= sl``, TP when
  ``low + spread*point <= tp``), with the bar's spread for the whole bar.
  Positions opened after the bar began (``open_time > bar.time``) are skipped.
- A bar that OPENS beyond a level (a gap) fills at its open: worse than the
  stop for an SL, better than the target for a TP. The open is checked first,
  so a bar that opens through the TP is a TP even if it later touches the SL.
- When one bar touches both levels and opened between them, the stop is
  assumed to have come first: a bar does not tell the order of its high and
  low, and assuming the target would flatter the strategy.
- Stop fills (an SL becomes a market order) are worsened by
  ``slippage_points``; take-profits fill exactly at the level (or the gap open).
- An SL/TP deal is stamped with the bar's open time: the moment inside the bar
  is unknown, and the open time is the only time the bar names.
- Money amounts (profit, commission, margin) are rounded to cents, as a
  broker's deals are. P&L in the profit currency is converted into the account
  currency: as is when they are the same, divided by the closing price when
  the base currency is the account currency (USDJPY on a USD account). Any
  other pair is refused when the broker is built.
- Commission is ``commission_per_lot`` per lot per side, charged to the
  balance when each deal happens (negative numbers are costs).
- SL/TP of a new order must lie on the right side of its fill price and at
  least ``stops_level_points`` from it; a modification is checked against the
  price the position would close at now (bid for a long, ask for a short).
  ``None`` or 0.0 (MT5's "none") means no level.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from config.settings import SymbolSettings
from execution import retcodes
from execution.broker import (
    AccountInfo,
    CloseReason,
    Deal,
    OrderRequest,
    OrderResult,
    Position,
    Side,
    SymbolSpec,
)
from execution.errors import OperationalError
from market_data.bars import Bar

_VOLUME_TOL = 1e-9


def specs_from_settings(symbols: Mapping[str, SymbolSettings]) -> dict[str, SymbolSpec]:
    """Contract specifications for the paper broker from the ``[symbols.X]`` tables."""
    return {
        name: SymbolSpec(
            symbol=name,
            contract_size=s.contract_size,
            point=s.point,
            digits=s.digits,
            volume_min=s.volume_min,
            volume_step=s.volume_step,
            volume_max=s.volume_max,
            stops_level_points=s.stops_level_points,
            profit_currency=s.profit_currency,
            base_currency=s.base_currency,
        )
        for name, s in symbols.items()
    }


def _money(value: float) -> float:
    return round(value, 2)


def _step_count(volume: float, step: float) -> float:
    return volume / step


def _is_step_multiple(volume: float, step: float) -> bool:
    n = round(_step_count(volume, step))
    return abs(volume - n * step) <= _VOLUME_TOL


def _normalise_volume(volume: float, step: float) -> float:
    """The exact decimal multiple of ``step`` nearest ``volume`` (0.07, not 0.07000000000000001)."""
    n = round(_step_count(volume, step))
    return float(Decimal(n) * Decimal(repr(step)))


@dataclass(slots=True)
class _OpenPosition:
    """Mutable bookkeeping behind one ``Position`` value."""

    position_id: int
    symbol: str
    side: Side
    volume: float
    open_price: float
    open_time: datetime
    sl: float | None
    tp: float | None
    client_order_id: str
    commission: float
    margin: float


class PaperBroker:
    """A simulated broker; see the module docstring for the fill model."""

    name = "paper"

    def __init__(
        self,
        specs: Mapping[str, SymbolSpec],
        *,
        account_currency: str = "USD",
        initial_balance: float,
        leverage: int,
        slippage_points: int = 0,
        commission_per_lot: float = 0.0,
        timeframe_s: int = 60,
        default_spread_points: Mapping[str, int] | None = None,
        history_max_deals: int = 10_000,
    ) -> None:
        if leverage < 1:
            raise ValueError(f"paper broker: leverage must be >= 1 (got {leverage})")
        if slippage_points < 0:
            raise ValueError(f"paper broker: slippage_points must be >= 0 (got {slippage_points})")
        if commission_per_lot < 0:
            raise ValueError(
                f"paper broker: commission_per_lot must be >= 0 (got {commission_per_lot})"
            )
        if timeframe_s <= 0:
            raise ValueError(f"paper broker: timeframe_s must be > 0 (got {timeframe_s})")
        if history_max_deals < 1:
            raise ValueError(
                f"paper broker: history_max_deals must be >= 1 (got {history_max_deals})"
            )
        for symbol, spec in specs.items():
            if account_currency not in (spec.profit_currency, spec.base_currency):
                raise ValueError(
                    f"paper broker: {symbol} ({spec.base_currency}/{spec.profit_currency}) "
                    f"cannot be converted into the account currency {account_currency}; "
                    "the account currency must be its base or profit currency"
                )
        self._specs = dict(specs)
        self._currency = account_currency
        self._initial_balance = float(initial_balance)
        self._balance = float(initial_balance)
        self._leverage = int(leverage)
        self._slippage_points = int(slippage_points)
        self._commission_per_lot = float(commission_per_lot)
        self._timeframe = timedelta(seconds=timeframe_s)
        self._default_spread = dict(default_spread_points or {})
        self._last: dict[str, Bar] = {}
        self._positions: dict[int, _OpenPosition] = {}
        # The latest closing deals of this process (the journal is the durable history):
        # bounded, so a paper daemon that runs for months does not grow with every trade.
        self._history: deque[Deal] = deque(maxlen=history_max_deals)
        self._closed: list[Deal] = []
        self._next_position_id = 1
        self._next_deal_id = 1
        self.connected = False

    # -- lifecycle ---------------------------------------------------------------------

    async def connect(self) -> None:
        self.connected = True

    async def close(self) -> None:
        self.connected = False

    def restore(
        self,
        balance: float,
        positions: Sequence[Position],
        next_position_id: int,
        next_deal_id: int,
    ) -> None:
        """Rebuild the account from the journal after a restart.

        ``balance`` already holds the realized P&L and every commission charged
        (the open positions' opening commissions included). Open positions come
        back with their margin at the open price. The id counters never go
        below one past the highest restored id, nor below where they already
        are, so a position id never repeats.
        """
        restored: dict[int, _OpenPosition] = {}
        for pos in positions:
            spec = self._spec(pos.symbol)
            if pos.position_id in restored:
                raise ValueError(f"paper restore: position id {pos.position_id} given twice")
            restored[pos.position_id] = _OpenPosition(
                position_id=pos.position_id,
                symbol=pos.symbol,
                side=pos.side,
                volume=pos.volume,
                open_price=pos.open_price,
                open_time=pos.open_time,
                sl=pos.sl,
                tp=pos.tp,
                client_order_id=pos.client_order_id,
                commission=pos.commission,
                margin=self._margin(spec, pos.volume, pos.open_price),
            )
        self._balance = float(balance)
        self._positions = restored
        highest = max(restored, default=0)
        self._next_position_id = max(int(next_position_id), highest + 1, self._next_position_id)
        self._next_deal_id = max(int(next_deal_id), self._next_deal_id)

    # -- market data -------------------------------------------------------------------

    async def on_bar(self, bar: Bar) -> None:
        """Settle SL/TP hits inside ``bar``, then make its close the current price."""
        spec = self._spec(bar.symbol)
        spread = self._spread_price(bar, spec)
        for pos in sorted(self._positions.values(), key=lambda p: p.position_id):
            if pos.symbol != bar.symbol or pos.open_time > bar.time:
                continue
            hit = self._exit_in_bar(pos, bar, spread, spec)
            if hit is None:
                continue
            reason, price = hit
            deal = self._settle(pos, pos.volume, price, bar.time, reason, pos.client_order_id, spec)
            self._closed.append(deal)
        self._last[bar.symbol] = bar

    def last_bar(self, symbol: str) -> Bar | None:
        """The latest bar seen for ``symbol`` (its close is the current bid)."""
        return self._last.get(symbol)

    def _exit_in_bar(
        self, pos: _OpenPosition, bar: Bar, spread: float, spec: SymbolSpec
    ) -> tuple[CloseReason, float] | None:
        slip = self._slippage_points * spec.point
        if pos.side is Side.BUY:
            # A long closes on the bid: the bar's own prices.
            open_, high, low = bar.open, bar.high, bar.low
            if pos.sl is not None and open_ <= pos.sl:
                return CloseReason.SL, open_ - slip
            if pos.tp is not None and open_ >= pos.tp:
                return CloseReason.TP, open_
            if pos.sl is not None and low <= pos.sl:
                return CloseReason.SL, pos.sl - slip
            if pos.tp is not None and high >= pos.tp:
                return CloseReason.TP, pos.tp
            return None
        # A short closes on the ask: bid + spread.
        open_, high, low = bar.open + spread, bar.high + spread, bar.low + spread
        if pos.sl is not None and open_ >= pos.sl:
            return CloseReason.SL, open_ + slip
        if pos.tp is not None and open_ <= pos.tp:
            return CloseReason.TP, open_
        if pos.sl is not None and high >= pos.sl:
            return CloseReason.SL, pos.sl + slip
        if pos.tp is not None and low <= pos.tp:
            return CloseReason.TP, pos.tp
        return None

    # -- queries -----------------------------------------------------------------------

    async def account(self) -> AccountInfo:
        floating = sum(self._floating(p) for p in self._positions.values())
        equity = _money(self._balance + floating)
        margin = _money(sum(p.margin for p in self._positions.values()))
        return AccountInfo(
            balance=_money(self._balance),
            equity=equity,
            margin=margin,
            free_margin=_money(equity - margin),
            leverage=self._leverage,
            currency=self._currency,
        )

    async def symbol_spec(self, symbol: str) -> SymbolSpec:
        return self._spec(symbol)

    async def positions(self, symbol: str | None = None) -> list[Position]:
        return [
            self._position_value(p)
            for p in sorted(self._positions.values(), key=lambda p: p.position_id)
            if symbol is None or p.symbol == symbol
        ]

    async def history_deals(self, since: datetime, until: datetime) -> list[Deal]:
        """Closing deals (SL, TP and our own closes) with ``since <= time < until``.

        Only this process's latest ``history_max_deals`` deals: after a restart the
        journal, not the paper broker, holds the history.
        """
        return [d for d in self._history if since <= d.time < until]

    async def drain_closed_deals(self) -> list[Deal]:
        """SL/TP closes since the last call (our own closes are answered by their result)."""
        deals, self._closed = self._closed, []
        return deals

    # -- orders ------------------------------------------------------------------------

    async def market_order(self, request: OrderRequest) -> OrderResult:
        if request.position_id is not None:
            pos = self._positions.get(request.position_id)
            if pos is None:
                return self._reject(request, retcodes.POSITION_CLOSED, "position not open")
            if request.side is not pos.side.opposite():
                return self._reject(
                    request, retcodes.INVALID, "a closing order must be opposite the position"
                )
            return await self.close_position(
                self._position_value(pos), request.client_order_id, request.volume
            )
        return await self._open(request)

    async def _open(self, request: OrderRequest) -> OrderResult:
        spec = self._specs.get(request.symbol)
        if spec is None:
            return self._reject(request, retcodes.INVALID, f"unknown symbol {request.symbol}")
        bar = self._last.get(request.symbol)
        if bar is None:
            return self._reject(
                request, retcodes.MARKET_CLOSED, f"no price for {request.symbol} yet"
            )
        problem = self._volume_problem(request.volume, spec)
        if problem is not None:
            return self._reject(request, retcodes.INVALID_VOLUME, problem)
        volume = _normalise_volume(request.volume, spec.volume_step)
        bid, ask = self._quotes(bar, spec)
        slip = self._slippage_points * spec.point
        raw = ask + slip if request.side is Side.BUY else bid - slip
        price = round(raw, spec.digits)
        sl, tp = _stop_value(request.sl, spec), _stop_value(request.tp, spec)
        problem = _stops_problem(request.side, price, sl, tp, spec)
        if problem is not None:
            return self._reject(request, retcodes.INVALID_STOPS, problem)
        margin = self._margin(spec, volume, price)
        free = (await self.account()).free_margin
        if margin > free:
            return self._reject(
                request,
                retcodes.NO_MONEY,
                f"margin {margin:.2f} {self._currency} exceeds free margin {free:.2f}",
            )
        commission = _money(-self._commission_per_lot * volume)
        self._balance += commission
        time = bar.time + self._timeframe
        position_id = self._take_position_id()
        deal_id = self._take_deal_id()
        self._positions[position_id] = _OpenPosition(
            position_id=position_id,
            symbol=request.symbol,
            side=request.side,
            volume=volume,
            open_price=price,
            open_time=time,
            sl=sl,
            tp=tp,
            client_order_id=request.client_order_id,
            commission=commission,
            margin=margin,
        )
        return OrderResult(
            retcode=retcodes.DONE,
            client_order_id=request.client_order_id,
            request=request,
            position_id=position_id,
            deal_id=deal_id,
            price=price,
            volume=volume,
            time=time,
            commission=commission,
        )

    async def close_position(
        self, position: Position, client_order_id: str, volume: float | None = None
    ) -> OrderResult:
        """Close all of ``position`` (or ``volume`` of it) at the current price.

        A partial close keeps the rest open under the same position id, with
        its opening commission and margin scaled to the volume that remains.
        """
        request = OrderRequest.closing(position, client_order_id, volume)
        close_volume = request.volume
        found = self._priced_position(request, position.position_id)
        if isinstance(found, OrderResult):
            return found
        pos, spec, bar = found
        if volume is None:
            close_volume = pos.volume
        else:
            problem = self._volume_problem(volume, spec, check_max=False)
            if problem is not None:
                return self._reject(request, retcodes.INVALID_VOLUME, problem)
            close_volume = _normalise_volume(volume, spec.volume_step)
            if close_volume > pos.volume + _VOLUME_TOL:
                return self._reject(
                    request,
                    retcodes.INVALID_CLOSE_VOLUME,
                    f"close volume {close_volume} exceeds the position's {pos.volume}",
                )
            rest = pos.volume - close_volume
            if _VOLUME_TOL < rest < spec.volume_min - _VOLUME_TOL:
                return self._reject(
                    request,
                    retcodes.INVALID_VOLUME,
                    f"the remaining {rest:g} lots would be below volume_min {spec.volume_min}",
                )
            if rest <= _VOLUME_TOL:
                close_volume = pos.volume
        bid, ask = self._quotes(bar, spec)
        slip = self._slippage_points * spec.point
        price = bid - slip if pos.side is Side.BUY else ask + slip
        deal = self._settle(
            pos,
            close_volume,
            price,
            bar.time + self._timeframe,
            CloseReason.CLIENT,
            client_order_id,
            spec,
        )
        return OrderResult(
            retcode=retcodes.DONE,
            client_order_id=client_order_id,
            request=request,
            position_id=pos.position_id,
            deal_id=deal.deal_id,
            price=deal.price,
            volume=deal.volume,
            time=deal.time,
            commission=deal.commission,
            profit=deal.profit,
        )

    async def modify_position(
        self, position: Position, sl: float | None, tp: float | None
    ) -> OrderResult:
        """Set new SL/TP, checked against the price the position would close at now."""
        request = OrderRequest.modifying(position, sl, tp)
        found = self._priced_position(request, position.position_id)
        if isinstance(found, OrderResult):
            return found
        pos, spec, bar = found
        bid, ask = self._quotes(bar, spec)
        current = bid if pos.side is Side.BUY else ask
        new_sl, new_tp = _stop_value(sl, spec), _stop_value(tp, spec)
        problem = _stops_problem(pos.side, current, new_sl, new_tp, spec)
        if problem is not None:
            return self._reject(request, retcodes.INVALID_STOPS, problem)
        pos.sl, pos.tp = new_sl, new_tp
        return OrderResult(
            retcode=retcodes.DONE,
            client_order_id=position.client_order_id,
            request=request,
            position_id=pos.position_id,
            price=current,
            volume=pos.volume,
            time=bar.time + self._timeframe,
        )

    # -- internals ---------------------------------------------------------------------

    def _priced_position(
        self, request: OrderRequest, position_id: int
    ) -> tuple[_OpenPosition, SymbolSpec, Bar] | OrderResult:
        """The open position with its spec and current bar, or the rejection to return."""
        pos = self._positions.get(position_id)
        if pos is None:
            return self._reject(
                request, retcodes.POSITION_CLOSED, f"position {position_id} is not open"
            )
        spec = self._spec(pos.symbol)
        bar = self._last.get(pos.symbol)
        if bar is None:
            return self._reject(request, retcodes.MARKET_CLOSED, f"no price for {pos.symbol} yet")
        return pos, spec, bar

    def _spec(self, symbol: str) -> SymbolSpec:
        spec = self._specs.get(symbol)
        if spec is None:
            known = ", ".join(sorted(self._specs)) or "none"
            raise OperationalError(
                f"paper broker: unknown symbol {symbol!r} (configured: {known}); "
                f"add a [symbols.{symbol}] table to the settings"
            )
        return spec

    def _spread_price(self, bar: Bar, spec: SymbolSpec) -> float:
        points = bar.spread or self._default_spread.get(bar.symbol, 0)
        return points * spec.point

    def _quotes(self, bar: Bar, spec: SymbolSpec) -> tuple[float, float]:
        bid = round(bar.close, spec.digits)
        ask = round(bar.close + self._spread_price(bar, spec), spec.digits)
        return bid, ask

    def _volume_problem(
        self, volume: float, spec: SymbolSpec, *, check_max: bool = True
    ) -> str | None:
        if not math.isfinite(volume) or volume < spec.volume_min - _VOLUME_TOL:
            return f"volume {volume} is below volume_min {spec.volume_min}"
        if check_max and volume > spec.volume_max + _VOLUME_TOL:
            return f"volume {volume} is above volume_max {spec.volume_max}"
        if not _is_step_multiple(volume, spec.volume_step):
            return f"volume {volume} is not a multiple of volume_step {spec.volume_step}"
        return None

    def _margin(self, spec: SymbolSpec, volume: float, price: float) -> float:
        """Margin in the account currency at ``price`` (the open price for a position)."""
        notional = volume * spec.contract_size
        if spec.base_currency == self._currency:
            return _money(notional / self._leverage)
        return _money(notional * price / self._leverage)

    def _to_account(self, amount: float, spec: SymbolSpec, price: float) -> float:
        """An amount in the profit currency, in the account currency at ``price``."""
        if spec.profit_currency == self._currency:
            return amount
        return amount / price  # base currency is the account currency (checked at init)

    def _gross(self, pos: _OpenPosition, volume: float, price: float, spec: SymbolSpec) -> float:
        diff = (price - pos.open_price) * pos.side.sign
        return self._to_account(diff * volume * spec.contract_size, spec, price)

    def _floating(self, pos: _OpenPosition) -> float:
        bar = self._last.get(pos.symbol)
        if bar is None:
            return 0.0  # restored, no price yet: carried at cost
        spec = self._specs[pos.symbol]
        bid, ask = self._quotes(bar, spec)
        price = bid if pos.side is Side.BUY else ask
        return _money(self._gross(pos, pos.volume, price, spec))

    def _position_value(self, pos: _OpenPosition) -> Position:
        return Position(
            position_id=pos.position_id,
            symbol=pos.symbol,
            side=pos.side,
            volume=pos.volume,
            open_price=pos.open_price,
            open_time=pos.open_time,
            sl=pos.sl,
            tp=pos.tp,
            client_order_id=pos.client_order_id,
            commission=pos.commission,
            profit=self._floating(pos),
        )

    def _settle(
        self,
        pos: _OpenPosition,
        volume: float,
        raw_price: float,
        time: datetime,
        reason: CloseReason,
        client_order_id: str,
        spec: SymbolSpec,
    ) -> Deal:
        """Book a closing deal of ``volume`` lots, update the balance, keep any rest open."""
        price = round(raw_price, spec.digits)
        profit = _money(self._gross(pos, volume, price, spec))
        commission = _money(-self._commission_per_lot * volume)
        self._balance += profit + commission
        rest = pos.volume - volume
        if rest <= _VOLUME_TOL:
            del self._positions[pos.position_id]
        else:
            kept = _normalise_volume(rest, spec.volume_step)
            pos.commission = _money(pos.commission * kept / pos.volume)
            pos.margin = self._margin(spec, kept, pos.open_price)
            pos.volume = kept
        deal = Deal(
            deal_id=self._take_deal_id(),
            position_id=pos.position_id,
            symbol=pos.symbol,
            side=pos.side,
            volume=volume,
            price=price,
            time=time,
            profit=profit,
            commission=commission,
            swap=0.0,
            reason=reason,
            client_order_id=client_order_id,
        )
        self._history.append(deal)
        return deal

    def _take_position_id(self) -> int:
        value = self._next_position_id
        self._next_position_id += 1
        return value

    def _take_deal_id(self) -> int:
        value = self._next_deal_id
        self._next_deal_id += 1
        return value

    @staticmethod
    def _reject(request: OrderRequest, retcode: int, comment: str) -> OrderResult:
        return OrderResult(
            retcode=retcode,
            client_order_id=request.client_order_id,
            request=request,
            comment=comment,
        )


def _stop_value(level: float | None, spec: SymbolSpec) -> float | None:
    """``None`` or 0.0 (MT5's "no level") mean no level; others snap to ``digits``."""
    if level is None or level == 0.0:
        return None
    return round(level, spec.digits)


def _stops_problem(
    side: Side, price: float, sl: float | None, tp: float | None, spec: SymbolSpec
) -> str | None:
    """Why ``sl``/``tp`` are invalid around ``price`` for a ``side`` position, or None."""
    min_distance = spec.stops_level_points * spec.point
    # A thousandth of a point of slack absorbs float noise in prices on the grid.
    slack = spec.point * 1e-3
    for label, level, sign in (("sl", sl, -1), ("tp", tp, 1)):
        if level is None:
            continue
        if not math.isfinite(level):
            return f"{label} {level} is not a price"
        distance = (level - price) * side.sign * sign  # > 0 when on the correct side
        if distance <= 0:
            where = "below" if side.sign * sign < 0 else "above"
            return f"{label} {level} must be {where} the price {price} for a {side.value}"
        if distance < min_distance - slack:
            return (
                f"{label} {level} is {distance / spec.point:.1f} points from the price {price}; "
                f"the stops level is {spec.stops_level_points} points"
            )
    return None
