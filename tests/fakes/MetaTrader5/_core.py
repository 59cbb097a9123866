"""The simulated terminal behind the fake ``MetaTrader5`` functions.

Module-level functions have the real names and signatures and never raise:
they return None (False for the bool functions) and set ``last_error()``.
Behind them one ``FakeTerminal`` (``terminal``) holds a seeded random-walk
market per symbol (M1 bars generated on demand, higher timeframes aggregated
in server time), an account with positions, pending orders, history orders
and deals (hedging or netting), SL/TP hits as time advances, and injectable
faults. Times written into bars, ticks, positions and deals are the server's
wall clock as epoch seconds (``server_timezone``), as the real terminal does.

Configure it from a test with ``terminal.reset({...})`` or, for a daemon
started as a subprocess, with the JSON in ``MT5FAKE_CONFIG``; ``MT5FAKE_DUMP``
names a JSON file the deal history is written to at every ``shutdown()`` and
at exit (so a test can compare it with the journal).

Time moves only when told: ``terminal.advance(seconds)``, or in step mode
(``step_s`` > 0) by ``step_s`` at every ``copy_rates_from_pos`` call on the
first symbol, which lets a daemon on the wall clock see a new bar per poll.
"""

# mypy: ignore-errors
from __future__ import annotations

import atexit
import copy
import fnmatch
import json
import math
import os
import random
import threading
import time as _time
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from MetaTrader5 import (
    ACCOUNT_MARGIN_MODE_RETAIL_HEDGING,
    ACCOUNT_MARGIN_MODE_RETAIL_NETTING,
    DEAL_ENTRY_IN,
    DEAL_ENTRY_INOUT,
    DEAL_ENTRY_OUT,
    DEAL_ENTRY_OUT_BY,
    DEAL_REASON_EXPERT,
    DEAL_REASON_SL,
    DEAL_REASON_TP,
    ORDER_FILLING_FOK,
    ORDER_FILLING_IOC,
    ORDER_FILLING_RETURN,
    ORDER_STATE_CANCELED,
    ORDER_STATE_FILLED,
    ORDER_STATE_PLACED,
    ORDER_TYPE_BUY,
    ORDER_TYPE_CLOSE_BY,
    ORDER_TYPE_SELL,
    ORDER_TYPE_SELL_STOP_LIMIT,
    SYMBOL_TRADE_EXECUTION_EXCHANGE,
    SYMBOL_TRADE_EXECUTION_INSTANT,
    SYMBOL_TRADE_EXECUTION_MARKET,
    SYMBOL_TRADE_EXECUTION_REQUEST,
    SYMBOL_TRADE_MODE_CLOSEONLY,
    SYMBOL_TRADE_MODE_DISABLED,
    SYMBOL_TRADE_MODE_FULL,
    SYMBOL_TRADE_MODE_LONGONLY,
    SYMBOL_TRADE_MODE_SHORTONLY,
    TRADE_ACTION_CLOSE_BY,
    TRADE_ACTION_DEAL,
    TRADE_ACTION_MODIFY,
    TRADE_ACTION_PENDING,
    TRADE_ACTION_REMOVE,
    TRADE_ACTION_SLTP,
)

__all__ = [
    "AccountInfo",
    "BookInfo",
    "OrderCheckResult",
    "OrderSendResult",
    "SymbolInfo",
    "TerminalInfo",
    "Tick",
    "TradeDeal",
    "TradeOrder",
    "TradePosition",
    "TradeRequest",
    "account_info",
    "copy_rates_from",
    "copy_rates_from_pos",
    "copy_rates_range",
    "copy_ticks_from",
    "copy_ticks_range",
    "history_deals_get",
    "history_deals_total",
    "history_orders_get",
    "history_orders_total",
    "initialize",
    "last_error",
    "login",
    "market_book_add",
    "market_book_get",
    "market_book_release",
    "order_calc_margin",
    "order_calc_profit",
    "order_check",
    "order_send",
    "orders_get",
    "orders_total",
    "positions_get",
    "positions_total",
    "shutdown",
    "symbol_info",
    "symbol_info_tick",
    "symbol_select",
    "symbols_get",
    "symbols_total",
    "terminal_info",
    "version",
]

# -- records: tuples with attribute access, indexing and _asdict(), nothing more --------


def _record(name: str, fields: tuple[str, ...]) -> type:
    def __new__(cls, *values):
        if len(values) != len(fields):
            raise TypeError(f"{name} takes {len(fields)} values ({len(values)} given)")
        return tuple.__new__(cls, values)

    def _asdict(self):
        return dict(zip(fields, self, strict=True))

    def __repr__(self):
        inner = ", ".join(f"{f}={v!r}" for f, v in zip(fields, self, strict=True))
        return f"{name}({inner})"

    namespace: dict[str, Any] = {
        "__slots__": (),
        "__new__": __new__,
        "_asdict": _asdict,
        "__repr__": __repr__,
    }
    for index, field in enumerate(fields):
        namespace[field] = property(lambda self, i=index: tuple.__getitem__(self, i))
    return type(name, (tuple,), namespace)


def _make(cls: type, fields: tuple[str, ...], values: dict[str, Any]) -> Any:
    return cls(*(values.get(f, _default(f)) for f in fields))


def _default(field: str) -> Any:
    if field in _STR_FIELDS:
        return ""
    if field in _FLOAT_FIELDS:
        return 0.0
    return 0


_ACCOUNT_FIELDS = [
    "login",
    "trade_mode",
    "leverage",
    "limit_orders",
    "margin_so_mode",
    "trade_allowed",
    "trade_expert",
    "margin_mode",
    "currency_digits",
    "fifo_close",
    "balance",
    "credit",
    "profit",
    "equity",
    "margin",
    "margin_free",
    "margin_level",
    "margin_so_call",
    "margin_so_so",
    "margin_initial",
    "margin_maintenance",
    "assets",
    "liabilities",
    "commission_blocked",
    "name",
    "server",
    "currency",
    "company",
]
_TERMINAL_FIELDS = [
    "community_account",
    "community_connection",
    "connected",
    "dlls_allowed",
    "trade_allowed",
    "tradeapi_disabled",
    "email_enabled",
    "ftp_enabled",
    "notifications_enabled",
    "mqid",
    "build",
    "maxbars",
    "codepage",
    "ping_last",
    "community_balance",
    "retransmission",
    "company",
    "name",
    "language",
    "path",
    "data_path",
    "commondata_path",
]
_SYMBOL_FIELDS = [
    "custom",
    "chart_mode",
    "select",
    "visible",
    "session_deals",
    "session_buy_orders",
    "session_sell_orders",
    "volume",
    "volumehigh",
    "volumelow",
    "time",
    "digits",
    "spread",
    "spread_float",
    "ticks_bookdepth",
    "trade_calc_mode",
    "trade_mode",
    "start_time",
    "expiration_time",
    "trade_stops_level",
    "trade_freeze_level",
    "trade_exemode",
    "swap_mode",
    "swap_rollover3days",
    "margin_hedged_use_leg",
    "expiration_mode",
    "filling_mode",
    "order_mode",
    "order_gtc_mode",
    "option_mode",
    "option_right",
    "bid",
    "bidhigh",
    "bidlow",
    "ask",
    "askhigh",
    "asklow",
    "last",
    "lasthigh",
    "lastlow",
    "volume_real",
    "volumehigh_real",
    "volumelow_real",
    "option_strike",
    "point",
    "trade_tick_value",
    "trade_tick_value_profit",
    "trade_tick_value_loss",
    "trade_tick_size",
    "trade_contract_size",
    "trade_accrued_interest",
    "trade_face_value",
    "trade_liquidity_rate",
    "volume_min",
    "volume_max",
    "volume_step",
    "volume_limit",
    "swap_long",
    "swap_short",
    "margin_initial",
    "margin_maintenance",
    "session_volume",
    "session_turnover",
    "session_interest",
    "session_buy_orders_volume",
    "session_sell_orders_volume",
    "session_open",
    "session_close",
    "session_aw",
    "session_price_settlement",
    "session_price_limit_min",
    "session_price_limit_max",
    "margin_hedged",
    "price_change",
    "price_volatility",
    "price_theoretical",
    "price_greeks_delta",
    "price_greeks_theta",
    "price_greeks_gamma",
    "price_greeks_vega",
    "price_greeks_rho",
    "price_greeks_omega",
    "price_sensitivity",
    "basis",
    "category",
    "currency_base",
    "currency_profit",
    "currency_margin",
    "bank",
    "description",
    "exchange",
    "formula",
    "isin",
    "name",
    "page",
    "path",
]
_TICK_FIELDS = ["time", "bid", "ask", "last", "volume", "time_msc", "flags", "volume_real"]
_BOOK_FIELDS = ["type", "price", "volume", "volume_dbl"]
_POSITION_FIELDS = [
    "ticket",
    "time",
    "time_msc",
    "time_update",
    "time_update_msc",
    "type",
    "magic",
    "identifier",
    "reason",
    "volume",
    "price_open",
    "sl",
    "tp",
    "price_current",
    "swap",
    "profit",
    "symbol",
    "comment",
    "external_id",
]
_ORDER_FIELDS = [
    "ticket",
    "time_setup",
    "time_setup_msc",
    "time_done",
    "time_done_msc",
    "time_expiration",
    "type",
    "type_time",
    "type_filling",
    "state",
    "magic",
    "position_id",
    "position_by_id",
    "reason",
    "volume_initial",
    "volume_current",
    "price_open",
    "sl",
    "tp",
    "price_current",
    "price_stoplimit",
    "symbol",
    "comment",
    "external_id",
]
_DEAL_FIELDS = [
    "ticket",
    "order",
    "time",
    "time_msc",
    "type",
    "entry",
    "magic",
    "position_id",
    "reason",
    "volume",
    "price",
    "commission",
    "swap",
    "profit",
    "fee",
    "symbol",
    "comment",
    "external_id",
]
_REQUEST_FIELDS = [
    "action",
    "magic",
    "order",
    "symbol",
    "volume",
    "price",
    "stoplimit",
    "sl",
    "tp",
    "deviation",
    "type",
    "type_filling",
    "type_time",
    "expiration",
    "comment",
    "position",
    "position_by",
]
_SEND_FIELDS = [
    "retcode",
    "deal",
    "order",
    "volume",
    "price",
    "bid",
    "ask",
    "comment",
    "request_id",
    "retcode_external",
    "request",
]
_CHECK_FIELDS = [
    "retcode",
    "balance",
    "equity",
    "profit",
    "margin",
    "margin_free",
    "margin_level",
    "comment",
    "request",
]

