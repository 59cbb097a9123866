"""The live MetaTrader 5 broker: the ``Broker`` protocol over the ``MetaTrader5`` package.

The package (or the ``mt5linux`` bridge client) is imported lazily, only for
``broker.kind = "mt5"`` / ``"mt5linux"``. It is synchronous and shares one IPC
channel, so every terminal call runs on ONE dedicated executor thread, awaited
from the event loop; each call reads ``last_error()`` in the same job. ``None``
is an error; an empty tuple is "no match". Records are turned into plain dicts
on that thread (through ``mt5linux`` they are remote proxies).

Policies (CONVENTIONS.md, "Orders"):

- ``RETCODE_POLICY`` below is the retcode table; ``MT5Broker._send`` applies it.
- IPC codes ``-10001/-10002/-10004/-10005`` (and bridge exceptions) mean
  ``shutdown()``, ``initialize()`` again with capped exponential backoff on the
  injected clock, then the ``on_connected`` hook (reconciliation with the
  journal). Trading is paused meanwhile: every call waits for the link.
- A call that hangs past ``call_timeout_s`` is abandoned (its thread with it) and
  treated as IPC timeout; mt5linux clients are rebuilt after a dead link, and a
  bridge that is not up is retried like a terminal that is not ready.
- ``terminal_info()`` is read every ``terminal_check_s`` as the feed polls:
  ``connected`` False (like 10031) pauses trading until it is back, then
  reconciles; ``trade_allowed`` drives the Algo Trading halt. The server's
  10026 halt is separate and sticky (lifted by a fill or the account flag).
- An ``order_send`` that returns ``None`` or 10012 is ambiguous: the order is
  looked up by its client id (positions, then deal history) and never resent.
  While a send runs its id is in flight: a reconciliation triggered meanwhile
  neither adopts its position nor closes its trade.
- Times from the terminal are the server's wall clock; they become UTC here,
  once, with ``broker.server_timezone`` (judged against fresh ticks as they
  come; the hour repeated in autumn placed by order and the clock).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import math
import queue
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from enum import StrEnum
from functools import lru_cache
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import structlog

from execution import retcodes as rc
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
from execution.errors import BrokerError, OperationalError, TemporaryBrokerError
from market_data.bars import Bar
from market_data.timezones import server_offset, to_utc
from utils.clock import Clock
from utils.trade_journal import Journal, TradeClose, TradeOpen, fetch_open_trades

log = structlog.get_logger(__name__)

# Package constants, by value (the package's own names cost a round trip through
# mt5linux, and some, like SYMBOL_FILLING_*, do not exist at all).
ACTION_DEAL = 1
ACTION_SLTP = 6
ORDER_TYPE_BUY = 0
ORDER_TYPE_SELL = 1
FILLING_FOK = 0
FILLING_IOC = 1
FILLING_RETURN = 2
ORDER_TIME_GTC = 0
FILLING_MASK_FOK = 1
FILLING_MASK_IOC = 2
EXECUTION_EXCHANGE = 3
TRADE_MODE_DISABLED = 0
TRADE_MODE_LONGONLY = 1
TRADE_MODE_SHORTONLY = 2
TRADE_MODE_CLOSEONLY = 3
TRADE_MODE_FULL = 4
DEAL_ENTRY_IN = 0
DEAL_ENTRY_OUT = 1
DEAL_ENTRY_INOUT = 2
DEAL_ENTRY_OUT_BY = 3
ACCOUNT_MARGIN_MODE_HEDGING = 2
DEAL_REASON_SL = 4
DEAL_REASON_TP = 5
TIMEFRAMES: Mapping[int, int] = MappingProxyType(
    {60: 1, 300: 5, 900: 15, 1800: 30, 3600: 16385, 14400: 16388, 86400: 16408}
)

IPC_CODES = frozenset({-10000, -10001, -10002, -10004, -10005})
INIT_HINTS: Mapping[int, str] = MappingProxyType(
    {
        -10003: "the terminal was not found: set broker.terminal_path to terminal64.exe",
        -10005: "the terminal is starting, shows a dialog, or Algo Trading is off",
        -10004: "no IPC connection: is the terminal running as the same user?",
        -6: "check SCALPER__BROKER__LOGIN, SCALPER__BROKER__PASSWORD and SCALPER__BROKER__SERVER",
        -2: "SCALPER__BROKER__LOGIN must be the account number (digits only)",
        -7: "this account needs OTP or a certificate, which the Python API cannot use",
        -8: "allow algorithmic trading via the Python API in the terminal's options",
    }
)
TRADE_MODE_NAMES: Mapping[int, str] = MappingProxyType(
    {0: "DISABLED", 1: "LONGONLY", 2: "SHORTONLY", 3: "CLOSEONLY", 4: "FULL"}
)


class Policy(StrEnum):
    """What the adapter does with a trade-server retcode."""

    DONE = "done"  # filled (10010: journal the filled volume, never resend the rest)
    RETRY_FRESH_PRICE = "retry_fresh_price"  # up to price_retries, a fresh tick each time
    CORRECT_ONCE = "correct_once"  # adjust the request once (filling, volume, stops)
    REFUSE_ALERT = "refuse_alert"  # no retry; journal and alert
    WAIT_SESSION = "wait_session"  # no retry; no entries on the symbol for a while
    HALT_ALERT = "halt_alert"  # stop opening positions; alert
    RECONNECT = "reconnect"  # terminal offline: pause, poll, reconcile; not resent
    LOOKUP = "lookup"  # ambiguous: find it by client id; never resend
    WAIT_RETRY = "wait_retry"  # server busy: wait, then retry
    RECONCILE = "reconcile"  # our view is stale: reconcile with the terminal
    REJECT = "reject"  # no retry


RETCODE_POLICY: Mapping[int, Policy] = MappingProxyType(
    {
        rc.DONE: Policy.DONE,
        rc.DONE_PARTIAL: Policy.DONE,
        rc.PLACED: Policy.DONE,
        rc.REQUOTE: Policy.RETRY_FRESH_PRICE,
        rc.PRICE_CHANGED: Policy.RETRY_FRESH_PRICE,
        rc.PRICE_OFF: Policy.RETRY_FRESH_PRICE,
        rc.INVALID_PRICE: Policy.RETRY_FRESH_PRICE,
        rc.INVALID_VOLUME: Policy.CORRECT_ONCE,
        rc.INVALID_STOPS: Policy.CORRECT_ONCE,
        rc.INVALID_FILL: Policy.CORRECT_ONCE,
        rc.NO_MONEY: Policy.REFUSE_ALERT,
        rc.TRADE_DISABLED: Policy.REFUSE_ALERT,
        rc.LONG_ONLY: Policy.REFUSE_ALERT,
        rc.SHORT_ONLY: Policy.REFUSE_ALERT,
        rc.CLOSE_ONLY: Policy.REFUSE_ALERT,
        rc.LIMIT_VOLUME: Policy.REFUSE_ALERT,
        rc.LIMIT_POSITIONS: Policy.REFUSE_ALERT,
        rc.ONLY_REAL: Policy.REFUSE_ALERT,
        rc.FIFO_CLOSE: Policy.REFUSE_ALERT,
        rc.MARKET_CLOSED: Policy.WAIT_SESSION,
        rc.SERVER_DISABLES_AT: Policy.HALT_ALERT,
        rc.CLIENT_DISABLES_AT: Policy.HALT_ALERT,
        rc.CONNECTION: Policy.RECONNECT,
        rc.TIMEOUT: Policy.LOOKUP,
        rc.TOO_MANY_REQUESTS: Policy.WAIT_RETRY,
        rc.POSITION_CLOSED: Policy.RECONCILE,
        rc.REJECT: Policy.REJECT,
        rc.CANCEL: Policy.REJECT,
        rc.ERROR: Policy.REJECT,
        rc.INVALID: Policy.REJECT,
        rc.LOCKED: Policy.REJECT,
        rc.FROZEN: Policy.REJECT,
        rc.INVALID_ORDER: Policy.REJECT,
        rc.INVALID_CLOSE_VOLUME: Policy.REJECT,
        rc.NO_CHANGES: Policy.REJECT,
    }
)


# What a CORRECT_ONCE correction changes: an unchanged request is not resent.
CORRECTED_FIELDS: Mapping[int, tuple[str, ...]] = MappingProxyType(
    {
        rc.INVALID_VOLUME: ("volume",),
        rc.INVALID_FILL: ("type_filling",),
        rc.INVALID_STOPS: ("sl", "tp"),
    }
)


def policy_for(retcode: int) -> Policy:
    """The policy of a retcode; unknown codes are rejections (never retried)."""
    return RETCODE_POLICY.get(retcode, Policy.REJECT)


class MT5CallError(BrokerError):
    """A terminal call returned None with a non-IPC error."""

    def __init__(self, function: str, code: int, message: str) -> None:
        super().__init__(f"MetaTrader 5 {function}() failed: ({code}, {message!r})")
        self.function = function
        self.code = code
        self.message = message


class BrokerSetupError(OperationalError):
    """The adapter cannot start: missing package, unreachable bridge, no tradable symbol."""


EventSink = Callable[[str, str, str, Mapping[str, object] | None], object]
AsyncHook = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class MT5Config:
    """What the adapter needs from ``BrokerSettings`` (credentials included, never logged)."""

    kind: str = "mt5"
    host: str = "127.0.0.1"
    port: int = 18812
    terminal_path: str = ""
    magic: int = 234000
    deviation_points: int = 10
    server_timezone: str = "UTC"
    login: int | None = None
    password: str | None = None
    server: str | None = None
    price_retries: int = 3
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    reconnect_attempts: int | None = None  # None: keep trying (the daemon waits)
    market_closed_wait_s: float = 60.0
    busy_retries: int = 3
    lookup_window_s: float = 7 * 86400.0
    init_timeout_ms: int = 60_000
    # A terminal call that has not answered after this long (real seconds; initialize
    # gets init_timeout_ms on top) counts as a lost link: reconnect. None: no limit.
    call_timeout_s: float | None = 120.0
    # The server clock is judged only against ticks at most this old (a weekend's
    # last tick says nothing about the offset); re-checked as ticks arrive.
    fresh_tick_max_age_s: float = 300.0
    # How often (monotonic seconds) the feed's polls also read terminal_info():
    # connected (10031 / offline -> pause) and Algo Trading.
    terminal_check_s: float = 5.0


def load_terminal_module(config: MT5Config) -> Any:
    """The ``MetaTrader5`` module (kind "mt5") or an ``mt5linux`` client (kind "mt5linux").

    A bridge that cannot be reached raises ``ConnectionError``/``OSError`` (the
    caller retries with backoff: the Wine side may come up later); a missing
    package or an RPyC version mismatch is a set-up error.
    """
    if config.kind == "mt5":
        try:
            return importlib.import_module("MetaTrader5")
        except ImportError as exc:
            raise BrokerSetupError(
                "broker.kind = 'mt5' needs the MetaTrader5 package, which exists only for "
                "Windows: pip install MetaTrader5==5.0.6231 on the terminal's machine, or use "
                f"broker.kind = 'mt5linux' with the terminal under Wine ({exc})"
            ) from None
    if config.kind == "mt5linux":
        bridge = _import_bridge()
        try:
            return bridge.MetaTrader5(host=config.host, port=config.port)
        except ValueError as exc:
            raise BrokerSetupError(
                f"mt5linux bridge at {config.host}:{config.port} speaks another RPyC version "
                f"({exc}); install the same mt5linux version on both sides"
            ) from None
    raise BrokerSetupError(f"broker.kind = {config.kind!r} is not an MT5 kind")


def _import_bridge() -> Any:
    try:
        return importlib.import_module("mt5linux")
    except ImportError as exc:
        raise BrokerSetupError(
            "broker.kind = 'mt5linux' needs the mt5linux package: "
            f"pip install 'mt5linux>=0.2.4,<1.1' ({exc})"
        ) from None


BRIDGE_HINT = (
    "start the bridge: on Linux `python -m mt5linux <path to the Windows python.exe>` "
    "(it runs the RPyC server under Wine), or `wine python.exe -m rpyc.cli.rpyc_classic "
    "--host 127.0.0.1 -p PORT` in the Wine Python; or fix broker.host/broker.port"
)


def _close_bridge(client: Any) -> None:
    """Best effort: close a dead mt5linux client's RPyC connection (its attribute is private)."""
    for name in ("_MetaTrader5__conn", "_conn", "conn"):
        conn = getattr(client, name, None)
        close = getattr(conn, "close", None)
        if callable(close):
            try:
                close()
            except (*_BRIDGE_ERRORS, AttributeError, RuntimeError):
                log.debug("bridge_close_failed", attribute=name)
            return


