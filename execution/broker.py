"""The ``Broker`` seam: what the strategy may ask of any venue (MT5 or paper).

Values crossing the seam are frozen dataclasses with UTC-aware times. Results
carry MT5 trade-server return codes (``execution.retcodes``) so one retcode
policy serves every broker.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol, runtime_checkable

from market_data.bars import Bar


class Side(StrEnum):
    BUY = "buy"
    SELL = "sell"

    @property
    def sign(self) -> int:
        return 1 if self is Side.BUY else -1

    def opposite(self) -> Side:
        return Side.SELL if self is Side.BUY else Side.BUY


class CloseReason(StrEnum):
    SL = "sl"
    TP = "tp"
    CLIENT = "client"  # closed by our own request (signal, max holding, shutdown)
    EXTERNAL = "external"  # closed by someone else (manual, stop-out, unknown)


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    symbol: str
    contract_size: float
    point: float
    digits: int
    volume_min: float
    volume_step: float
    volume_max: float
    stops_level_points: int = 0
    profit_currency: str = "USD"
    base_currency: str = "EUR"


@dataclass(frozen=True, slots=True)
class AccountInfo:
    balance: float
    equity: float
    margin: float
    free_margin: float
    leverage: int
    currency: str


@dataclass(frozen=True, slots=True)
class Position:
    position_id: int
    symbol: str
    side: Side
    volume: float
    open_price: float
    open_time: datetime
    sl: float | None
    tp: float | None
    client_order_id: str
    commission: float = 0.0  # charged so far (negative = cost), account currency
    swap: float = 0.0
    profit: float = 0.0  # floating P&L at the last price, account currency


@dataclass(frozen=True, slots=True)
class OrderRequest:
    """A market order opening a position (``position_id`` None) or closing one."""

    client_order_id: str
    symbol: str
    side: Side
    volume: float
    sl: float | None = None
    tp: float | None = None
    position_id: int | None = None
    comment: str = ""

    @classmethod
    def closing(
        cls, position: Position, client_order_id: str, volume: float | None = None
    ) -> OrderRequest:
        """The opposite deal that closes ``position`` (all of it, or ``volume``)."""
        return cls(
            client_order_id=client_order_id,
            symbol=position.symbol,
            side=position.side.opposite(),
            volume=position.volume if volume is None else volume,
            position_id=position.position_id,
        )

    @classmethod
    def modifying(cls, position: Position, sl: float | None, tp: float | None) -> OrderRequest:
        """New SL/TP for ``position`` (under its own client order id)."""
        return cls(
            client_order_id=position.client_order_id,
            symbol=position.symbol,
            side=position.side,
            volume=position.volume,
            sl=sl,
            tp=tp,
            position_id=position.position_id,
        )


@dataclass(frozen=True, slots=True)
class OrderResult:
    retcode: int
    client_order_id: str
    request: OrderRequest
    position_id: int | None = None
    deal_id: int | None = None
    price: float | None = None
    volume: float = 0.0
    time: datetime | None = None
    commission: float = 0.0  # of this deal (negative = cost), account currency
    profit: float = 0.0  # gross P&L of a closing deal, account currency
    swap: float = 0.0
    comment: str = ""

    @property
    def ok(self) -> bool:
        from execution.retcodes import DONE, DONE_PARTIAL, PLACED

        return self.retcode in (DONE, DONE_PARTIAL, PLACED)


@dataclass(frozen=True, slots=True)
class Deal:
    """A closing deal: how and at what a position ended (from history)."""

    deal_id: int
    position_id: int
    symbol: str
    side: Side  # side of the closed position
    volume: float
    price: float
    time: datetime
    profit: float  # gross P&L, account currency
    commission: float  # of this closing deal (negative = cost)
    swap: float
    reason: CloseReason
    client_order_id: str = ""


@runtime_checkable
class Broker(Protocol):
    """Every call may raise ``execution.errors.BrokerError`` subclasses (the policy)."""

    name: str

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def account(self) -> AccountInfo: ...

    async def symbol_spec(self, symbol: str) -> SymbolSpec: ...

    async def positions(self, symbol: str | None = None) -> list[Position]: ...

    async def market_order(self, request: OrderRequest) -> OrderResult: ...

    async def close_position(
        self, position: Position, client_order_id: str, volume: float | None = None
    ) -> OrderResult: ...

    async def modify_position(
        self, position: Position, sl: float | None, tp: float | None
    ) -> OrderResult: ...

    async def history_deals(self, since: datetime, until: datetime) -> list[Deal]: ...

    async def drain_closed_deals(self) -> list[Deal]:
        """Deals that closed positions (SL/TP/external) since the last call."""
        ...


@runtime_checkable
class BarDrivenBroker(Broker, Protocol):
    """A simulated venue that learns prices from the replayed bars (the paper broker)."""

    async def on_bar(self, bar: Bar) -> None:
        """Advance the simulation to the close of ``bar``: SL/TP hits, floating P&L."""
        ...