_STR_FIELDS = {
    "name",
    "server",
    "currency",
    "company",
    "language",
    "path",
    "data_path",
    "commondata_path",
    "basis",
    "category",
    "currency_base",
    "currency_profit",
    "currency_margin",
    "bank",
    "description",
    "exchange",
    "formula",
    "isin",
    "page",
    "symbol",
    "comment",
    "external_id",
}
_INT_REQUEST = {
    "action",
    "magic",
    "order",
    "deviation",
    "type",
    "type_filling",
    "type_time",
    "expiration",
    "position",
    "position_by",
}
_FLOAT_REQUEST = {"volume", "price", "stoplimit", "sl", "tp"}
_FLOAT_FIELDS = _FLOAT_REQUEST | {
    "balance",
    "credit",
    "profit",
    "equity",
    "margin",
    "margin_free",
    "margin_level",
    "margin_so_call",
    "margin_so_so",
    "margin_initial",
    "margin_maintenance",
    "assets",
    "liabilities",
    "commission_blocked",
    "community_balance",
    "retransmission",
    "bid",
    "ask",
    "last",
    "volume_real",
    "point",
    "trade_tick_value",
    "trade_tick_size",
    "trade_contract_size",
    "volume_min",
    "volume_max",
    "volume_step",
    "volume_limit",
    "price_open",
    "price_current",
    "swap",
    "commission",
    "fee",
    "price",
    "volume_initial",
    "volume_current",
    "price_stoplimit",
    "volume_dbl",
}

AccountInfo = _record("AccountInfo", tuple(_ACCOUNT_FIELDS))
TerminalInfo = _record("TerminalInfo", tuple(_TERMINAL_FIELDS))
SymbolInfo = _record("SymbolInfo", tuple(_SYMBOL_FIELDS))
Tick = _record("Tick", tuple(_TICK_FIELDS))
BookInfo = _record("BookInfo", tuple(_BOOK_FIELDS))
TradePosition = _record("TradePosition", tuple(_POSITION_FIELDS))
TradeOrder = _record("TradeOrder", tuple(_ORDER_FIELDS))
TradeDeal = _record("TradeDeal", tuple(_DEAL_FIELDS))
TradeRequest = _record("TradeRequest", tuple(_REQUEST_FIELDS))
OrderSendResult = _record("OrderSendResult", tuple(_SEND_FIELDS))
OrderCheckResult = _record("OrderCheckResult", tuple(_CHECK_FIELDS))