# -- pure helpers (tested directly) -----------------------------------------------------


def _decimal(value: float) -> Decimal:
    return Decimal(repr(float(value)))


def normalise_volume(volume: float, step: float, vmin: float, vmax: float) -> float:
    """``volume`` rounded to the nearest multiple of ``step``, clamped to [vmin, vmax]."""
    if not math.isfinite(volume) or volume <= 0:
        raise ValueError(f"volume must be a positive number (got {volume})")
    dstep = _decimal(step)
    n = (_decimal(volume) / dstep).to_integral_value()
    lo = (_decimal(vmin) / dstep).to_integral_value(rounding=ROUND_CEILING)
    hi = (_decimal(vmax) / dstep).to_integral_value(rounding=ROUND_FLOOR)
    n = min(max(n, lo), hi)
    return float(n * dstep)


def round_price(
    price: float, digits: int, rounding: str | None = None, tick_size: float = 0.0
) -> float:
    """``price`` on the symbol's price grid: a multiple of ``tick_size`` (when set), ``digits``.

    MT5_API §4: prices are rounded to ``digits`` and to ``trade_tick_size`` (a
    symbol such as an index may have digits=2 but move in 0.25 steps).
    ``rounding`` is a ``decimal`` mode (None: to the nearest).
    """
    quantum = Decimal(1).scaleb(-digits)
    value = _decimal(price)
    mode = rounding or ROUND_HALF_EVEN
    if tick_size > 0:
        tick = _decimal(tick_size)
        if tick > quantum:
            value = (value / tick).to_integral_value(rounding=mode) * tick
    return float(value.quantize(quantum, rounding=mode))


class StopsError(ValueError):
    """An SL or TP already on the wrong side of the market."""


def adjust_stops(
    side: Side,
    bid: float,
    ask: float,
    sl: float | None,
    tp: float | None,
    min_distance: float,
    digits: int,
    tick_size: float = 0.0,
) -> tuple[float, float]:
    """SL/TP (0.0 = none) at least ``min_distance`` from the fresh tick, rounded outwards.

    The reference price is the one the position would close at: the bid for a
    buy, the ask for a sell (MT5_API §4). A level that is too close is moved
    out to the minimum; one already on the wrong side raises ``StopsError``.
    """
    ref = bid if side is Side.BUY else ask
    out_sl, out_tp = 0.0, 0.0
    if sl:
        if (sl - ref) * side.sign >= 0:
            raise StopsError(f"sl {sl} is not on the loss side of the price {ref}")
        if side is Side.BUY:
            out_sl = round_price(min(sl, ref - min_distance), digits, ROUND_FLOOR, tick_size)
        else:
            out_sl = round_price(max(sl, ref + min_distance), digits, ROUND_CEILING, tick_size)
    if tp:
        if (tp - ref) * side.sign <= 0:
            raise StopsError(f"tp {tp} is not on the profit side of the price {ref}")
        if side is Side.BUY:
            out_tp = round_price(max(tp, ref + min_distance), digits, ROUND_CEILING, tick_size)
        else:
            out_tp = round_price(min(tp, ref - min_distance), digits, ROUND_FLOOR, tick_size)
    return out_sl, out_tp


def filling_modes(filling_mask: int, execution_mode: int) -> list[int]:
    """ORDER_FILLING_* values allowed by the symbol, in the order to try them.

    ``filling_mode`` is a bitmask (FOK=1, IOC=2); RETURN is for exchange
    execution, or the fallback when the symbol names neither bit.
    """
    modes: list[int] = []
    if filling_mask & FILLING_MASK_FOK:
        modes.append(FILLING_FOK)
    if filling_mask & FILLING_MASK_IOC:
        modes.append(FILLING_IOC)
    if execution_mode == EXECUTION_EXCHANGE or not modes:
        modes.append(FILLING_RETURN)
    return modes


# A stored comment shorter than this is too short to name one order safely (base32
# ids: 4 characters leave about one chance in a million of a stranger's match).
MIN_ID_PREFIX = 4


def same_client_id(stored: str, client_order_id: str) -> bool:
    """A stored comment names our id, also when the server cut it (CONVENTIONS: Orders)."""
    if not stored or not client_order_id:
        return False
    if stored == client_order_id:
        return True
    return len(stored) >= MIN_ID_PREFIX and client_order_id.startswith(stored)


# How far past the reference instant a server time may convert (the server's clock
# may run a little ahead of ours) and still be read as the later of two occurrences.
DST_SLACK_S = 600


@lru_cache(maxsize=8192)
def _utc_occurrences(seconds: int, tz_name: str) -> tuple[int, int]:
    """UTC epoch seconds of one server wall time: (first, second) occurrence.

    They differ only in the hour repeated when the clocks go back.
    """
    naive = pd.Series(pd.to_datetime([int(seconds), int(seconds)], unit="s"))
    both = to_utc(naive, tz_name)  # a repeated value is read as the second occurrence
    return int(both.iloc[0].value // 10**9), int(both.iloc[1].value // 10**9)


def server_epoch_to_utc(seconds: int, tz_name: str, not_after: datetime | None = None) -> datetime:
    """One server wall-clock epoch value as a UTC datetime (market_data.timezones rules).

    In the hour repeated when the clocks go back, the wall time is the later
    occurrence when that one is at or before ``not_after`` (the reference: now,
    or the latest tick), else the earlier one: the events converted here (ticks,
    fills, bars just closed) happened before the reference and as late as possible.
    """
    first, second = _utc_occurrences(int(seconds), tz_name)
    chosen = first
    if second != first and not_after is not None and second <= not_after.timestamp() + DST_SLACK_S:
        chosen = second
    return datetime.fromtimestamp(chosen, tz=UTC)


def server_epochs_to_utc_ns(
    seconds: np.ndarray, tz_name: str, not_after: datetime | None = None
) -> np.ndarray:
    """Server wall epochs (oldest first) as UTC epoch nanoseconds, DST-aware.

    Each time of the repeated fall-back hour becomes the latest occurrence that
    stays strictly before the next row and at or before ``not_after``: the rows
    are in time order, so a wall clock that went back reads as the second hour.
    """
    values = np.asarray(seconds, dtype=np.int64)
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    unique, inverse = np.unique(values, return_inverse=True)
    naive = pd.Series(pd.to_datetime(np.concatenate([unique, unique]), unit="s"))
    both = to_utc(naive, tz_name).to_numpy("datetime64[ns]").astype(np.int64)
    first = both[: len(unique)][inverse]
    second = both[len(unique) :][inverse]
    ambiguous = first != second
    if not ambiguous.any():
        return first
    out = first.copy()
    bound = (
        int((not_after.timestamp() + DST_SLACK_S) * 10**9)
        if not_after is not None
        else int(np.iinfo(np.int64).max)
    )
    for i in range(len(out) - 1, -1, -1):
        if ambiguous[i] and second[i] <= bound:
            out[i] = second[i]
        bound = int(out[i]) - 1
    return out


def utc_to_server_epoch(moment: datetime, tz_name: str) -> int:
    return int(moment.timestamp() + server_offset(moment, tz_name).total_seconds())


def rates_to_bars(
    symbol: str,
    rates: np.ndarray,
    tz_name: str,
    *,
    closed_before_utc: datetime | None,
    tf_s: int,
) -> list[Bar]:
    """Closed bars (UTC) from a rates array; bars still open at ``closed_before_utc`` dropped.

    ``closed_before_utc`` (the latest tick, in UTC) is also the reference for
    the repeated fall-back hour (see ``server_epochs_to_utc_ns``).
    """
    if rates is None or len(rates) == 0:
        return []
    utc_ns = server_epochs_to_utc_ns(rates["time"], tz_name, closed_before_utc)
    keep = np.ones(len(rates), dtype=bool)
    if closed_before_utc is not None:
        limit_ns = int(closed_before_utc.timestamp()) * 10**9
        keep = utc_ns + tf_s * 10**9 <= limit_ns
    rows = rates[keep]
    times = utc_ns[keep]
    out: list[Bar] = []
    for i in range(len(rows)):
        moment = datetime.fromtimestamp(int(times[i]) // 10**9, tz=UTC)
        o, h, lo, c = (float(rows[k][i]) for k in ("open", "high", "low", "close"))
        if min(o, h, lo, c) <= 0 or h < max(o, c) or lo > min(o, c):
            log.warning("bar_rejected", symbol=symbol, time=str(moment), reason="inconsistent")
            continue
        out.append(
            Bar(
                symbol,
                moment,
                o,
                h,
                lo,
                c,
                int(rows["tick_volume"][i]),
                int(rows["spread"][i]),
                int(rows["real_volume"][i]),
            )
        )
    return out


def _plain(value: Any) -> Any:
    """Records -> dicts, tuples of records -> lists, arrays -> local numpy arrays."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.ndarray):
        return np.array(value, copy=True)
    asdict = getattr(value, "_asdict", None)
    if asdict is not None:
        return {k: _plain(v) for k, v in dict(asdict()).items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if hasattr(value, "dtype") and hasattr(value, "shape"):  # an array proxied by a bridge
        return np.array(value, copy=True)
    return value


_BRIDGE_ERRORS = (EOFError, ConnectionError, TimeoutError, OSError)

_Job = tuple[Callable[[], Any], "concurrent.futures.Future[Any]"]


class _TerminalThread:
    """The one thread that talks to the terminal: jobs run one at a time, in order.

    A daemon thread rather than a ``ThreadPoolExecutor``: a call that hangs is
    abandoned (``abandon``) and a new thread takes over, and a hung thread must
    neither block the event loop on ``close`` nor the interpreter at exit.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future

    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                future.set_exception(exc)

    def stop(self) -> None:
        """Finish the queued jobs, then end (without waiting for it)."""
        self._jobs.put(None)

    def abandon(self, value: Any) -> None:
        """Give up on a hung thread: queued jobs answer ``value``; it ends when it wakes."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None and job[1].set_running_or_notify_cancel():
                job[1].set_result(value)
        self._jobs.put(None)

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)


# -- the broker --------------------------------------------------------------------------


class MT5Broker:
    """``Broker`` over one MetaTrader 5 terminal (see the module docstring)."""

    def __init__(
        self,
        config: MT5Config,
        symbols: Sequence[str],
        *,
        clock: Clock,
        timeframe_s: int,
        module: Any | None = None,
        on_event: EventSink | None = None,
        module_factory: Callable[[], Any] | None = None,
    ) -> None:
        if timeframe_s not in TIMEFRAMES:
            raise BrokerSetupError(f"timeframe of {timeframe_s} s has no MT5 TIMEFRAME value")
        self.name = config.kind
        self._cfg = config
        self._symbols = list(symbols)
        self._clock = clock
        self._tf_s = timeframe_s
        self._timeframe = TIMEFRAMES[timeframe_s]
        self._module = module
        # mt5linux: the RPyC client is rebuilt (on the terminal thread) whenever the
        # link died; a dead client raises EOFError on every call forever.
        self._default_factory = module is None and module_factory is None
        if module_factory is None and module is None and config.kind == "mt5linux":
            module_factory = lambda: load_terminal_module(config)  # noqa: E731
        self._module_factory = module_factory
        self._bridge_dead = False
        self._thread: _TerminalThread | None = None
        self.call_timeouts = 0
        self._on_event = on_event
        self.on_connected: AsyncHook | None = None  # reconciliation, set by the daemon
        self.on_halt: Callable[[str | None], None] | None = None
        self._connected = False
        self._generation = 0
        self._reconnect_lock = asyncio.Lock()
        self.paused: str | None = None
        self.halts: dict[str, str] = {}
        self.unavailable: dict[str, str] = {}  # symbol -> why it cannot be traded at all
        self.restricted: dict[str, str] = {}  # symbol -> why it cannot open positions
        self._closed_until: dict[str, float] = {}
        self._selected: set[str] = set()
        self._specs: dict[str, SymbolSpec] = {}
        self._done: OrderedDict[str, OrderResult] = OrderedDict()
        self._ambiguous: set[str] = set()
        self._tracked: dict[int, Position] = {}
        self._coids: dict[int, str] = {}
        self._pending_deals: list[Deal] = []
        # client id -> position being closed (None: an entry) while _send runs; the
        # reconciliation leaves these to the send that owns them.
        self._inflight: dict[str, int | None] = {}
        self._attempted: set[str] = set()  # in flight and handed to order_send
        self._netting = False
        self._netting_refused: set[int] = set()
        self._tick_seen: dict[str, tuple[int, float]] = {}  # symbol -> (time_msc, monotonic)
        self._next_terminal_check = -math.inf
        self._offline = False
        self._server_algo_seen_off = False
        self.reconnects = 0

    @classmethod
    def from_settings(
        cls,
        broker: Any,
        symbols: Sequence[str],
        *,
        clock: Clock,
        timeframe_s: int,
        module: Any | None = None,
        on_event: EventSink | None = None,
        module_factory: Callable[[], Any] | None = None,
    ) -> MT5Broker:
        """Build from ``config.settings.BrokerSettings`` (credentials from the environment)."""
        config = MT5Config(
            kind=broker.kind,
            host=broker.host,
            port=broker.port,
            terminal_path=broker.terminal_path,
            magic=broker.magic,
            deviation_points=broker.deviation_points,
            server_timezone=broker.server_timezone,
            login=broker.login,
            password=broker.password.get_secret_value() if broker.password else None,
            server=broker.server.get_secret_value() if broker.server else None,
            backoff_max_s=getattr(broker, "reconnect_backoff_max_s", 60.0),
        )
        return cls(
            config,
            symbols,
            clock=clock,
            timeframe_s=timeframe_s,
            module=module,
            on_event=on_event,
            module_factory=module_factory,
        )

    # -- the terminal thread -----------------------------------------------------------

    def _call_timeout(self, function: str) -> float | None:
        limit = self._cfg.call_timeout_s
        if limit is None:
            return None
        if function == "initialize":
            return limit + self._cfg.init_timeout_ms / 1000.0
        return limit

    async def _on_thread(self, fn: Callable[[], Any], what: str, timeout_s: float | None) -> Any:
        """``fn()`` on the terminal thread; a call that hangs past ``timeout_s`` is abandoned.

        Returns ``(None, (-10005, ...))`` after a timeout: the IPC-timeout path
        (reconnect; an order is looked up, never resent).
        """
        if self._thread is None:
            self._thread = _TerminalThread("mt5")
        thread = self._thread
        future = thread.submit(fn)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except TimeoutError:
            lost = (None, (-10005, f"IPC timeout: {what} did not answer within {timeout_s:g} s"))
            if self._thread is thread:
                self._thread = None
                thread.abandon(lost)
                self.call_timeouts += 1
                self._bridge_dead = self._module_factory is not None
                self._event(
                    "error",
                    "broker_call_timeout",
                    f"MetaTrader 5 {what} hung for {timeout_s:g} s: abandoned, reconnecting",
                )
            return lost

    async def _raw(self, function: str, *args: Any, **kwargs: Any) -> tuple[Any, tuple[int, str]]:
        """One call on the terminal thread: (plain result, last_error())."""

        def job() -> tuple[Any, tuple[int, str]]:
            module: Any = self._module
            if module is None:  # the bridge is being rebuilt
                return None, (-10004, "No IPC connection")
            try:
                value = getattr(module, function)(*args, **kwargs)
                if value is None or value is False:
                    code, message = module.last_error()
                    return _plain(value), (int(code), str(message))
                return _plain(value), (1, "Success")
            except _BRIDGE_ERRORS as exc:
                # mt5linux raises where the package returns None: treat as a lost link.
                self._bridge_dead = self._module_factory is not None
                return None, (-10004, f"bridge: {type(exc).__name__}: {exc}")

        result: tuple[Any, tuple[int, str]] = await self._on_thread(
            job, f"{function}()", self._call_timeout(function)
        )
        return result

    async def _checked(
        self, function: str, *args: Any, **kwargs: Any
    ) -> tuple[Any, tuple[int, str]]:
        """Like ``_raw``, but a lost link is reconnected and the call made again."""
        while True:
            generation = self._generation
            value, error = await self._raw(function, *args, **kwargs)
            if (value is None or value is False) and error[0] in IPC_CODES:
                await self._reconnect(f"{function}(): {error}", generation)
                continue
            return value, error

    async def _read(self, function: str, *args: Any, **kwargs: Any) -> Any:
        """A read: retried after a reconnect when the link dropped (reads are idempotent)."""
        while True:
            generation = self._generation
            value, (code, message) = await self._raw(function, *args, **kwargs)
            if value is not None and value is not False:
                return value
            if code in IPC_CODES:
                await self._reconnect(f"{function}(): ({code}, {message})", generation)
                continue
            raise MT5CallError(function, code, message)

    def _event(
        self, level: str, kind: str, message: str, details: Mapping[str, object] | None = None
    ) -> None:
        getattr(log, "warning" if level == "critical" else level)(kind, message=message)
        if self._on_event is not None:
            self._on_event(level, kind, message, details)

    # -- lifecycle ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Initialize (retrying per policy), check symbols and the server clock, reconcile."""
        if self._connected:
            return
        if self._module is None and self._module_factory is None:
            self._module = load_terminal_module(self._cfg)
        elif self._module_factory is not None and self._default_factory:
            _import_bridge()  # a missing package is a set-up error, not worth retrying
        await self._connect_loop(first=True)
        await self._after_connect()
        if not self.tradable_symbols:
            raise BrokerSetupError(
                "no configured symbol can be traded: "
                + "; ".join(f"{s}: {why}" for s, why in self.unavailable.items())
            )

    async def close(self) -> None:
        """Shut the terminal link down without blocking the event loop (even if it hangs)."""
        thread = self._thread
        if thread is None:
            return
        module: Any = self._module

        def job() -> None:
            try:
                module.shutdown()
            except _BRIDGE_ERRORS as exc:
                log.info("broker_shutdown_failed", error=f"{type(exc).__name__}: {exc}")

        if module is not None:
            await self._on_thread(job, "shutdown()", min(5.0, self._cfg.call_timeout_s or 5.0))
        thread.stop()
        self._thread = None
        self._connected = False

    @property
    def tradable_symbols(self) -> list[str]:
        return [s for s in self._symbols if s not in self.unavailable]

    def _init_kwargs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args: tuple[Any, ...] = (self._cfg.terminal_path,) if self._cfg.terminal_path else ()
        kwargs: dict[str, Any] = {"timeout": self._cfg.init_timeout_ms}
        if self._cfg.login is not None:
            kwargs["login"] = int(self._cfg.login)
        if self._cfg.password is not None:
            kwargs["password"] = self._cfg.password
        if self._cfg.server is not None:
            kwargs["server"] = self._cfg.server
        return args, kwargs

    async def _build_bridge(self) -> tuple[int, str] | None:
        """A new mt5linux client, made on the terminal thread (the old one's link is dead)."""
        factory = self._module_factory
        if factory is None:
            return None
        old = self._module

        def job() -> tuple[Any, tuple[int, str] | None]:
            if old is not None:
                _close_bridge(old)
            try:
                return factory(), None
            except _BRIDGE_ERRORS as exc:
                return None, (
                    -10004,
                    f"bridge: mt5linux at {self._cfg.host}:{self._cfg.port} is not reachable "
                    f"({type(exc).__name__}: {exc})",
                )

        client, error = await self._on_thread(job, "the mt5linux connect", self._call_timeout(""))
        if error is not None or client is None:
            self._module = None
            return error or (-10005, "IPC timeout: the mt5linux connect did not answer")
        self._module = client
        self._bridge_dead = False
        return None

    async def _try_connect(self, restart: bool) -> tuple[int, str] | None:
        """One attempt: (re)build the bridge or shutdown, initialize, check the link."""
        if self._module_factory is not None and (self._module is None or self._bridge_dead):
            error = await self._build_bridge()
            if error is not None:
                return error
        elif restart:
            await self._raw("shutdown")
        args, kwargs = self._init_kwargs()
        ok, error = await self._raw("initialize", *args, **kwargs)
        if not ok:
            return error
        info, error = await self._raw("terminal_info")
        if info is None:
            return error
        if not info.get("connected"):
            return (rc.CONNECTION, "terminal is not connected to the trade server")
        return None

    async def _connect_loop(self, *, first: bool) -> None:
        delay = self._cfg.backoff_initial_s
        attempt = 0
        last_error: tuple[int, str] | None = None
        while True:
            error = await self._try_connect(restart=not first or attempt > 0)
            if error is None:
                break
            attempt += 1
            if error[1].startswith("bridge:"):
                message = f"MetaTrader 5 {error[1][8:]}: {BRIDGE_HINT}"
            else:
                hint = INIT_HINTS.get(error[0], "")
                message = f"MetaTrader 5 initialize failed: ({error[0]}, {error[1]!r})" + (
                    f": {hint}" if hint else ""
                )
            message += f"; retry {attempt} in {delay:g} s"
            if error != last_error:
                self._event("error", "broker_connect_failed", message, {"code": error[0]})
                last_error = error
            else:
                log.warning("broker_connect_failed", message=message)
            if self._cfg.reconnect_attempts is not None and attempt >= self._cfg.reconnect_attempts:
                raise TemporaryBrokerError(message)
            await self._clock.sleep(delay)
            delay = min(self._cfg.backoff_max_s, delay * 2)
        self._connected = True
        self._generation += 1
        self._selected.clear()
        # Journaled on every connect: `status` shows the link's state from these events.
        self._event(
            "info",
            "broker_connected",
            "MetaTrader 5 connected" + (f" after {attempt} retries" if attempt else ""),
        )

    async def _reconnect(self, reason: str, generation: int) -> None:
        """Shutdown + initialize with backoff, then checks and reconciliation (once per drop)."""
        async with self._reconnect_lock:
            if self._generation != generation:
                return  # another caller already reconnected
            self.paused = f"broker disconnected: {reason}"
            self._connected = False
            self.reconnects += 1
            self._event("warning", "broker_disconnected", f"MetaTrader 5 link lost: {reason}")
            await self._connect_loop(first=False)
            self.paused = None
        # Outside the lock: a drop during the checks or the reconciliation reconnects again.
        await self._after_connect()

    async def _wait_online(self, reason: str) -> None:
        """Terminal up but offline (10031, connected False): pause, poll with backoff, reconcile."""
        if self._offline:
            return  # another caller is already waiting for the terminal
        self._offline = True
        self.paused = f"terminal offline: {reason}"
        self._event("warning", "broker_offline", f"MetaTrader 5 terminal offline: {reason}")
        delay = self._cfg.backoff_initial_s
        started = self._clock.monotonic()
        try:
            while True:
                info = await self._read("terminal_info")
                if info.get("connected"):
                    break
                await self._clock.sleep(delay)
                delay = min(self._cfg.backoff_max_s, delay * 2)
        finally:
            self._offline = False
        self.paused = None
        self._event(
            "info",
            "broker_online",
            f"MetaTrader 5 terminal connected again after "
            f"{self._clock.monotonic() - started:g} s; reconciling",
        )
        await self._after_connect()

    async def _watch_terminal(self) -> None:
        """Every ``terminal_check_s``: terminal_info() (offline -> pause), Algo Trading, 10026."""
        now = self._clock.monotonic()
        if now < self._next_terminal_check or self._offline:
            return
        self._next_terminal_check = now + self._cfg.terminal_check_s
        info = await self._read("terminal_info")
        self._apply_algo(info)
        if "server_algo" in self.halts:
            await self._check_server_algo()
        if not info.get("connected", True):
            await self._wait_online("terminal_info().connected is False")

    async def _after_connect(self) -> None:
        await self._check_symbols()
        await self._check_account()
        await self.check_server_clock()
        self._apply_algo(await self._read("terminal_info"))
        if self.on_connected is not None:
            await self.on_connected()

    async def _check_account(self) -> None:
        info = await self._read("account_info")
        netting = int(info.get("margin_mode", ACCOUNT_MARGIN_MODE_HEDGING)) != (
            ACCOUNT_MARGIN_MODE_HEDGING
        )
        if netting and not self._netting:
            self._event(
                "info",
                "broker_netting_account",
                "netting account: one position per symbol; an entry on a symbol that already "
                "has a position is not sent (it would merge into that position)",
            )
        self._netting = netting

    async def _check_symbols(self) -> None:
        for symbol in self._symbols:
            selected, error = await self._checked("symbol_select", symbol, True)
            if not selected:
                why = (
                    f"unknown to the broker ({error[0]}, {error[1]!r}); check the name and its "
                    "broker suffix (e.g. EURUSD.a) in the terminal's Market Watch"
                )
                if self.unavailable.get(symbol) != why:
                    self._event("error", "symbol_unavailable", f"{symbol}: {why}")
                self.unavailable[symbol] = why
                continue
            self._selected.add(symbol)
            self.unavailable.pop(symbol, None)
            info = await self._read("symbol_info", symbol)
            self._specs[symbol] = self._spec_from(symbol, info)
            mode = int(info.get("trade_mode", TRADE_MODE_FULL))
            if mode != TRADE_MODE_FULL:
                why = (
                    f"trade_mode is {TRADE_MODE_NAMES.get(mode, mode)}: the broker does not allow "
                    "opening positions both ways; no entries on it (its bars are not traded "
                    "while no position of ours is open there)"
                )
                if self.restricted.get(symbol) != why:
                    self._event("error", "symbol_restricted", f"{symbol}: {why}")
                self.restricted[symbol] = why
            elif self.restricted.pop(symbol, None) is not None:
                self._event("info", "symbol_tradable", f"{symbol}: trade_mode is FULL again")

    async def check_server_clock(self) -> str | None:
        """Judge ``server_timezone`` against the latest ticks (start-up and reconnects).

        Between connects ``closed_bars`` keeps judging each new tick, so a halt
        lifts as soon as fresh ticks agree (see ``_observe_tick``).
        """
        for symbol in self.tradable_symbols:
            tick = await self._read("symbol_info_tick", symbol)
            self._observe_tick(symbol, tick)
        return self.halts.get("clock")

    def _observe_tick(self, symbol: str, tick: Mapping[str, Any]) -> None:
        """Refuse to trade while a fresh tick and ``server_timezone`` differ by an hour or more.

        Only a fresh tick says anything about the offset (the last tick of a
        weekend is days old): a tick that changed since our previous look, made
        at most ``fresh_tick_max_age_s`` ago; or, at the first look, one at most
        3 hours off (the usual misconfiguration: 'UTC' for a UTC+2/+3 server).
        And it must be within that age of a whole number of hours from now: a
        zone error is whole hours. Stale or odd ticks change nothing.
        """
        seconds = int(tick["time"])
        time_msc = int(tick.get("time_msc") or seconds * 1000)
        mono = self._clock.monotonic()
        previous = self._tick_seen.get(symbol)
        self._tick_seen[symbol] = (time_msc, mono)
        now = self._clock.now()
        tick_utc = server_epoch_to_utc(seconds, self._cfg.server_timezone, now)
        diff_s = (tick_utc - now).total_seconds()
        hours = round(diff_s / 3600)
        max_age = self._cfg.fresh_tick_max_age_s
        if previous is not None:
            if previous[0] == time_msc:
                return  # nothing new
            fresh = mono - previous[1] <= max_age
        else:
            fresh = abs(hours) <= 3
        # A zone error is whole hours; a tick minutes off a whole hour is no evidence.
        if not fresh or abs(diff_s - hours * 3600) > max_age:
            return
        if hours == 0:
            self._set_halt("clock", None, f"the latest {symbol} tick agrees with the clock")
            return
        configured = server_offset(now, self._cfg.server_timezone).total_seconds() / 3600
        seen = configured + hours
        reason = (
            f"broker.server_timezone = {self._cfg.server_timezone!r} (UTC{configured:+g} "
            f"now) does not match the server: fresh {symbol} ticks convert to "
            f"{hours:+d} h from now; the server looks like UTC{seen:+g}: fix "
            "broker.server_timezone (e.g. 'NY+7' or an IANA zone). No trading until they agree"
        )
        self._set_halt("clock", reason)

    def _apply_algo(self, info: Mapping[str, Any]) -> None:
        """The terminal's Algo Trading button (10027 and terminal_info().trade_allowed)."""
        if info.get("trade_allowed", True):
            self._set_halt("algo", None, "terminal_info().trade_allowed is True")
        elif "algo" not in self.halts:
            self._set_halt(
                "algo",
                "Algo Trading is off in the terminal (terminal_info().trade_allowed is False): "
                "press the Algo Trading button",
            )

    async def _check_server_algo(self) -> None:
        """10026 lifts only on evidence: account_info().trade_expert back on after being off."""
        info = await self._read("account_info")
        if not info.get("trade_expert", True):
            self._server_algo_seen_off = True
        elif self._server_algo_seen_off:
            self._set_halt(
                "server_algo", None, "the server allows autotrading again (account trade_expert)"
            )

    def _set_halt(self, key: str, reason: str | None, cleared: str = "condition cleared") -> None:
        before = self.halt_reason
        if reason is None:
            if self.halts.pop(key, None) is not None:
                if key == "server_algo":
                    self._server_algo_seen_off = False
                self._event("info", "trading_resumed", f"{key}: {cleared}", {"cause": key})
        elif self.halts.get(key) != reason:
            self.halts[key] = reason
            self._event("critical", "trading_halted", reason, {"cause": key})
        after = self.halt_reason
        if after != before and self.on_halt is not None:
            self.on_halt(after)

    @property
    def connected(self) -> bool:
        """Connected to the terminal and the terminal to the trade server (health, alerts)."""
        return self._connected and self.paused is None

    @property
    def halt_reason(self) -> str | None:
        return "; ".join(self.halts[k] for k in sorted(self.halts)) or None

    def entry_block(self, symbol: str) -> str | None:
        """Why a new position on ``symbol`` must not be opened now, or None."""
        if self.halt_reason:
            return self.halt_reason
        if symbol in self.unavailable:
            return f"{symbol}: {self.unavailable[symbol]}"
        if symbol in self.restricted:
            return f"{symbol}: {self.restricted[symbol]}"
        until = self._closed_until.get(symbol)
        if until is not None and self._clock.monotonic() < until:
            return f"{symbol}: market closed, waiting for the session"
        return None

    # -- conversions ---------------------------------------------------------------------

    def _utc(self, server_seconds: int) -> datetime:
        """Server wall time -> UTC; the repeated fall-back hour read as at or before now."""
        return server_epoch_to_utc(
            int(server_seconds), self._cfg.server_timezone, self._clock.now()
        )

    def utc_now(self) -> datetime:
        """Now on the injected clock (the reference for the repeated fall-back hour)."""
        return self._clock.now()

    def _server(self, moment: datetime) -> int:
        return utc_to_server_epoch(moment, self._cfg.server_timezone)

    @staticmethod
    def _spec_from(symbol: str, info: Mapping[str, Any]) -> SymbolSpec:
        return SymbolSpec(
            symbol=symbol,
            contract_size=float(info["trade_contract_size"]),
            point=float(info["point"]),
            digits=int(info["digits"]),
            volume_min=float(info["volume_min"]),
            volume_step=float(info["volume_step"]),
            volume_max=float(info["volume_max"]),
            stops_level_points=int(info["trade_stops_level"]),
            profit_currency=str(info["currency_profit"]),
            base_currency=str(info["currency_base"]),
        )

    def _position(self, raw: Mapping[str, Any]) -> Position:
        ticket = int(raw["ticket"])
        coid = self._coids.get(ticket) or str(raw["comment"])
        return Position(
            position_id=ticket,
            symbol=str(raw["symbol"]),
            side=Side.BUY if int(raw["type"]) == ORDER_TYPE_BUY else Side.SELL,
            volume=float(raw["volume"]),
            open_price=float(raw["price_open"]),
            open_time=self._utc(int(raw["time"])),
            sl=float(raw["sl"]) or None,
            tp=float(raw["tp"]) or None,
            client_order_id=coid,
            swap=float(raw["swap"]),
            profit=float(raw["profit"]),
        )

    # -- queries -----------------------------------------------------------------------

    async def account(self) -> AccountInfo:
        info = await self._read("account_info")
        return AccountInfo(
            balance=float(info["balance"]),
            equity=float(info["equity"]),
            margin=float(info["margin"]),
            free_margin=float(info["margin_free"]),
            leverage=int(info["leverage"]),
            currency=str(info["currency"]),
        )

    async def symbol_spec(self, symbol: str) -> SymbolSpec:
        spec = self._specs.get(symbol)
        if spec is None:
            if symbol in self.unavailable:
                raise OperationalError(f"{symbol}: {self.unavailable[symbol]}")
            await self._select(symbol)
            spec = self._specs[symbol] = self._spec_from(
                symbol, await self._read("symbol_info", symbol)
            )
        return spec

    async def _select(self, symbol: str) -> None:
        if symbol in self._selected:
            return
        await self._read("symbol_select", symbol, True)
        self._selected.add(symbol)

    async def _raw_positions(self, symbol: str | None = None) -> list[dict[str, Any]]:
        found = await (
            self._read("positions_get", symbol=symbol) if symbol else self._read("positions_get")
        )
        return [p for p in found if int(p["magic"]) == self._cfg.magic]

    async def positions(self, symbol: str | None = None) -> list[Position]:
        """Open positions carrying our magic number (others are not ours)."""
        return [self._position(p) for p in await self._raw_positions(symbol)]

    async def history_deals(self, since: datetime, until: datetime) -> list[Deal]:
        """Closing deals of our positions with ``since <= time < until`` (UTC)."""
        raw = await self._read(
            "history_deals_get", self._server(since) - 1, self._server(until) + 1
        )
        ours = {int(d["position_id"]) for d in raw if int(d["magic"]) == self._cfg.magic}
        out = []
        for d in raw:
            if int(d["entry"]) == DEAL_ENTRY_IN or int(d["position_id"]) not in ours:
                continue
            deal = self._deal_value(d, self._coids.get(int(d["position_id"]), ""))
            if since <= deal.time < until:
                out.append(deal)
        return out

    def _deal_value(self, d: Mapping[str, Any], coid: str) -> Deal:
        reason = int(d["reason"])
        if reason == DEAL_REASON_SL:
            why = CloseReason.SL
        elif reason == DEAL_REASON_TP:
            why = CloseReason.TP
        elif int(d["magic"]) == self._cfg.magic:
            why = CloseReason.CLIENT
        else:
            why = CloseReason.EXTERNAL
        # A closing deal is opposite the position it closes.
        side = Side.SELL if int(d["type"]) == ORDER_TYPE_BUY else Side.BUY
        return Deal(
            deal_id=int(d["ticket"]),
            position_id=int(d["position_id"]),
            symbol=str(d["symbol"]),
            side=side,
            volume=float(d["volume"]),
            price=float(d["price"]),
            time=self._utc(int(d["time"])),
            profit=float(d["profit"]),
            commission=float(d["commission"]),
            swap=float(d["swap"]),
            reason=why,
            client_order_id=coid,
        )

    async def position_close_deals(self, position_id: int) -> list[Deal]:
        """The closing deals of one position, from history (oldest first)."""
        raw = await self._read("history_deals_get", position=int(position_id))
        coid = self._coids.get(position_id, "")
        if not coid:
            coid = next((str(d["comment"]) for d in raw if int(d["entry"]) == DEAL_ENTRY_IN), "")
        return [
            self._deal_value(d, coid)
            for d in sorted(raw, key=lambda d: (int(d["time_msc"]), int(d["ticket"])))
            if int(d["entry"]) in (DEAL_ENTRY_OUT, DEAL_ENTRY_OUT_BY, DEAL_ENTRY_INOUT)
        ]

    async def closed_position_deal(self, position_id: int) -> Deal | None:
        """One ``Deal`` summing every closing deal of a position that is fully closed."""
        deals = await self.position_close_deals(position_id)
        if not deals:
            return None
        volume = sum(d.volume for d in deals)
        price = sum(d.price * d.volume for d in deals) / volume if volume else deals[-1].price
        last = deals[-1]
        return Deal(
            deal_id=last.deal_id,
            position_id=position_id,
            symbol=last.symbol,
            side=last.side,
            volume=round(volume, 8),
            price=round(price, 10),
            time=last.time,
            profit=round(sum(d.profit for d in deals), 2),
            commission=round(sum(d.commission for d in deals), 2),
            swap=round(sum(d.swap for d in deals), 2),
            reason=last.reason,
            client_order_id=last.client_order_id,
        )

    async def drain_closed_deals(self) -> list[Deal]:
        """Positions that closed by themselves (SL/TP, manual, stop-out) since the last call."""
        await self._watch_terminal()
        current = {int(p["ticket"]): p for p in await self._raw_positions()}
        out, self._pending_deals = self._pending_deals, []
        for pid in sorted(set(self._tracked) - set(current)):
            deal = await self.closed_position_deal(pid)
            if deal is None:
                log.warning("closed_position_without_history", position_id=pid)
                continue  # history not synchronised yet: try again next time
            self._tracked.pop(pid, None)
            out.append(deal)
        for pid, raw in current.items():
            if pid not in self._tracked:
                self._tracked[pid] = self._position(raw)
        return out

    def forget(self, position_id: int) -> None:
        """Stop watching a position (the journal already has its close)."""
        self._tracked.pop(position_id, None)

    async def position_open_deal(self, position_id: int) -> dict[str, Any] | None:
        raw = await self._read("history_deals_get", position=int(position_id))
        return next((d for d in raw if int(d["entry"]) == DEAL_ENTRY_IN), None)

    def track(self, position: Position) -> None:
        """Watch a position for closes (the daemon registers the ones it restored)."""
        self._tracked[position.position_id] = position
        if position.client_order_id:
            self._coids[position.position_id] = position.client_order_id

    # -- bars --------------------------------------------------------------------------

    async def closed_bars(self, symbol: str, count: int) -> list[Bar]:
        """The latest ``count`` closed bars (UTC, oldest first): ``ClosedBarSource``.

        Each poll also watches the terminal (throttled) and judges the server
        clock against the new tick. A close-only (restricted) symbol gives no
        bars while we hold no position on it: no signal, so no entry is tried.
        """
        if symbol in self.unavailable:
            return []
        await self._watch_terminal()
        if symbol in self.restricted and all(p.symbol != symbol for p in self._tracked.values()):
            return []
        await self._select(symbol)
        rates = await self._read("copy_rates_from_pos", symbol, self._timeframe, 0, count + 1)
        tick = await self._read("symbol_info_tick", symbol)
        self._observe_tick(symbol, tick)
        tick_utc = self._utc(int(tick["time"]))
        bars = rates_to_bars(
            symbol,
            rates,
            self._cfg.server_timezone,
            closed_before_utc=tick_utc,
            tf_s=self._tf_s,
        )
        return bars[-count:]

    async def rates_from(self, symbol: str, server_epoch: int, count: int) -> np.ndarray:
        """``copy_rates_from``: up to ``count`` bars opening at or before ``server_epoch``."""
        await self._select(symbol)
        value, (code, message) = await self._checked(
            "copy_rates_from", symbol, self._timeframe, int(server_epoch), int(count)
        )
        if value is None:
            raise MT5CallError("copy_rates_from", code, message)
        return np.asarray(value)

    async def maxbars(self) -> int:
        info = await self._read("terminal_info")
        return int(info["maxbars"])

    async def server_now(self, symbol: str) -> int:
        await self._select(symbol)
        tick = await self._read("symbol_info_tick", symbol)
        self._observe_tick(symbol, tick)
        return int(tick["time"])

    @property
    def timeframe_s(self) -> int:
        return self._tf_s

    @property
    def server_timezone(self) -> str:
        return self._cfg.server_timezone

    # -- orders ------------------------------------------------------------------------

    def _reject(self, request: OrderRequest, retcode: int, comment: str) -> OrderResult:
        return OrderResult(
            retcode=retcode,
            client_order_id=request.client_order_id,
            request=request,
            comment=comment,
        )

    async def market_order(self, request: OrderRequest) -> OrderResult:
        if request.position_id is not None:
            found = await self._raw_position(request.position_id)
            if found is None:
                return self._reject(request, rc.POSITION_CLOSED, "position not open")
            return await self._send(request, position=found)
        block = self.entry_block(request.symbol)
        if block is not None:
            code = rc.MARKET_CLOSED if "market closed" in block else rc.TRADE_DISABLED
            if "server_algo" in self.halts:
                code = rc.SERVER_DISABLES_AT
            if "algo" in self.halts:
                code = rc.CLIENT_DISABLES_AT
            return self._reject(request, code, f"not sent: {block}")
        if self._netting:
            held = await self._read("positions_get", symbol=request.symbol)
            if held:
                ticket = int(held[0]["ticket"])
                why = (
                    f"{request.symbol}: netting account and position {ticket} is open on it; "
                    "a new deal would merge into it, so the entry is not sent"
                )
                if ticket not in self._netting_refused:
                    self._netting_refused.add(ticket)
                    self._event("warning", "entry_refused_netting", why, {"position_id": ticket})
                return self._reject(request, rc.LIMIT_POSITIONS, f"not sent: {why}")
        return await self._send(request, position=None)

    async def close_position(
        self, position: Position, client_order_id: str, volume: float | None = None
    ) -> OrderResult:
        request = OrderRequest.closing(position, client_order_id, volume)
        found = await self._raw_position(position.position_id)
        if found is None:
            return self._reject(request, rc.POSITION_CLOSED, "position not open")
        return await self._send(request, position=found)

    async def _raw_position(self, position_id: int) -> dict[str, Any] | None:
        found = await self._read("positions_get", ticket=int(position_id))
        return found[0] if found else None

    def _build(
        self,
        request: OrderRequest,
        info: Mapping[str, Any],
        tick: Mapping[str, Any],
        position: Mapping[str, Any] | None,
        filling: int,
        extra_distance_points: int,
    ) -> dict[str, Any]:
        digits = int(info["digits"])
        point = float(info["point"])
        tick_size = float(info.get("trade_tick_size") or 0.0)
        volume = normalise_volume(
            request.volume,
            float(info["volume_step"]),
            float(info["volume_min"]),
            float(info["volume_max"]),
        )
        bid, ask = float(tick["bid"]), float(tick["ask"])
        price = ask if request.side is Side.BUY else bid
        out: dict[str, Any] = {
            "action": ACTION_DEAL,
            "symbol": request.symbol,
            "volume": volume,
            "type": ORDER_TYPE_BUY if request.side is Side.BUY else ORDER_TYPE_SELL,
            "price": round_price(price, digits, tick_size=tick_size),
            "deviation": int(self._cfg.deviation_points),
            "magic": int(self._cfg.magic),
            "comment": request.client_order_id,
            "type_time": ORDER_TIME_GTC,
            "type_filling": filling,
        }
        if position is not None:
            out["position"] = int(position["ticket"])
            out["volume"] = min(volume, float(position["volume"]))
        else:
            distance = (int(info["trade_stops_level"]) + extra_distance_points) * point
            sl, tp = adjust_stops(
                request.side, bid, ask, request.sl, request.tp, distance, digits, tick_size
            )
            out["sl"], out["tp"] = sl, tp
        return out

    @property
    def entries_in_flight(self) -> frozenset[str]:
        """Client ids of entries being sent now (reconciliation leaves their positions alone)."""
        return frozenset(c for c, pid in self._inflight.items() if pid is None)

    @property
    def closes_in_flight(self) -> frozenset[int]:
        """Positions a close is being sent for now."""
        return frozenset(pid for pid in self._inflight.values() if pid is not None)

    async def _send(self, request: OrderRequest, *, position: dict[str, Any] | None) -> OrderResult:
        """Build, send and apply the retcode policy; never sends one client id twice.

        While it runs the id is "in flight" (a reconnect's reconciliation must
        not adopt or close what this send will report). Whatever is raised after
        ``order_send`` was called leaves the id ambiguous: looked up, never resent.
        """
        coid = request.client_order_id
        if coid in self._done:
            return self._done[coid]
        if coid in self._inflight:
            return self._reject(request, rc.ERROR, "already being sent; not sent twice")
        self._inflight[coid] = request.position_id
        try:
            return await self._send_owned(request, position)
        except BaseException:
            if coid in self._attempted and coid not in self._done:
                self._ambiguous.add(coid)
            raise
        finally:
            self._inflight.pop(coid, None)
            self._attempted.discard(coid)

    async def _send_owned(
        self, request: OrderRequest, position: dict[str, Any] | None
    ) -> OrderResult:
        coid = request.client_order_id
        if coid in self._ambiguous:
            found = await self._lookup(request, position)
            if found is not None:
                return found
            return self._reject(request, rc.ERROR, "earlier result unknown; not resent")
        symbol = request.symbol
        await self._select(symbol)
        price_tries = busy_tries = 0
        corrected: set[int] = set()
        correcting: tuple[int, dict[str, Any]] | None = None
        fill_index = 0
        extra_points = 0
        while True:
            info = await self._read("symbol_info", symbol)
            tick = await self._read("symbol_info_tick", symbol)
            modes = filling_modes(int(info["filling_mode"]), int(info["trade_exemode"]))
            try:
                payload = self._build(
                    request, info, tick, position, modes[min(fill_index, len(modes) - 1)],
                    extra_points,
                )  # fmt: skip
            except StopsError as exc:
                return self._reject(request, rc.INVALID_STOPS, f"not sent: {exc}")
            if correcting is not None:
                code, before = correcting
                correcting = None
                if all(payload.get(k) == before.get(k) for k in CORRECTED_FIELDS[code]):
                    # Re-read and re-rounded, the request would be the same: give up.
                    self._event(
                        "warning",
                        "order_not_corrected",
                        f"{symbol} {coid}: {rc.name(code)} and nothing to correct "
                        f"({', '.join(f'{k}={payload.get(k)}' for k in CORRECTED_FIELDS[code])}"
                        "); not resent",
                    )
                    return self._reject(request, code, f"{rc.name(code)}: not resent unchanged")
            generation = self._generation
            self._attempted.add(coid)
            value, (code, message) = await self._raw("order_send", payload)
            if value is None:
                if code in IPC_CODES:
                    self._ambiguous.add(coid)
                    self._event(
                        "warning",
                        "order_result_lost",
                        f"{symbol} {coid}: order_send returned None ({code}, {message}); "
                        "looking it up before anything is resent",
                    )
                    await self._reconnect(f"order_send(): ({code}, {message})", generation)
                    found = await self._lookup(request, position)
                    if found is not None:
                        return found
                    return self._reject(
                        request, rc.ERROR, f"result lost ({code}); not found by id; not resent"
                    )
                self._event(
                    "error",
                    "order_invalid",
                    f"{symbol} {coid}: order_send refused the request: ({code}, {message!r})",
                    {"request": {k: v for k, v in payload.items() if k != "comment"}},
                )
                return self._reject(request, rc.INVALID, f"({code}, {message})")
            retcode = int(value["retcode"])
            policy = policy_for(retcode)
            comment = str(value.get("comment", ""))
            if policy is Policy.DONE:
                return await self._filled(request, value, payload)
            if policy is Policy.RETRY_FRESH_PRICE and price_tries < self._cfg.price_retries:
                price_tries += 1
                log.info(
                    "order_retry_fresh_price", symbol=symbol, retcode=retcode, attempt=price_tries
                )
                continue
            if policy is Policy.CORRECT_ONCE and retcode not in corrected:
                corrected.add(retcode)
                correcting = (retcode, payload)
                if retcode == rc.INVALID_FILL:
                    fill_index += 1
                elif retcode == rc.INVALID_STOPS:
                    extra_points += max(1, int(info["trade_stops_level"]) // 10)
                log.info("order_corrected", symbol=symbol, retcode=retcode)
                continue
            if policy is Policy.WAIT_RETRY and busy_tries < self._cfg.busy_retries:
                busy_tries += 1
                await self._clock.sleep(self._cfg.backoff_initial_s * 2**busy_tries)
                continue
            result = self._reject(request, retcode, comment)
            await self._apply_terminal_policy(policy, request, result, position)
            if policy is Policy.LOOKUP:
                found = await self._lookup(request, position)
                if found is not None:
                    return found
            return result

    async def _apply_terminal_policy(
        self,
        policy: Policy,
        request: OrderRequest,
        result: OrderResult,
        position: Mapping[str, Any] | None,
    ) -> None:
        name = rc.name(result.retcode)
        what = f"{request.symbol} {request.side.value} {request.volume} ({request.client_order_id})"
        if policy is Policy.REFUSE_ALERT:
            self._event("error", "order_refused", f"{what}: {name} ({result.comment}); not retried")
        elif policy is Policy.WAIT_SESSION:
            self._closed_until[request.symbol] = (
                self._clock.monotonic() + self._cfg.market_closed_wait_s
            )
            self._event(
                "warning", "market_closed", f"{what}: market closed; waiting for the session"
            )
        elif policy is Policy.HALT_ALERT and result.retcode == rc.SERVER_DISABLES_AT:
            # Sticky: the terminal's own flag says nothing about the server's.
            self._set_halt(
                "server_algo",
                f"autotrading is disabled by the server ({name}): ask the broker to enable "
                "algorithmic trading for the account; lifted when an order goes through or "
                "account_info().trade_expert comes back on",
            )
            await self._check_server_algo()
        elif policy is Policy.HALT_ALERT:
            self._set_halt(
                "algo",
                f"autotrading is disabled by the terminal ({name}): press Algo Trading in the "
                "terminal",
            )
        elif policy is Policy.RECONNECT:
            await self._wait_online(f"{name} on {what}")
        elif policy is Policy.LOOKUP:
            self._ambiguous.add(request.client_order_id)
            self._event("warning", "order_ambiguous", f"{what}: {name}; looking it up by id")
        elif policy is Policy.RECONCILE:
            self._event("warning", "position_already_closed", f"{what}: {name}; reconciling")
            # Nothing of this send is pending any more: the reconciliation closes the
            # trade from the deal history (who closed it, at what price).
            self._inflight.pop(request.client_order_id, None)
            if self.on_connected is not None:
                await self.on_connected()

    async def _filled(
        self, request: OrderRequest, value: Mapping[str, Any], payload: Mapping[str, Any]
    ) -> OrderResult:
        retcode = int(value["retcode"])
        order = int(value["order"])
        if "server_algo" in self.halts:
            self._set_halt("server_algo", None, f"order {order} went through")
        try:
            deals = await self._read("history_deals_get", ticket=order) if order else []
        except BrokerError as exc:
            # Filled for sure: remember it from the result itself rather than lose it.
            log.warning("fill_deal_unread", order=order, error=str(exc))
            deals = []
        deal = next((d for d in deals if int(d["ticket"]) == int(value["deal"])), None)
        if deal is None and deals:
            deal = deals[-1]
        result = self._result_from(request, retcode, value, deal)
        if retcode == rc.DONE_PARTIAL:
            self._event(
                "warning",
                "order_partial_fill",
                f"{request.symbol} {request.client_order_id}: filled {result.volume} of "
                f"{payload['volume']} lots; the rest is not resent",
            )
        self._remember(result)
        return result

    def _result_from(
        self,
        request: OrderRequest,
        retcode: int,
        value: Mapping[str, Any] | None,
        deal: Mapping[str, Any] | None,
    ) -> OrderResult:
        position_id = None
        if deal is not None:
            position_id = int(deal["position_id"])
        elif value is not None:
            position_id = int(value["order"]) or None
        if request.position_id is not None:
            position_id = request.position_id
        price = float(deal["price"]) if deal else float((value or {}).get("price") or 0) or None
        volume = float(deal["volume"]) if deal else float((value or {}).get("volume") or 0.0)
        return OrderResult(
            retcode=retcode,
            client_order_id=request.client_order_id,
            request=request,
            position_id=position_id,
            deal_id=int(deal["ticket"]) if deal else (int((value or {}).get("deal") or 0) or None),
            price=price,
            volume=volume,
            time=self._utc(int(deal["time"])) if deal else self._clock.now(),
            commission=float(deal["commission"]) if deal else 0.0,
            profit=float(deal["profit"]) if deal else 0.0,
            swap=float(deal["swap"]) if deal else 0.0,
            comment=str((value or {}).get("comment", "found by client id")),
        )

    def _remember(self, result: OrderResult) -> None:
        coid = result.client_order_id
        self._done[coid] = result
        while len(self._done) > 10_000:
            self._done.popitem(last=False)
        self._ambiguous.discard(coid)
        pid = result.position_id
        if pid is None:
            return
        if result.request.position_id is None:
            self._coids[pid] = coid
            self._tracked[pid] = Position(
                position_id=pid,
                symbol=result.request.symbol,
                side=result.request.side,
                volume=result.volume,
                open_price=float(result.price or 0.0),
                open_time=result.time or self._clock.now(),
                sl=result.request.sl,
                tp=result.request.tp,
                client_order_id=coid,
                commission=result.commission,
            )
        else:
            # Our own close: answered by its result, not reported again by drain.
            self._tracked.pop(pid, None)

    async def _lookup(
        self, request: OrderRequest, position: Mapping[str, Any] | None
    ) -> OrderResult | None:
        """Find an order by its client id: our deals in recent history, then positions."""
        coid = request.client_order_id
        now = self._clock.now()
        since = now - timedelta(seconds=self._cfg.lookup_window_s)
        deals = await self._read(
            "history_deals_get", self._server(since), self._server(now) + 86400
        )
        wanted = (DEAL_ENTRY_IN,) if request.position_id is None else (
            DEAL_ENTRY_OUT, DEAL_ENTRY_INOUT, DEAL_ENTRY_OUT_BY,
        )  # fmt: skip
        for d in deals:
            if (
                int(d["magic"]) == self._cfg.magic
                and str(d["symbol"]) == request.symbol
                and int(d["entry"]) in wanted
                and same_client_id(str(d["comment"]), coid)
            ):
                result = self._result_from(request, rc.DONE, None, d)
                log.warning("order_found_by_client_id", client_order_id=coid, deal=d["ticket"])
                self._event(
                    "info",
                    "order_found_by_id",
                    f"{request.symbol} {coid}: the order was filled (deal {d['ticket']}); "
                    "journaled from history, not resent",
                )
                self._remember(result)
                return result
        if request.position_id is None:
            for p in await self._raw_positions(request.symbol):
                if same_client_id(str(p["comment"]), coid):
                    result = OrderResult(
                        retcode=rc.DONE,
                        client_order_id=coid,
                        request=request,
                        position_id=int(p["ticket"]),
                        price=float(p["price_open"]),
                        volume=float(p["volume"]),
                        time=self._utc(int(p["time"])),
                        comment="found by client id",
                    )
                    self._remember(result)
                    return result
        self._ambiguous.discard(coid)
        self._done[coid] = self._reject(request, rc.ERROR, "result lost; not found; not resent")
        return None

    async def modify_position(
        self, position: Position, sl: float | None, tp: float | None
    ) -> OrderResult:
        """New SL/TP with ``TRADE_ACTION_SLTP``, kept clear of the stops and freeze levels."""
        request = OrderRequest.modifying(position, sl, tp)
        if await self._raw_position(position.position_id) is None:
            return self._reject(request, rc.POSITION_CLOSED, "position not open")
        await self._select(position.symbol)
        extra = 0
        for _attempt in range(2):
            info = await self._read("symbol_info", position.symbol)
            tick = await self._read("symbol_info_tick", position.symbol)
            level = max(int(info["trade_stops_level"]), int(info["trade_freeze_level"])) + extra
            try:
                new_sl, new_tp = adjust_stops(
                    position.side, float(tick["bid"]), float(tick["ask"]), sl, tp,
                    level * float(info["point"]), int(info["digits"]),
                    float(info.get("trade_tick_size") or 0.0),
                )  # fmt: skip
            except StopsError as exc:
                return self._reject(request, rc.INVALID_STOPS, f"not sent: {exc}")
            payload = {
                "action": ACTION_SLTP,
                "symbol": position.symbol,
                "position": int(position.position_id),
                "sl": new_sl,
                "tp": new_tp,
                "magic": int(self._cfg.magic),
            }
            generation = self._generation
            value, (code, message) = await self._raw("order_send", payload)
            if value is None:
                if code in IPC_CODES:
                    # Setting the same levels twice is harmless: reconnect and send again.
                    await self._reconnect(f"order_send(SLTP): ({code}, {message})", generation)
                    continue
                return self._reject(request, rc.INVALID, f"({code}, {message})")
            retcode = int(value["retcode"])
            if retcode == rc.INVALID_STOPS and extra == 0:
                extra = max(1, int(info["trade_stops_level"]) // 10)
                continue
            return OrderResult(
                retcode=retcode,
                client_order_id=request.client_order_id,
                request=request,
                position_id=position.position_id,
                price=float(tick["bid"] if position.side is Side.BUY else tick["ask"]),
                volume=position.volume,
                time=self._clock.now(),
                comment=str(value.get("comment", "")),
            )
        return self._reject(request, rc.INVALID_STOPS, "stops refused twice")


# -- reconciliation with the journal ------------------------------------------------------


@dataclass
class ReconcileReport:
    kept: list[str]  # client order ids still open at the broker
    closed: list[str]  # closed in the journal from the broker's deal history
    adopted: list[str]  # open at the broker with our magic, unknown to the journal
    missing: list[str]  # open in the journal, unknown to the broker and its history
    # left to an order being sent right now (its own result journals it)
    in_flight: list[str] = field(default_factory=list)


async def reconcile_with_journal(broker: MT5Broker, journal: Journal) -> ReconcileReport:
    """Make the journal agree with the terminal (start-up and after every reconnect).

    - a journal trade whose position is still open is tracked for SL/TP closes;
    - one whose position closed while we were away is closed from
      ``history_deals_get`` (price, profit, commission, swap, reason);
    - a position with our magic that the journal lacks (a fill whose journal
      write was lost in a crash) is adopted as an open trade;
    - a trade the terminal has never heard of is reported, not guessed;
    - an order still being sent (a reconnect in the middle of its send or its
      look-up) is left to that send: its position is not adopted, its close not
      journaled from history (the send reports it, with the right reason).
    """
    report = ReconcileReport([], [], [], [])
    open_trades = await journal.run(fetch_open_trades)
    live = {p.position_id: p for p in await broker.positions()}
    entries = broker.entries_in_flight
    closing = broker.closes_in_flight
    matched: set[int] = set()
    for trade in open_trades:
        pid = trade.broker_position_id
        pos = live.get(int(pid)) if pid is not None else None
        if pos is None:
            pos = next(
                (
                    p
                    for p in live.values()
                    if same_client_id(p.client_order_id, trade.client_order_id)
                ),
                None,
            )
        if pos is not None:
            matched.add(pos.position_id)
            broker.track(_with_client_id(pos, trade.client_order_id))
            report.kept.append(trade.client_order_id)
            continue
        if pid is not None and int(pid) in closing:
            report.in_flight.append(trade.client_order_id)
            continue
        deal = await broker.closed_position_deal(int(pid)) if pid is not None else None
        if deal is None:
            report.missing.append(trade.client_order_id)
            journal.record_event(
                "error",
                "position_unknown_to_broker",
                f"{trade.symbol} {trade.client_order_id}: open in the journal, but position "
                f"{pid} is neither open nor in the deal history; check the account by hand",
                {"position_id": pid},
            )
            continue
        await journal.close_trade(
            TradeClose(
                client_order_id=trade.client_order_id,
                close_time=deal.time,
                close_price=deal.price,
                close_reason=deal.reason.value,
                profit=deal.profit,
                commission=deal.commission,
                swap=deal.swap,
                bars_held=int((deal.time - trade.open_time).total_seconds() // broker.timeframe_s),
            )
        )
        broker.forget(int(pid))  # type: ignore[arg-type]
        report.closed.append(trade.client_order_id)
    for pid, pos in sorted(live.items()):
        if pid in matched:
            continue
        if any(same_client_id(pos.client_order_id, coid) for coid in entries):
            report.in_flight.append(pos.client_order_id)
            continue
        coid = pos.client_order_id if pos.client_order_id.isalnum() else f"MT5{pid}"[:16]
        opening = await broker.position_open_deal(pid)
        await journal.open_trade(
            TradeOpen(
                client_order_id=coid,
                symbol=pos.symbol,
                side=pos.side.value,
                volume=pos.volume,
                open_time=pos.open_time,
                open_price=pos.open_price,
                sl=pos.sl,
                tp=pos.tp,
                broker_position_id=pid,
                commission=float(opening["commission"]) if opening else 0.0,
                confidence=None,
                model_set="adopted",
                mode="live",
            )
        )
        broker.track(_with_client_id(pos, coid))
        report.adopted.append(coid)
        journal.record_event(
            "warning",
            "position_adopted",
            f"{pos.symbol} position {pid} ({coid}) carries our magic but was not in the "
            "journal; journaled as an open trade",
            {"position_id": pid},
        )
    if report.closed or report.adopted or report.missing:
        log.warning(
            "reconciled",
            kept=len(report.kept),
            closed=report.closed,
            adopted=report.adopted,
            missing=report.missing,
        )
    return report


def _with_client_id(pos: Position, client_order_id: str) -> Position:
    return Position(
        position_id=pos.position_id,
        symbol=pos.symbol,
        side=pos.side,
        volume=pos.volume,
        open_price=pos.open_price,
        open_time=pos.open_time,
        sl=pos.sl,
        tp=pos.tp,
        client_order_id=client_order_id,
        commission=pos.commission,
        swap=pos.swap,
        profit=pos.profit,
    )