RATES_DTYPE = np.dtype(
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
TICKS_DTYPE = np.dtype(
    [
        ("time", "<i8"),
        ("bid", "<f8"),
        ("ask", "<f8"),
        ("last", "<f8"),
        ("volume", "<u8"),
        ("time_msc", "<i8"),
        ("flags", "<u4"),
        ("volume_real", "<f8"),
    ]
)

MESSAGES: dict[int, str] = {
    1: "Success",
    -1: "Terminal: Call failed",
    -2: "Terminal: Invalid params",
    -3: "Terminal: Out of memory",
    -4: "Terminal: Not found",
    -5: "Terminal: Incompatible versions, please install the latest version of Terminal "
    "and Python module",
    -6: "Terminal: Authorization failed",
    -7: "Terminal: Unsupported function",
    -8: "Auto-Trading using Python API disabled in Terminal",
    -10000: "IPC call failed",
    -10001: "IPC send failed",
    -10002: "IPC recv failed",
    -10003: "IPC initialize failed, MetaTrader 5 x64 not found",
    -10004: "No IPC connection",
    -10005: "IPC timeout",
}
IPC_CODES = (-10001, -10002, -10004, -10005)

RETCODE_COMMENTS: dict[int, str] = {
    10004: "Requote",
    10006: "Request rejected",
    10008: "Order placed",
    10009: "Request executed",
    10010: "Request executed partially",
    10011: "Request processing error",
    10012: "Request canceled by timeout",
    10013: "Invalid request",
    10014: "Invalid volume",
    10015: "Invalid price",
    10016: "Invalid stops",
    10017: "Trade disabled",
    10018: "Market closed",
    10019: "No money",
    10020: "Prices changed",
    10021: "No prices",
    10024: "Too many requests",
    10025: "No changes",
    10026: "AutoTrading disabled by server",
    10027: "AutoTrading disabled by client",
    10029: "Order or position frozen",
    10030: "Unsupported filling mode",
    10031: "No connection",
    10035: "Invalid order type",
    10036: "Position already closed",
    10038: "Invalid close volume",
    10042: "Long positions only",
    10043: "Short positions only",
    10044: "Close only",
}

_TIMEFRAMES_S: dict[int, int] = {m: m * 60 for m in (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30)}
_TIMEFRAMES_S.update({h | 0x4000: h * 3600 for h in (1, 2, 3, 4, 6, 8, 12, 24)})

DEFAULT_SYMBOLS: dict[str, dict[str, Any]] = {
    "EURUSD": {
        "digits": 5,
        "point": 1e-5,
        "contract_size": 100_000.0,
        "base_price": 1.10,
        "sigma": 0.00015,
        "spread": 10,
        "currency_base": "EUR",
        "currency_profit": "USD",
    },
    "GBPUSD": {
        "digits": 5,
        "point": 1e-5,
        "contract_size": 100_000.0,
        "base_price": 1.27,
        "sigma": 0.00018,
        "spread": 14,
        "currency_base": "GBP",
        "currency_profit": "USD",
    },
    "XAUUSD": {
        "digits": 2,
        "point": 0.01,
        "contract_size": 100.0,
        "base_price": 2050.0,
        "sigma": 0.0003,
        "spread": 25,
        "currency_base": "XAU",
        "currency_profit": "USD",
    },
}
SYMBOL_DEFAULTS: dict[str, Any] = {
    "volume_min": 0.01,
    "volume_step": 0.01,
    "volume_max": 100.0,
    "volume_limit": 0.0,
    "stops_level": 0,
    "freeze_level": 0,
    "filling_mode": 1 | 2,
    "exemode": SYMBOL_TRADE_EXECUTION_MARKET,
    "trade_mode": SYMBOL_TRADE_MODE_FULL,
    "market_open": True,
    "return_allowed": False,  # RETURN filling on market orders (exchange execution always)
    "slippage_points": 0,
}
ACCOUNT_DEFAULTS: dict[str, Any] = {
    "login": 5550123,
    "password": "",
    "server": "FakeBroker-Demo",
    "balance": 10_000.0,
    "leverage": 100,
    "currency": "USD",
    "margin_mode": ACCOUNT_MARGIN_MODE_RETAIL_HEDGING,
    "commission_per_lot": 0.0,
}
FAULT_DEFAULTS: dict[str, Any] = {
    "send_retcodes": [],  # next order_send results, nothing executed (10004, 10006, ...)
    "executed_retcodes": [],  # next sends execute, then answer this retcode (10012)
    "lost_results": 0,  # next sends execute, then return None with (-10005, 'IPC timeout')
    "lost_requests": 0,  # next sends never arrive: None with (-10005, 'IPC timeout')
    "disconnect_after": None,  # calls until the IPC link drops
    "disconnect_code": -10004,
    "init_failures": [],  # codes the next initialize() calls fail with
    "partial_fills": 0,  # next IOC/RETURN fills take this fraction of the volume
    "partial_fraction": 0.5,
    "random": None,  # {"seed", "requote", "lost_result", "lost_request", "timeout_executed",
    #                   "disconnect_per_call", "reject"}: seeded probabilities
}


class _Fail(Exception):
    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.message = message or MESSAGES.get(code, "Terminal: Call failed")


def _invalid(field: str) -> _Fail:
    return _Fail(-2, f'Invalid "{field}" argument')


class _Series:
    """One symbol's M1 bid bars on a UTC minute grid, generated block by block."""

    BLOCK = 20_000

    def __init__(self, start_utc: int, digits: int, base: float, sigma: float, seed: int) -> None:
        self.start = start_utc
        self.digits = digits
        self.sigma = sigma
        self.seed = seed
        self.open = np.zeros(0)
        self.high = np.zeros(0)
        self.low = np.zeros(0)
        self.close = np.zeros(0)
        self.volume = np.zeros(0, dtype=np.uint64)
        self._last = base

    def ensure(self, minutes: int) -> None:
        while len(self.open) < minutes:
            rng = np.random.default_rng([self.seed, len(self.open) // self.BLOCK])
            n = self.BLOCK
            steps = rng.normal(0.0, self.sigma, n)
            closes = self._last * np.exp(np.cumsum(steps))
            opens = np.concatenate(([self._last], closes[:-1]))
            wick = np.abs(rng.normal(0.0, self.sigma * 0.6, (2, n))) * opens
            factor = 10.0**self.digits
            o = np.round(opens * factor) / factor
            c = np.round(closes * factor) / factor
            h = np.round((np.maximum(opens, closes) + wick[0]) * factor) / factor
            lo = np.round((np.minimum(opens, closes) - wick[1]) * factor) / factor
            h = np.maximum(h, np.maximum(o, c))
            lo = np.minimum(lo, np.minimum(o, c))
            self.open = np.concatenate((self.open, o))
            self.high = np.concatenate((self.high, h))
            self.low = np.concatenate((self.low, lo))
            self.close = np.concatenate((self.close, c))
            vol = rng.integers(20, 400, n).astype(np.uint64)
            self.volume = np.concatenate((self.volume, vol))
            self._last = float(c[-1])


class FakeTerminal:
    """State of the simulated terminal, server and market (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    # -- configuration -------------------------------------------------------------------

    def reset(self, config: dict[str, Any] | None = None) -> None:
        cfg = copy.deepcopy(config or {})
        self.config = cfg
        start = cfg.get("start", "2024-03-04T10:00:00Z")
        if start == "now":
            now = int(_time.time())
            self.utc_now = float(now - now % 60)
        else:
            parsed = datetime.fromisoformat(start.replace("Z", "+00:00"))
            self.utc_now = parsed.timestamp()
        self.server_timezone = cfg.get("server_timezone", "UTC")
        self._zone = None if self.server_timezone == "UTC" else ZoneInfo(self.server_timezone)
        self.maxbars = int(cfg.get("maxbars", 100_000))
        history = int(cfg.get("history_minutes", 30_000))
        self.history_start = int(self.utc_now) - history * 60
        self.step_s = float(cfg.get("step_s", 0.0))
        self.comment_max = int(cfg.get("comment_max", 31))
        self.stored_comment_max = int(cfg.get("stored_comment_max", 31))
        self.require_select = bool(cfg.get("require_select", True))
        self.terminal_path = cfg.get("terminal_path", "")
        self.seed = int(cfg.get("seed", 1))
        account = {**ACCOUNT_DEFAULTS, **cfg.get("account", {})}
        if account.get("margin_mode") == "netting":
            account["margin_mode"] = ACCOUNT_MARGIN_MODE_RETAIL_NETTING
        elif account.get("margin_mode") == "hedging":
            account["margin_mode"] = ACCOUNT_MARGIN_MODE_RETAIL_HEDGING
        self.account = account
        self.balance = float(account["balance"])
        symbols_cfg = cfg.get("symbols", {name: {} for name in DEFAULT_SYMBOLS})
        self.symbols: dict[str, dict[str, Any]] = {}
        self.series: dict[str, _Series] = {}
        for index, (name, overrides) in enumerate(sorted(symbols_cfg.items())):
            base = {**SYMBOL_DEFAULTS, **DEFAULT_SYMBOLS.get(name, DEFAULT_SYMBOLS["EURUSD"])}
            spec = {**base, **overrides, "name": name}
            spec.setdefault("currency_margin", spec["currency_base"])
            self.symbols[name] = spec
            self.series[name] = _Series(
                self.history_start,
                spec["digits"],
                spec["base_price"],
                spec["sigma"],
                self.seed * 1000 + index,
            )
        self.step_symbol = cfg.get("step_symbol") or (min(self.symbols) if self.symbols else "")
        self.faults = {**copy.deepcopy(FAULT_DEFAULTS), **cfg.get("faults", {})}
        random_cfg = self.faults.get("random") or {}
        self._rng = random.Random(random_cfg.get("seed", 0))
        self.connected = bool(cfg.get("connected", True))
        self.algo_trading = bool(cfg.get("algo_trading", True))
        self.server_algo_trading = bool(cfg.get("server_algo_trading", True))
        self.initialized = False
        self.ipc_ok = True
        self.error: tuple[int, str] = (1, "Success")
        self.selected: set[str] = set()
        self.positions: dict[int, dict[str, Any]] = {}
        self.orders: dict[int, dict[str, Any]] = {}
        self.history_orders: list[dict[str, Any]] = []
        self.deals: list[dict[str, Any]] = []
        self._next_order = 50_000_001
        self._next_deal = 30_000_001
        self._request_id = 1
        self.calls: dict[str, int] = {}
        self.sent_requests: list[dict[str, Any]] = []
        self.concurrent_calls = 0
        self.threads: set[int] = set()  # every thread that ever called into the package
        self.init_calls = 0
        self.dump_path = cfg.get("dump_path") or os.environ.get("MT5FAKE_DUMP") or None

    # -- time ----------------------------------------------------------------------------

    def offset_s(self, utc: float) -> int:
        if self._zone is None:
            return 0
        offset = datetime.fromtimestamp(utc, UTC).astimezone(self._zone).utcoffset()
        return int(offset.total_seconds()) if offset else 0

    def offsets_s(self, utc: np.ndarray) -> np.ndarray:
        """The server's offset at each UTC time (zones change offset on whole hours)."""
        if self._zone is None:
            return np.zeros(len(utc), dtype=np.int64)
        hours, inverse = np.unique(np.asarray(utc, dtype=np.int64) // 3600, return_inverse=True)
        per_hour = np.array([self.offset_s(float(h) * 3600) for h in hours], dtype=np.int64)
        return per_hour[inverse]

    def server_now(self) -> int:
        return int(self.utc_now) + self.offset_s(self.utc_now)

    def to_server(self, utc: float) -> int:
        return int(utc) + self.offset_s(utc)

    def from_server(self, server: float) -> float:
        """Server wall epoch -> UTC epoch (the offset at that wall time, first occurrence)."""
        guess = server - self.offset_s(server)
        return server - self.offset_s(guess)

    def from_server_latest(self, server: int) -> int:
        """Server wall epoch -> UTC: in the repeated autumn hour, the latest one not after now."""
        offsets = {self.offset_s(server + d) for d in (-86400, 0, 86400)}
        valid = sorted(server - o for o in offsets if self.to_server(server - o) == server)
        if not valid:
            return int(self.from_server(server))  # a wall time skipped in spring
        past = [u for u in valid if u <= self.utc_now]
        return past[-1] if past else valid[0]

    def advance(self, seconds: float) -> None:
        """Move the market on: minutes that complete settle SL/TP hits."""
        before = self._minute(self.utc_now)
        self.utc_now += seconds
        after = self._minute(self.utc_now)
        for minute in range(before, after):
            self._settle_minute(minute)

    def _minute(self, utc: float) -> int:
        return int((utc - self.history_start) // 60)

    # -- market ---------------------------------------------------------------------------

    def _series(self, symbol: str) -> _Series:
        series = self.series[symbol]
        series.ensure(self._minute(self.utc_now) + 2)
        return series

    def quote(self, symbol: str) -> tuple[float, float]:
        spec = self.symbols[symbol]
        series = self._series(symbol)
        bid = float(series.open[self._minute(self.utc_now)])
        ask = round(bid + spec["spread"] * spec["point"], spec["digits"])
        return bid, ask

    def rates(
        self,
        symbol: str,
        tf_s: int,
        first_open: int,
        last_open: int,
        from_utc: float | None = None,
        until_utc: float | None = None,
    ) -> np.ndarray:
        """Bars (server times) with open time in [first_open, last_open]; forming bar last.

        ``from_utc``: aggregate from this UTC time on (copy by position), instead
        of from the first wall-clock bucket (copy by date).
        """
        series = self._series(symbol)
        spec = self.symbols[symbol]
        now_minute = self._minute(self.utc_now)
        offset = self.offset_s(self.utc_now)
        # Minutes to aggregate: from the first bucket's start (an hour earlier, in case
        # the offset was larger then) to the forming minute.
        lo_utc = max(
            self.history_start,
            first_open - offset - 3600 - 60 if from_utc is None else int(from_utc),
        )
        lo = max(0, self._minute(lo_utc))
        hi = now_minute  # inclusive (forming minute)
        if until_utc is not None:
            hi = min(hi, self._minute(until_utc))
        if hi < lo:
            return np.zeros(0, dtype=RATES_DTYPE)
        idx = np.arange(lo, hi + 1)
        utc_times = self.history_start + idx * 60
        # Each bar carries the server's wall clock of its own time: in the autumn the
        # repeated hour comes twice (the times go back), in spring an hour is skipped.
        server_times = utc_times + self.offsets_s(utc_times)
        buckets = server_times - server_times % tf_s
        o = series.open[lo : hi + 1].copy()
        h = series.high[lo : hi + 1].copy()
        lw = series.low[lo : hi + 1].copy()
        c = series.close[lo : hi + 1].copy()
        v = series.volume[lo : hi + 1].copy()
        if hi == now_minute:
            # The forming minute has seen one tick: its open.
            h[-1] = lw[-1] = c[-1] = o[-1]
            v[-1] = 1
        keep = (buckets >= first_open) & (buckets <= last_open)
        if not keep.any():
            return np.zeros(0, dtype=RATES_DTYPE)
        idx_keep = np.flatnonzero(keep)
        b = buckets[idx_keep]
        starts = np.flatnonzero(np.concatenate(([True], b[1:] != b[:-1])))
        out = np.zeros(len(starts), dtype=RATES_DTYPE)
        sel = idx_keep
        out["time"] = b[starts]
        out["open"] = o[sel][starts]
        out["high"] = np.maximum.reduceat(h[sel], starts)
        out["low"] = np.minimum.reduceat(lw[sel], starts)
        ends = np.concatenate((starts[1:], [len(sel)])) - 1
        out["close"] = c[sel][ends]
        out["tick_volume"] = np.add.reduceat(v[sel], starts)
        out["spread"] = spec["spread"]
        out["real_volume"] = 0
        return out

    def _settle_minute(self, minute: int) -> None:
        """SL/TP of positions open at this minute's start, against its high and low."""
        start_utc = self.history_start + minute * 60
        for ticket in sorted(self.positions):
            pos = self.positions.get(ticket)
            if pos is None or pos["time_utc"] > start_utc:
                continue
            spec = self.symbols[pos["symbol"]]
            series = self._series(pos["symbol"])
            o, h, lw = series.open[minute], series.high[minute], series.low[minute]
            if pos["type"] == ORDER_TYPE_SELL:
                spread = spec["spread"] * spec["point"]
                o, h, lw = o + spread, h + spread, lw + spread
            hit = _exit_in_bar(pos, o, h, lw)
            if hit is None:
                continue
            reason, price = hit
            price = round(price, spec["digits"])
            when = start_utc + 30
            level = "sl" if reason == DEAL_REASON_SL else "tp"
            self._close_volume(
                pos,
                pos["volume"],
                price,
                when,
                reason,
                f"[{level} {price:.{spec['digits']}f}]",
                pos["magic"],
                DEAL_ENTRY_OUT,
            )

    # -- account --------------------------------------------------------------------------

    def _profit(self, symbol: str, ptype: int, volume: float, open_: float, close: float) -> float:
        spec = self.symbols[symbol]
        sign = 1.0 if ptype == ORDER_TYPE_BUY else -1.0
        amount = (close - open_) * sign * volume * spec["contract_size"]
        if spec["currency_profit"] != self.account["currency"] and (
            spec["currency_base"] == self.account["currency"]
        ):
            amount /= close
        return round(amount, 2)

    def _margin(self, symbol: str, volume: float, price: float) -> float:
        spec = self.symbols[symbol]
        notional = volume * spec["contract_size"]
        if spec["currency_base"] == self.account["currency"]:
            return round(notional / self.account["leverage"], 2)
        return round(notional * price / self.account["leverage"], 2)

    def _current(self, pos: dict[str, Any]) -> float:
        bid, ask = self.quote(pos["symbol"])
        return bid if pos["type"] == ORDER_TYPE_BUY else ask

    def _floating(self) -> float:
        return sum(
            self._profit(p["symbol"], p["type"], p["volume"], p["price_open"], self._current(p))
            for p in self.positions.values()
        )

    def margin_used(self) -> float:
        return round(
            sum(
                self._margin(p["symbol"], p["volume"], p["price_open"])
                for p in self.positions.values()
            ),
            2,
        )

    def account_values(self) -> dict[str, Any]:
        equity = round(self.balance + self._floating(), 2)
        margin = self.margin_used()
        level = round(equity / margin * 100, 2) if margin else 0.0
        return {
            "login": self.account["login"],
            "trade_mode": 0,
            "leverage": self.account["leverage"],
            "limit_orders": 200,
            "margin_so_mode": 0,
            "trade_allowed": True,
            "trade_expert": self.server_algo_trading,
            "margin_mode": self.account["margin_mode"],
            "currency_digits": 2,
            "fifo_close": False,
            "balance": round(self.balance, 2),
            "credit": 0.0,
            "profit": round(self._floating(), 2),
            "equity": equity,
            "margin": margin,
            "margin_free": round(equity - margin, 2),
            "margin_level": level,
            "margin_so_call": 50.0,
            "margin_so_so": 30.0,
            "name": "Fake Trader",
            "server": self.account["server"],
            "currency": self.account["currency"],
            "company": "Fake Broker Ltd",
        }

    # -- tickets ---------------------------------------------------------------------------

    def _take_order(self) -> int:
        value = self._next_order
        self._next_order += 1
        return value

    def _take_deal(self) -> int:
        value = self._next_deal
        self._next_deal += 1
        return value

    def _stored(self, comment: str) -> str:
        return comment[: self.stored_comment_max]

    def _deal(self, **values: Any) -> dict[str, Any]:
        server = self.to_server(values.pop("utc"))
        deal = {
            "ticket": self._take_deal(),
            "time": server,
            "time_msc": server * 1000,
            "fee": 0.0,
            "swap": 0.0,
            "external_id": "",
            **values,
        }
        self.deals.append(deal)
        return deal

    def _close_volume(
        self,
        pos: dict[str, Any],
        volume: float,
        price: float,
        utc: float,
        reason: int,
        comment: str,
        magic: int,
        entry: int,
        order: int | None = None,
    ) -> dict[str, Any]:
        """Close ``volume`` of ``pos`` at ``price``: an OUT deal, balance, the rest stays."""
        spec = self.symbols[pos["symbol"]]
        profit = self._profit(pos["symbol"], pos["type"], volume, pos["price_open"], price)
        commission = round(-self.account["commission_per_lot"] * volume, 2)
        self.balance += profit + commission
        if order is None:
            order = self._take_order()
            self._history_order(
                order,
                pos["symbol"],
                1 - pos["type"],
                volume,
                price,
                utc,
                magic,
                pos["ticket"],
                comment,
                reason,
                ORDER_FILLING_FOK,
            )
        deal = self._deal(
            order=order,
            utc=utc,
            type=1 - pos["type"],
            entry=entry,
            magic=magic,
            position_id=pos["identifier"],
            reason=reason,
            volume=volume,
            price=price,
            commission=commission,
            profit=profit,
            symbol=pos["symbol"],
            comment=self._stored(comment),
        )
        rest = round(pos["volume"] - volume, 8)
        if rest <= 1e-9:
            self.positions.pop(pos["ticket"], None)
        else:
            pos["volume"] = round(rest / spec["volume_step"]) * spec["volume_step"]
            pos["volume"] = round(pos["volume"], 8)
        return deal

    def _history_order(
        self,
        ticket: int,
        symbol: str,
        otype: int,
        volume: float,
        price: float,
        utc: float,
        magic: int,
        position_id: int,
        comment: str,
        reason: int,
        filling: int,
        state: int = ORDER_STATE_FILLED,
    ) -> dict[str, Any]:
        server = self.to_server(utc)
        record = {
            "ticket": ticket,
            "time_setup": server,
            "time_setup_msc": server * 1000,
            "time_done": server,
            "time_done_msc": server * 1000,
            "type": otype,
            "type_filling": filling,
            "state": state,
            "magic": magic,
            "position_id": position_id,
            "reason": reason,
            "volume_initial": volume,
            "volume_current": 0.0,
            "price_open": price,
            "price_current": price,
            "symbol": symbol,
            "comment": self._stored(comment),
        }
        self.history_orders.append(record)
        return record

    def dump(self) -> None:
        if not self.dump_path:
            return
        data = {
            "deals": self.deals,
            "positions": list(self.positions.values()),
            "history_orders": self.history_orders,
            "init_calls": self.init_calls,
            "concurrent_calls": self.concurrent_calls,
            "threads": len(self.threads),
            "balance": self.balance,
        }
        tmp = f"{self.dump_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, default=float)
        os.replace(tmp, self.dump_path)

    # -- the call gate ---------------------------------------------------------------------

    def call(self, name: str, impl: Any, fail: Any, args: tuple, kwargs: dict) -> Any:
        if not self._lock.acquire(blocking=False):
            # The real package shares one IPC channel: concurrent calls hang or fail.
            self.concurrent_calls += 1
            return fail
        try:
            self.threads.add(threading.get_ident())
            self.calls[name] = self.calls.get(name, 0) + 1
            if name not in ("initialize", "shutdown", "version"):
                if not self.initialized:
                    self.error = (-10004, MESSAGES[-10004])
                    return fail
                if not self.ipc_ok:
                    code = self.faults["disconnect_code"]
                    self.error = (code, MESSAGES[code])
                    return fail
                if self._drop_now():
                    self.ipc_ok = False
                    code = self.faults["disconnect_code"]
                    self.error = (code, MESSAGES[code])
                    return fail
            try:
                result = impl(*args, **kwargs)
            except _Fail as exc:
                self.error = (exc.code, exc.message)
                return fail
            except TypeError:
                self.error = (-2, "Invalid arguments")
                return fail
            self.error = (1, "Success")
            return result
        finally:
            self._lock.release()

    def _drop_now(self) -> bool:
        after = self.faults.get("disconnect_after")
        if after is not None:
            if after <= 0:
                self.faults["disconnect_after"] = None
                return True
            self.faults["disconnect_after"] = after - 1
        rnd = self.faults.get("random") or {}
        p = rnd.get("disconnect_per_call", 0.0)
        return bool(p) and self._rng.random() < p

    # -- implementations -------------------------------------------------------------------

    def initialize(
        self, path=None, *, login=None, password=None, server=None, timeout=60000, portable=False
    ):
        if path is not None and not isinstance(path, str):
            raise _invalid("path")
        if login is not None and (not isinstance(login, int) or isinstance(login, bool)):
            raise _invalid("login")
        for field, value in (("password", password), ("server", server)):
            if value is not None and not isinstance(value, str):
                raise _invalid(field)
        if not isinstance(timeout, int):
            raise _invalid("timeout")
        self.init_calls += 1
        if self.faults["init_failures"]:
            code = self.faults["init_failures"].pop(0)
            raise _Fail(code)
        if path is not None and self.terminal_path and path != self.terminal_path:
            raise _Fail(-10003, f"IPC initialize failed, MetaTrader 5 x64 not found at {path}")
        if login is not None:
            wrong = login != self.account["login"]
            if self.account["password"] and password != self.account["password"]:
                wrong = True
            if server is not None and server != self.account["server"]:
                wrong = True
            if wrong:
                raise _Fail(-6)
        self.initialized = True
        self.ipc_ok = True
        return True

    def login(self, login, *, password=None, server=None, timeout=60000):
        if not isinstance(login, int) or isinstance(login, bool):
            raise _invalid("login")
        if login != self.account["login"] or (
            self.account["password"] and password != self.account["password"]
        ):
            raise _Fail(-6)
        return True

    def shutdown(self):
        self.initialized = False
        self.dump()
        return True

    def version(self):
        if not self.initialized:
            raise _Fail(-10004)
        return (500, 4755, "21 Feb 2025")

    def terminal_info(self):
        values = {
            "connected": self.connected,
            "dlls_allowed": False,
            "trade_allowed": self.algo_trading,
            "tradeapi_disabled": False,
            "build": 4755,
            "maxbars": self.maxbars,
            "ping_last": 31_000,
            "company": "Fake Broker Ltd",
            "name": "MetaTrader 5",
            "language": "English",
            "path": self.terminal_path or "C:\\Program Files\\MetaTrader 5",
        }
        for field in (
            "community_account",
            "community_connection",
            "email_enabled",
            "ftp_enabled",
            "notifications_enabled",
            "mqid",
        ):
            values[field] = False
        return _make(TerminalInfo, tuple(_TERMINAL_FIELDS), values)

    def account_info(self):
        return _make(AccountInfo, tuple(_ACCOUNT_FIELDS), self.account_values())

    def _spec(self, symbol: Any, code: int = -1) -> dict[str, Any]:
        if not isinstance(symbol, str):
            raise _invalid("symbol")
        spec = self.symbols.get(symbol)
        if spec is None:
            raise _Fail(code)
        return spec

    def _need_selected(self, symbol: str) -> None:
        if self.require_select and symbol not in self.selected:
            raise _Fail(-1)

    def symbol_values(self, symbol: str) -> dict[str, Any]:
        spec = self.symbols[symbol]
        bid, ask = self.quote(symbol)
        tick_size = spec.get("tick_size", spec["point"])
        return {
            "select": symbol in self.selected,
            "visible": symbol in self.selected,
            "time": self.server_now(),
            "digits": spec["digits"],
            "spread": spec["spread"],
            "spread_float": True,
            "trade_calc_mode": 0,
            "trade_mode": spec["trade_mode"],
            "trade_stops_level": spec["stops_level"],
            "trade_freeze_level": spec["freeze_level"],
            "trade_exemode": spec["exemode"],
            "filling_mode": spec["filling_mode"],
            "expiration_mode": 15,
            "order_mode": 127,
            "bid": bid,
            "ask": ask,
            "point": spec["point"],
            "trade_tick_value": spec["contract_size"] * tick_size,
            "trade_tick_value_profit": spec["contract_size"] * tick_size,
            "trade_tick_value_loss": spec["contract_size"] * tick_size,
            "trade_tick_size": tick_size,
            "trade_contract_size": spec["contract_size"],
            "volume_min": spec["volume_min"],
            "volume_max": spec["volume_max"],
            "volume_step": spec["volume_step"],
            "volume_limit": spec["volume_limit"],
            "currency_base": spec["currency_base"],
            "currency_profit": spec["currency_profit"],
            "currency_margin": spec["currency_margin"],
            "description": f"{symbol} (fake)",
            "name": symbol,
            "path": f"Forex\\{symbol}",
        }

    def symbol_info(self, symbol):
        self._spec(symbol, code=-4)
        return _make(SymbolInfo, tuple(_SYMBOL_FIELDS), self.symbol_values(symbol))

    def symbol_info_tick(self, symbol):
        self._spec(symbol, code=-4)
        self._need_selected(symbol)
        bid, ask = self.quote(symbol)
        now = self.server_now()
        return Tick(now, bid, ask, 0.0, 0, now * 1000 + 123, 6, 0.0)

    def symbol_select(self, symbol, enable=True):
        self._spec(symbol)
        if not isinstance(enable, bool):
            raise _invalid("enable")
        if enable:
            self.selected.add(symbol)
        else:
            if any(p["symbol"] == symbol for p in self.positions.values()):
                raise _Fail(-1)
            self.selected.discard(symbol)
        return True

    def symbols_total(self):
        return len(self.symbols)

    def symbols_get(self, group=None):
        names = sorted(self.symbols)
        if group is not None:
            if not isinstance(group, str):
                raise _invalid("group")
            names = [n for n in names if _group_match(n, group)]
        return tuple(_make(SymbolInfo, tuple(_SYMBOL_FIELDS), self.symbol_values(n)) for n in names)

    def market_book_add(self, symbol):
        self._spec(symbol)
        return True

    def market_book_release(self, symbol):
        self._spec(symbol)
        return True

    def market_book_get(self, symbol):
        self._spec(symbol)
        bid, ask = self.quote(symbol)
        return (BookInfo(1, ask, 10, 10.0), BookInfo(2, bid, 10, 10.0))

    def _tf(self, timeframe: Any) -> int:
        if not isinstance(timeframe, int) or timeframe not in _TIMEFRAMES_S:
            raise _Fail(-2)
        return _TIMEFRAMES_S[timeframe]

    def _count(self, count: Any) -> int:
        if not isinstance(count, int) or count < 0:
            raise _Fail(-2)
        if count > self.maxbars:
            raise _Fail(-2)
        return count

    def copy_rates_from(self, symbol, timeframe, date_from, count):
        self._spec(symbol)
        self._need_selected(symbol)
        tf_s = self._tf(timeframe)
        count = self._count(count)
        last = _epoch(date_from)
        last -= last % tf_s
        # Bars that opened at or before date_from, counted back by position (the wall
        # clock repeats an hour in autumn: date_from is its latest occurrence so far).
        cut = self.from_server_latest(last)
        start = cut - (count + 1) * tf_s - 3600
        bars = self.rates(symbol, tf_s, -(2**62), 2**62, from_utc=start, until_utc=cut + tf_s - 60)
        return bars[-count:] if count else bars[:0]

    def copy_rates_from_pos(self, symbol, timeframe, start_pos, count):
        self._spec(symbol)
        self._need_selected(symbol)
        tf_s = self._tf(timeframe)
        count = self._count(count)
        if not isinstance(start_pos, int) or start_pos < 0:
            raise _Fail(-2)
        if self.step_s and symbol == self.step_symbol:
            self.advance(self.step_s)
        want = start_pos + count
        # By position: the last bars whatever their wall-clock times (which go back
        # in the repeated autumn hour).
        start = self.utc_now - self.utc_now % tf_s - (want + 1) * tf_s
        bars = self.rates(symbol, tf_s, -(2**62), 2**62, from_utc=start)
        end = len(bars) - start_pos
        if end <= 0 or not count:
            return bars[:0]
        return bars[max(0, end - count) : end]

    def copy_rates_range(self, symbol, timeframe, date_from, date_to):
        self._spec(symbol)
        self._need_selected(symbol)
        tf_s = self._tf(timeframe)
        first, last = _epoch(date_from), _epoch(date_to)
        bars = self.rates(symbol, tf_s, first, last)
        if len(bars) > self.maxbars:
            raise _Fail(-2)
        return bars

    def _ticks(self, symbol: str, first: int, last: int, count: int | None) -> np.ndarray:
        spec = self.symbols[symbol]
        bars = self.rates(symbol, 60, first - first % 60, last)
        bars = bars[(bars["time"] >= first) & (bars["time"] <= last)]
        if count is not None:
            bars = bars[:count]
        out = np.zeros(len(bars), dtype=TICKS_DTYPE)
        out["time"] = bars["time"]
        out["bid"] = bars["open"]
        out["ask"] = np.round(bars["open"] + spec["spread"] * spec["point"], spec["digits"])
        out["time_msc"] = bars["time"] * 1000
        out["flags"] = 6
        return out

    def copy_ticks_from(self, symbol, date_from, count, flags):
        self._spec(symbol)
        self._need_selected(symbol)
        if not isinstance(flags, int):
            raise _Fail(-2)
        return self._ticks(symbol, _epoch(date_from), self.server_now(), self._count(count))

    def copy_ticks_range(self, symbol, date_from, date_to, flags):
        self._spec(symbol)
        self._need_selected(symbol)
        if not isinstance(flags, int):
            raise _Fail(-2)
        return self._ticks(symbol, _epoch(date_from), _epoch(date_to), None)

    def _position_record(self, pos: dict[str, Any]) -> Any:
        current = self._current(pos)
        values = {
            **pos,
            "price_current": current,
            "profit": self._profit(
                pos["symbol"], pos["type"], pos["volume"], pos["price_open"], current
            ),
        }
        return _make(TradePosition, tuple(_POSITION_FIELDS), values)

    def _filtered(
        self, items: list[dict[str, Any]], args: tuple, kwargs: dict, ticket_field: str = "ticket"
    ) -> list[dict[str, Any]]:
        if args:
            raise _Fail(-2, "Unnamed arguments not allowed")
        unknown = set(kwargs) - {"symbol", "group", "ticket"}
        if unknown:
            raise _Fail(-2, "Invalid arguments")
        if "symbol" in kwargs:
            symbol = kwargs["symbol"]
            if not isinstance(symbol, str):
                raise _invalid("symbol")
            return [i for i in items if i["symbol"] == symbol]
        if "group" in kwargs:
            return [i for i in items if _group_match(i["symbol"], kwargs["group"])]
        if "ticket" in kwargs:
            ticket = kwargs["ticket"]
            if not isinstance(ticket, int):
                raise _invalid("ticket")
            return [i for i in items if i[ticket_field] == ticket]
        return items

    def positions_get(self, *args, **kwargs):
        items = self._filtered([self.positions[t] for t in sorted(self.positions)], args, kwargs)
        return tuple(self._position_record(p) for p in items)

    def positions_total(self):
        return len(self.positions)

    def orders_get(self, *args, **kwargs):
        items = self._filtered([self.orders[t] for t in sorted(self.orders)], args, kwargs)
        return tuple(_make(TradeOrder, tuple(_ORDER_FIELDS), o) for o in items)

    def orders_total(self):
        return len(self.orders)

    def _history(self, items: list[dict[str, Any]], args: tuple, kwargs: dict, *, deals: bool):
        if "ticket" in kwargs or "position" in kwargs:
            if args or len(kwargs) != 1:
                raise _Fail(-2, "Invalid arguments")
            if "ticket" in kwargs:
                ticket = kwargs["ticket"]
                if not isinstance(ticket, int):
                    raise _invalid("ticket")
                # history_deals_get(ticket=) filters on DEAL_ORDER, orders on their ticket.
                return [i for i in items if i["order" if deals else "ticket"] == ticket]
            position = kwargs["position"]
            if not isinstance(position, int):
                raise _invalid("position")
            return [i for i in items if i["position_id"] == position]
        if len(args) != 2:
            raise _Fail(-2, "Invalid arguments")
        first, last = _epoch(args[0]), _epoch(args[1])
        group = kwargs.get("group")
        time_field = "time" if deals else "time_setup"
        return [
            i
            for i in items
            if first <= i[time_field] <= last
            and (group is None or _group_match(i["symbol"], group))
        ]

    def history_deals_get(self, *args, **kwargs):
        items = self._history(self.deals, args, kwargs, deals=True)
        return tuple(_make(TradeDeal, tuple(_DEAL_FIELDS), d) for d in items)

    def history_deals_total(self, date_from, date_to):
        return len(self._history(self.deals, (date_from, date_to), {}, deals=True))

    def history_orders_get(self, *args, **kwargs):
        items = self._history(self.history_orders, args, kwargs, deals=False)
        return tuple(_make(TradeOrder, tuple(_ORDER_FIELDS), o) for o in items)

    def history_orders_total(self, date_from, date_to):
        return len(self._history(self.history_orders, (date_from, date_to), {}, deals=False))

    def order_calc_margin(self, action, symbol, volume, price):
        self._spec(symbol)
        if action not in (ORDER_TYPE_BUY, ORDER_TYPE_SELL):
            raise _Fail(-2)
        return self._margin(symbol, float(volume), float(price))

    def order_calc_profit(self, action, symbol, volume, price_open, price_close):
        self._spec(symbol)
        if action not in (ORDER_TYPE_BUY, ORDER_TYPE_SELL):
            raise _Fail(-2)
        return self._profit(symbol, action, float(volume), float(price_open), float(price_close))

    # -- trading ----------------------------------------------------------------------------

    def _validate(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            raise _Fail(-2, "Invalid arguments")
        for key, value in request.items():
            if key not in _REQUEST_FIELDS:
                raise _Fail(-2, "Invalid arguments")
            if value is None:
                raise _invalid(key)
            if key in _INT_REQUEST and (not isinstance(value, int) or isinstance(value, bool)):
                raise _invalid(key)
            if key in _FLOAT_REQUEST and (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
            ):
                raise _invalid(key)
            if key in ("symbol", "comment") and not isinstance(value, str):
                raise _invalid(key)
        comment = request.get("comment", "")
        if len(comment) > self.comment_max or not comment.isascii():
            raise _invalid("comment")
        if "action" not in request:
            raise _invalid("action")
        return {f: request.get(f, _default(f)) for f in _REQUEST_FIELDS}

    def _result(self, retcode: int, req: dict[str, Any], **values: Any) -> Any:
        symbol = req.get("symbol", "")
        bid, ask = self.quote(symbol) if symbol in self.symbols else (0.0, 0.0)
        request_id = self._request_id
        self._request_id += 1
        return _make(
            OrderSendResult,
            tuple(_SEND_FIELDS),
            {
                "retcode": retcode,
                "bid": bid,
                "ask": ask,
                "comment": RETCODE_COMMENTS.get(retcode, "Request rejected"),
                "request_id": request_id,
                "request": _make(TradeRequest, tuple(_REQUEST_FIELDS), req),
                **values,
            },
        )

    def order_check(self, request):
        req = self._validate(request)
        code = self._server_checks(req)
        values = self.account_values()
        extra = 0.0
        if code is None and req["action"] == TRADE_ACTION_DEAL and not req["position"]:
            extra = self._margin(
                req["symbol"], req["volume"], req["price"] or self.quote(req["symbol"])[1]
            )
        margin = round(values["margin"] + extra, 2)
        free = round(values["equity"] - margin, 2)
        return _make(
            OrderCheckResult,
            tuple(_CHECK_FIELDS),
            {
                "retcode": 0 if code is None else code,
                "balance": values["balance"],
                "equity": values["equity"],
                "profit": values["profit"],
                "margin": margin,
                "margin_free": free,
                "margin_level": round(values["equity"] / margin * 100, 2) if margin else 0.0,
                "comment": "Done" if code is None else RETCODE_COMMENTS.get(code, "Rejected"),
                "request": _make(TradeRequest, tuple(_REQUEST_FIELDS), req),
            },
        )

    def _allowed_fillings(self, spec: dict[str, Any]) -> set[int]:
        allowed: set[int] = set()
        if spec["filling_mode"] & 1:
            allowed.add(ORDER_FILLING_FOK)
        if spec["filling_mode"] & 2:
            allowed.add(ORDER_FILLING_IOC)
        if spec["exemode"] == SYMBOL_TRADE_EXECUTION_EXCHANGE or spec["return_allowed"]:
            allowed.add(ORDER_FILLING_RETURN)
        if spec["exemode"] in (SYMBOL_TRADE_EXECUTION_INSTANT, SYMBOL_TRADE_EXECUTION_REQUEST):
            allowed &= {ORDER_FILLING_FOK} | (
                {ORDER_FILLING_RETURN} if spec["return_allowed"] else set()
            )
        return allowed

    def _target_position(self, req: dict[str, Any]) -> dict[str, Any] | None:
        if req["position"]:
            return self.positions.get(req["position"])
        if self.account["margin_mode"] == ACCOUNT_MARGIN_MODE_RETAIL_NETTING:
            for pos in self.positions.values():
                if pos["symbol"] == req["symbol"]:
                    return pos
        return None

    def _server_checks(self, req: dict[str, Any]) -> int | None:
        """The retcode a DEAL request is refused with, or None when it may execute."""
        if not self.connected:
            return 10031
        if not self.server_algo_trading:
            return 10026
        if not self.algo_trading:
            return 10027
        action = req["action"]
        if action not in (
            TRADE_ACTION_DEAL,
            TRADE_ACTION_PENDING,
            TRADE_ACTION_SLTP,
            TRADE_ACTION_MODIFY,
            TRADE_ACTION_REMOVE,
            TRADE_ACTION_CLOSE_BY,
        ):
            return 10013
        if action != TRADE_ACTION_DEAL:
            return None
        spec = self.symbols.get(req["symbol"])
        if spec is None:
            return 10013
        if req["type"] not in (ORDER_TYPE_BUY, ORDER_TYPE_SELL):
            return 10035
        if not spec["market_open"]:
            return 10018
        target = self._target_position(req)
        if req["position"]:
            if target is None:
                return 10036
            if target["symbol"] != req["symbol"] or target["type"] == req["type"]:
                return 10013
            if req["volume"] > target["volume"] + 1e-9:
                return 10038
        closing = (
            target is not None
            and target["type"] != req["type"]
            and (req["volume"] <= target["volume"] + 1e-9)
        )
        mode = spec["trade_mode"]
        if mode == SYMBOL_TRADE_MODE_DISABLED:
            return 10017
        if not closing:
            if mode == SYMBOL_TRADE_MODE_CLOSEONLY:
                return 10044
            if mode == SYMBOL_TRADE_MODE_LONGONLY and req["type"] == ORDER_TYPE_SELL:
                return 10042
            if mode == SYMBOL_TRADE_MODE_SHORTONLY and req["type"] == ORDER_TYPE_BUY:
                return 10043
        volume = req["volume"]
        steps = volume / spec["volume_step"]
        if (
            volume < spec["volume_min"] - 1e-9
            or volume > spec["volume_max"] + 1e-9
            or abs(steps - round(steps)) > 1e-6
        ):
            return 10014
        if req["type_filling"] not in self._allowed_fillings(spec):
            return 10030
        bid, ask = self.quote(req["symbol"])
        price_now = ask if req["type"] == ORDER_TYPE_BUY else bid
        instant = spec["exemode"] in (
            SYMBOL_TRADE_EXECUTION_INSTANT,
            SYMBOL_TRADE_EXECUTION_REQUEST,
        )
        if instant and abs(req["price"] - price_now) > req["deviation"] * spec["point"] + 1e-12:
            return 10004  # requote: instant execution honours the requested price
        if not closing:
            problem = _stops_problem(
                req["type"], bid, ask, req["sl"], req["tp"], spec["stops_level"] * spec["point"]
            )
            if problem:
                return 10016
            margin = self._margin(req["symbol"], volume, price_now)
            if margin > self.account_values()["margin_free"]:
                return 10019
        return None

    def order_send(self, request):
        req = self._validate(request)
        self.sent_requests.append(dict(request))
        faults = self.faults
        if faults["lost_requests"] > 0:
            faults["lost_requests"] -= 1
            raise _Fail(-10005)
        rnd = faults.get("random") or {}
        draw = self._rng.random() if rnd else 1.0
        if rnd and draw < rnd.get("lost_request", 0.0):
            raise _Fail(-10005)
        queued = faults["send_retcodes"]
        if queued:
            return self._result(queued.pop(0), req)
        if rnd:
            edge = rnd.get("lost_request", 0.0)
            for name, code in (("requote", 10004), ("reject", 10006), ("too_many", 10024)):
                edge += rnd.get(name, 0.0)
                if draw < edge:
                    return self._result(code, req)
        code = self._server_checks(req)
        if code is not None:
            return self._result(code, req)
        action = req["action"]
        if action == TRADE_ACTION_DEAL:
            result = self._execute_deal(req)
        elif action == TRADE_ACTION_SLTP:
            result = self._modify_sltp(req)
        elif action == TRADE_ACTION_PENDING:
            result = self._place_pending(req)
        elif action == TRADE_ACTION_MODIFY:
            result = self._modify_pending(req)
        elif action == TRADE_ACTION_REMOVE:
            result = self._remove_pending(req)
        else:
            result = self._close_by(req)
        executed = result.retcode in (10008, 10009, 10010)
        if executed and faults["lost_results"] > 0:
            faults["lost_results"] -= 1
            raise _Fail(-10005)
        if executed and rnd:
            second = self._rng.random()
            if second < rnd.get("lost_result", 0.0):
                raise _Fail(-10005)
            if second < rnd.get("lost_result", 0.0) + rnd.get("timeout_executed", 0.0):
                return self._result(10012, req)
        if executed and faults["executed_retcodes"]:
            return self._result(faults["executed_retcodes"].pop(0), req)
        return result

    def _execute_deal(self, req: dict[str, Any]) -> Any:
        spec = self.symbols[req["symbol"]]
        bid, ask = self.quote(req["symbol"])
        slip = spec["slippage_points"] * spec["point"]
        price = round(ask + slip if req["type"] == ORDER_TYPE_BUY else bid - slip, spec["digits"])
        volume = req["volume"]
        retcode = 10009
        if self.faults["partial_fills"] > 0 and req["type_filling"] != ORDER_FILLING_FOK:
            self.faults["partial_fills"] -= 1
            part = math.floor(volume * self.faults["partial_fraction"] / spec["volume_step"])
            part_volume = round(part * spec["volume_step"], 8)
            if part_volume >= spec["volume_min"]:
                volume, retcode = part_volume, 10010
        utc = self.utc_now
        order = self._take_order()
        target = self._target_position(req)
        commission = round(-self.account["commission_per_lot"] * volume, 2)
        if target is not None and target["type"] != req["type"]:
            # Closing, reducing or (netting) reversing.
            close_volume = min(volume, target["volume"])
            rest = round(volume - close_volume, 8)
            entry = DEAL_ENTRY_INOUT if rest > 1e-9 else DEAL_ENTRY_OUT
            self._history_order(
                order,
                req["symbol"],
                req["type"],
                volume,
                price,
                utc,
                req["magic"],
                target["identifier"],
                req["comment"],
                DEAL_REASON_EXPERT,
                req["type_filling"],
            )
            deal = self._close_volume(
                target,
                close_volume,
                price,
                utc,
                DEAL_REASON_EXPERT,
                req["comment"],
                req["magic"],
                entry,
                order,
            )
            if rest > 1e-9:
                self._open_position(target["identifier"], req, rest, price, utc)
            return self._result(
                retcode, req, deal=deal["ticket"], order=order, volume=volume, price=price
            )
        self.balance += commission
        if target is not None:
            # Netting, same direction: the position grows at the average price.
            total = round(target["volume"] + volume, 8)
            target["price_open"] = round(
                (target["price_open"] * target["volume"] + price * volume) / total,
                spec["digits"] + 3,
            )
            target["volume"] = total
            if req["sl"] or req["tp"]:
                target["sl"], target["tp"] = req["sl"], req["tp"]
            position_id = target["identifier"]
        else:
            position_id = order
            self._open_position(order, req, volume, price, utc)
        self._history_order(
            order,
            req["symbol"],
            req["type"],
            volume,
            price,
            utc,
            req["magic"],
            position_id,
            req["comment"],
            DEAL_REASON_EXPERT,
            req["type_filling"],
        )
        deal = self._deal(
            order=order,
            utc=utc,
            type=req["type"],
            entry=DEAL_ENTRY_IN,
            magic=req["magic"],
            position_id=position_id,
            reason=DEAL_REASON_EXPERT,
            volume=volume,
            price=price,
            commission=commission,
            profit=0.0,
            symbol=req["symbol"],
            comment=self._stored(req["comment"]),
        )
        return self._result(
            retcode, req, deal=deal["ticket"], order=order, volume=volume, price=price
        )

    def _open_position(
        self, ticket: int, req: dict[str, Any], volume: float, price: float, utc: float
    ) -> None:
        server = self.to_server(utc)
        self.positions[ticket] = {
            "ticket": ticket,
            "time": server,
            "time_msc": server * 1000,
            "time_update": server,
            "time_update_msc": server * 1000,
            "type": req["type"],
            "magic": req["magic"],
            "identifier": ticket,
            "reason": 3,
            "volume": volume,
            "price_open": price,
            "sl": float(req["sl"]),
            "tp": float(req["tp"]),
            "swap": 0.0,
            "symbol": req["symbol"],
            "comment": self._stored(req["comment"]),
            "external_id": "",
            "time_utc": utc,
        }

    def _modify_sltp(self, req: dict[str, Any]) -> Any:
        pos = self.positions.get(req["position"])
        if pos is None:
            return self._result(10036, req)
        spec = self.symbols[pos["symbol"]]
        if (pos["sl"], pos["tp"]) == (req["sl"], req["tp"]):
            return self._result(10025, req)
        bid, ask = self.quote(pos["symbol"])
        level = max(spec["stops_level"], spec["freeze_level"]) * spec["point"]
        if _stops_problem(pos["type"], bid, ask, req["sl"], req["tp"], level):
            return self._result(10016, req)
        pos["sl"], pos["tp"] = float(req["sl"]), float(req["tp"])
        pos["time_update"] = self.server_now()
        pos["time_update_msc"] = pos["time_update"] * 1000
        return self._result(10009, req, order=0, deal=0)

    def _place_pending(self, req: dict[str, Any]) -> Any:
        if req["symbol"] not in self.symbols or not (
            ORDER_TYPE_SELL < req["type"] <= ORDER_TYPE_SELL_STOP_LIMIT
        ):
            return self._result(10035, req)
        if req["price"] <= 0:
            return self._result(10015, req)
        ticket = self._take_order()
        server = self.server_now()
        self.orders[ticket] = {
            "ticket": ticket,
            "time_setup": server,
            "time_setup_msc": server * 1000,
            "type": req["type"],
            "type_time": req["type_time"],
            "type_filling": req["type_filling"],
            "state": ORDER_STATE_PLACED,
            "magic": req["magic"],
            "volume_initial": req["volume"],
            "volume_current": req["volume"],
            "price_open": req["price"],
            "sl": req["sl"],
            "tp": req["tp"],
            "price_stoplimit": req["stoplimit"],
            "symbol": req["symbol"],
            "comment": self._stored(req["comment"]),
        }
        return self._result(10008, req, order=ticket, volume=req["volume"], price=req["price"])

    def _modify_pending(self, req: dict[str, Any]) -> Any:
        order = self.orders.get(req["order"])
        if order is None:
            return self._result(10013, req)
        order.update(price_open=req["price"], sl=req["sl"], tp=req["tp"])
        return self._result(10009, req, order=order["ticket"])

    def _remove_pending(self, req: dict[str, Any]) -> Any:
        order = self.orders.pop(req["order"], None)
        if order is None:
            return self._result(10013, req)
        record = {**order, "state": ORDER_STATE_CANCELED, "time_done": self.server_now()}
        record["time_done_msc"] = record["time_done"] * 1000
        record.setdefault("position_id", 0)
        self.history_orders.append(record)
        return self._result(10009, req, order=order["ticket"])

    def _close_by(self, req: dict[str, Any]) -> Any:
        if self.account["margin_mode"] != ACCOUNT_MARGIN_MODE_RETAIL_HEDGING:
            return self._result(10035, req)
        pos = self.positions.get(req["position"])
        other = self.positions.get(req["position_by"])
        if pos is None or other is None:
            return self._result(10036, req)
        if pos["symbol"] != other["symbol"] or pos["type"] == other["type"]:
            return self._result(10013, req)
        volume = min(pos["volume"], other["volume"])
        price = other["price_open"]
        order = self._take_order()
        self._history_order(
            order,
            pos["symbol"],
            ORDER_TYPE_CLOSE_BY,
            volume,
            price,
            self.utc_now,
            req["magic"],
            pos["identifier"],
            req["comment"],
            DEAL_REASON_EXPERT,
            ORDER_FILLING_FOK,
        )
        deal = self._close_volume(
            pos,
            volume,
            price,
            self.utc_now,
            DEAL_REASON_EXPERT,
            req["comment"],
            req["magic"],
            DEAL_ENTRY_OUT_BY,
            order,
        )
        self._close_volume(
            other,
            volume,
            price,
            self.utc_now,
            DEAL_REASON_EXPERT,
            req["comment"],
            req["magic"],
            DEAL_ENTRY_OUT_BY,
            order,
        )
        return self._result(
            10009, req, deal=deal["ticket"], order=order, volume=volume, price=price
        )


def _exit_in_bar(pos: dict[str, Any], o: float, h: float, lw: float) -> tuple[int, float] | None:
    sl, tp = pos["sl"], pos["tp"]
    if pos["type"] == ORDER_TYPE_BUY:
        if sl and o <= sl:
            return DEAL_REASON_SL, o
        if tp and o >= tp:
            return DEAL_REASON_TP, o
        if sl and lw <= sl:
            return DEAL_REASON_SL, sl
        if tp and h >= tp:
            return DEAL_REASON_TP, tp
        return None
    if sl and o >= sl:
        return DEAL_REASON_SL, o
    if tp and o <= tp:
        return DEAL_REASON_TP, o
    if sl and h >= sl:
        return DEAL_REASON_SL, sl
    if tp and lw <= tp:
        return DEAL_REASON_TP, tp
    return None


def _stops_problem(ptype: int, bid: float, ask: float, sl: float, tp: float, level: float) -> bool:
    eps = 1e-9
    if ptype == ORDER_TYPE_BUY:
        return bool(
            (sl and bid - sl < level - eps)
            or (sl and sl >= bid)
            or (tp and tp - bid < level - eps)
            or (tp and tp <= bid)
        )
    return bool(
        (sl and sl - ask < level - eps)
        or (sl and sl <= ask)
        or (tp and ask - tp < level - eps)
        or (tp and tp >= ask)
    )


def _epoch(value: Any) -> int:
    if isinstance(value, datetime):
        return int(value.timestamp())  # naive = local time, as the real package
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    raise _Fail(-2)


def _group_match(name: str, group: str) -> bool:
    matched = False
    for raw in group.split(","):
        pattern = raw.strip()
        if not pattern:
            continue
        if pattern.startswith("!"):
            if fnmatch.fnmatchcase(name, pattern[1:]):
                return False
        elif fnmatch.fnmatchcase(name, pattern):
            matched = True
    return matched


terminal = FakeTerminal()
_env_config = os.environ.get("MT5FAKE_CONFIG")
if _env_config:
    terminal.reset(json.loads(_env_config))
atexit.register(lambda: terminal.dump())


def _api(name: str, fail: Any) -> Any:
    def function(*args: Any, **kwargs: Any) -> Any:
        impl = getattr(terminal, name)
        return terminal.call(name, impl, fail, args, kwargs)

    function.__name__ = name
    function.__qualname__ = name
    return function


def last_error():
    return terminal.error


initialize = _api("initialize", False)
login = _api("login", False)
shutdown = _api("shutdown", None)
version = _api("version", None)
account_info = _api("account_info", None)
terminal_info = _api("terminal_info", None)
symbols_total = _api("symbols_total", None)
symbols_get = _api("symbols_get", None)
symbol_info = _api("symbol_info", None)
symbol_info_tick = _api("symbol_info_tick", None)
symbol_select = _api("symbol_select", False)
market_book_add = _api("market_book_add", False)
market_book_release = _api("market_book_release", False)
market_book_get = _api("market_book_get", None)
copy_rates_from = _api("copy_rates_from", None)
copy_rates_from_pos = _api("copy_rates_from_pos", None)
copy_rates_range = _api("copy_rates_range", None)
copy_ticks_from = _api("copy_ticks_from", None)
copy_ticks_range = _api("copy_ticks_range", None)
orders_total = _api("orders_total", None)
orders_get = _api("orders_get", None)
positions_total = _api("positions_total", None)
positions_get = _api("positions_get", None)
history_orders_total = _api("history_orders_total", None)
history_orders_get = _api("history_orders_get", None)
history_deals_total = _api("history_deals_total", None)
history_deals_get = _api("history_deals_get", None)
order_calc_margin = _api("order_calc_margin", None)
order_calc_profit = _api("order_calc_profit", None)
order_check = _api("order_check", None)
order_send = _api("order_send", None)
