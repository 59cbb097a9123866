"""The SQLite trade journal: every trade, order, prediction and event, durable and ordered.

One writer thread owns the read-write connection. Every write is an operation
``op(conn) -> T`` queued to that thread; the thread commits queued operations in
batches and resolves each operation's future only after its batch committed, so
a resolved future means the write is on disk (WAL, ``synchronous=FULL``).

**The prefix property** (the daemon's crash recovery relies on it): the queue is
FIFO and batches commit one after the other in submission order, each batch in
one transaction. After a crash at any moment the journal therefore holds exactly
a prefix of the submitted writes: if write *n* is in the file, every write
submitted before *n* is too (except operations whose own future reported an
error, which were rolled back and are never retried). A submitted write cannot
be cancelled: cancelling the task that awaits it leaves the write queued.
Writes that must never be split by a crash (an order and the trade it opened)
go in one :meth:`Journal.atomic` block: one operation, committed together.

**Write failures are retried, never dropped.** When the disk, the file system or
another process fails a batch (disk full, I/O error, a write lock held past the
busy timeout), the writer rolls the batch back and retries the same batch, with
capped backoff, until it commits; writes queued meanwhile wait behind it, so the
prefix property holds and no committed trade is lost. While it fails, the journal
is in a queryable failing state (:attr:`Journal.write_failure`, "journal write
failing: <reason>", and the :attr:`Journal.on_write_state` callback on every
change) that the daemon uses to stop opening positions; once a retry commits,
the state clears and a ``journal_write_recovered`` event records the outage.
Only an op's own error (a constraint, an unknown trade) fails that op alone.
``close()`` during an outage retries for ``close_timeout_s`` more, then fails
every write still pending with :class:`JournalError`.

Files are private: a new journal file (and the ``-wal``/``-shm`` files SQLite
derives from it) is created 0600 and missing directories 0700 (POSIX).

Readers (``status``, reports) use :meth:`Journal.open_reader`, a separate
read-only connection that never blocks the writer and is never blocked by it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import errno
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Final, TypeVar

import structlog

from utils.clock import Clock, iso_utc, parse_iso_utc
from utils.paths import mkdir_private

log = structlog.get_logger(__name__)

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], T]

APPLICATION_ID: Final = 0x5343414C  # "SCAL": marks a file as this daemon's journal
SQLITE_MAGIC: Final = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS: Final = 5000
# SQLite primary result codes of failures outside the batch's own ops (the disk, the
# file system, another process holding a lock): such a batch is retried, never dropped.
_ENVIRONMENT_CODES: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)
_ENVIRONMENT_ERRNOS: Final = frozenset(
    code
    for code in (
        errno.ENOSPC,
        errno.EIO,
        errno.EROFS,
        errno.ENOMEM,
        errno.EACCES,
        getattr(errno, "EDQUOT", None),
    )
    if code is not None
)
# The same failures by their message, for errors raised without a result code.
_ENVIRONMENT_TEXT: Final = (
    "database or disk is full",
    "disk i/o error",
    "database is locked",
    "database table is locked",
    "unable to open database file",
    "readonly database",
    "out of memory",
    "locking protocol",
)
HEARTBEAT_KEY: Final = "daemon.heartbeat"
# ``state`` key prefix: + symbol -> open time of the last bar the daemon processed.
LAST_BAR_KEY: Final = "feed.last_bar_time."
LEVELS: Final = ("debug", "info", "warning", "error", "critical")

_V1_TRADING_CORE = """
PRAGMA application_id = 1396916556;

CREATE TABLE trades (
    id INTEGER PRIMARY KEY,
    client_order_id TEXT NOT NULL UNIQUE,
    symbol TEXT NOT NULL,
    side TEXT NOT NULL CHECK (side IN ('buy', 'sell')),
    volume REAL NOT NULL,
    open_time TEXT NOT NULL,
    open_price REAL NOT NULL,
    sl REAL,
    tp REAL,
    broker_position_id INTEGER,
    status TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    close_time TEXT,
    close_price REAL,
    close_reason TEXT,
    profit REAL,
    commission REAL NOT NULL DEFAULT 0,
    swap REAL NOT NULL DEFAULT 0,
    net_profit REAL,
    confidence REAL,
    model_set TEXT,
    bars_held INTEGER,
    mode TEXT NOT NULL
);
CREATE INDEX trades_status ON trades (status);
CREATE INDEX trades_symbol_open_time ON trades (symbol, open_time);
CREATE INDEX trades_close_time ON trades (close_time);

CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    client_order_id TEXT NOT NULL,
    symbol TEXT NOT NULL,
    action TEXT NOT NULL,
    side TEXT,
    volume REAL,
    price REAL,
    sl REAL,
    tp REAL,
    position_id INTEGER,
    retcode INTEGER,
    retcode_name TEXT,
    result_price REAL,
    result_volume REAL,
    comment TEXT,
    request_json TEXT,
    result_json TEXT
);
CREATE INDEX orders_client_order_id ON orders (client_order_id);

CREATE TABLE equity (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    balance REAL NOT NULL,
    equity REAL NOT NULL,
    margin REAL NOT NULL,
    free_margin REAL NOT NULL,
    open_positions INTEGER NOT NULL
);

CREATE TABLE state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated TEXT NOT NULL
);

CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    level TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    details_json TEXT
);
CREATE INDEX events_level_time ON events (level, time);
"""

_V2_ML_AND_CONTROL = """
CREATE TABLE predictions (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    bar_time TEXT NOT NULL,
    symbol TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    stage TEXT NOT NULL,
    p_down REAL NOT NULL,
    p_flat REAL NOT NULL,
    p_up REAL NOT NULL,
    latency_us REAL
);
CREATE INDEX predictions_symbol_bar_time ON predictions (symbol, bar_time);

CREATE TABLE model_events (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    symbol TEXT,
    kind TEXT,
    version TEXT,
    event TEXT NOT NULL,
    details_json TEXT
);

CREATE TABLE training_runs (
    id INTEGER PRIMARY KEY,
    started TEXT NOT NULL,
    finished TEXT,
    symbol TEXT NOT NULL,
    kind TEXT NOT NULL,
    version TEXT,
    status TEXT NOT NULL,
    metrics_json TEXT,
    error TEXT
);

CREATE TABLE commands (
    id INTEGER PRIMARY KEY,
    created TEXT NOT NULL,
    command TEXT NOT NULL,
    args_json TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'running', 'done', 'failed')),
    result_json TEXT,
    updated TEXT
);
"""

# (number, description, sql), applied in order, each in its own transaction that also
# sets PRAGMA user_version to its number. Never edit a released migration: add one.
MIGRATIONS: Final[tuple[tuple[int, str, str], ...]] = (
    (1, "trading core: trades, orders, equity, state, events", _V1_TRADING_CORE),
    (2, "ML and control: predictions, model_events, training_runs, commands", _V2_ML_AND_CONTROL),
)
LATEST_VERSION: Final = MIGRATIONS[-1][0]


class JournalError(Exception):
    """The journal file cannot be used (not a journal, newer schema, damaged) or is closed.

    The file is left exactly as it was. The CLI exits with code 2 on it.
    """


class UnknownTradeError(LookupError):
    """``close_trade`` for a client order id the journal has never seen."""


class JournalFuture(concurrent.futures.Future[T]):
    """A ``concurrent.futures.Future`` that an event loop can also ``await``.

    ``fut.result()`` blocks a thread; ``await fut`` suspends a coroutine. Either
    way, a result means the write is committed.
    """

    def __await__(self) -> Generator[Any, None, T]:
        wrapped = asyncio.wrap_future(self, loop=asyncio.get_running_loop())
        return wrapped.__await__()


# -- values ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TradeOpen:
    client_order_id: str
    symbol: str
    side: str  # "buy" | "sell"
    volume: float
    open_time: datetime
    open_price: float
    sl: float | None
    tp: float | None
    broker_position_id: int | None
    commission: float  # of the opening deal (negative = cost), account currency
    confidence: float | None
    model_set: str
    mode: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "side", _side_text(self.side))
        _require_aware("TradeOpen.open_time", self.open_time)
        if not self.volume > 0:
            raise ValueError(f"TradeOpen.volume must be > 0 (got {self.volume})")


@dataclass(frozen=True, slots=True)
class TradeClose:
    client_order_id: str
    close_time: datetime
    close_price: float
    close_reason: str
    profit: float  # gross P&L of the closing deal, account currency
    commission: float  # of this closing deal only (negative = cost)
    swap: float
    bars_held: int | None

    def __post_init__(self) -> None:
        _require_aware("TradeClose.close_time", self.close_time)


@dataclass(frozen=True, slots=True)
class PredictionRow:
    time: datetime
    bar_time: datetime
    symbol: str
    model: str
    version: str
    stage: str
    p_down: float
    p_flat: float
    p_up: float
    latency_us: float | None = None


@dataclass(frozen=True, slots=True)
class TradeRow:
    """One row of ``trades``, times parsed to UTC-aware datetimes."""

    id: int
    client_order_id: str
    symbol: str
    side: str
    volume: float
    open_time: datetime
    open_price: float
    sl: float | None
    tp: float | None
    broker_position_id: int | None
    status: str
    close_time: datetime | None
    close_price: float | None
    close_reason: str | None
    profit: float | None
    commission: float
    swap: float
    net_profit: float | None
    confidence: float | None
    model_set: str | None
    bars_held: int | None
    mode: str


@dataclass(frozen=True, slots=True)
class EventRow:
    id: int
    time: datetime
    level: str
    kind: str
    message: str
    details: object  # decoded details_json, None when absent


@dataclass(frozen=True, slots=True)
class EquityRow:
    id: int
    time: datetime
    balance: float
    equity: float
    margin: float
    free_margin: float
    open_positions: int


@dataclass(frozen=True, slots=True)
class JournalSummary:
    """What ``python main.py status`` shows; "today" is the UTC date of ``now``."""

    now: datetime
    schema_version: int
    last_equity: EquityRow | None
    open_trades: tuple[TradeRow, ...]
    trades_today: int
    wins_today: int  # closed today with net_profit > 0
    win_rate_today: float | None  # None when no trade closed today
    pnl_today: float  # net
    trades_total: int
    pnl_total: float  # net, all closed trades
    last_errors: tuple[EventRow, ...]  # newest first, warning and above
    heartbeat: str | None  # the value of state 'daemon.heartbeat'
    heartbeat_updated: datetime | None
    heartbeat_age_s: float | None  # now - heartbeat_updated


@dataclass(frozen=True, slots=True)
class JournalStats:
    batches_committed: int
    ops_committed: int
    ops_failed: int
    batches_failed: int  # failed attempts at a batch (each one retried until it commits)
    queued: int
    write_failure: str | None = None  # "journal write failing: <reason>" while it lasts


# -- file checks ----------------------------------------------------------------------


def _fix_hint() -> str:
    return "set storage.journal_path to another file (or move this one away)"


def _check_header(path: Path) -> bool:
    """True for an existing SQLite file, False for an absent or 0-byte one; raise otherwise."""
    if path.is_dir():
        raise JournalError(f"{path} is a directory, not a journal file; {_fix_hint()}")
    try:
        with path.open("rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise JournalError(f"{path} cannot be read ({exc}); fix its permissions") from exc
    if not head:
        return False
    if head != SQLITE_MAGIC:
        raise JournalError(
            f"{path} is not a journal: it is not an SQLite database (it starts with "
            f"{head[:16]!r}); {_fix_hint()}. The file was not modified."
        )
    return True


def _connect_ro(path: Path) -> sqlite3.Connection:
    uri = path.resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def _classify(conn: sqlite3.Connection, path: Path) -> int:
    """Schema version of an opened SQLite file; 0 for an empty one; raise if not ours."""
    try:
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        objects = int(conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        raise JournalError(
            f"{path} cannot be read as a journal ({exc}); {_fix_hint()}. The file was not modified."
        ) from exc
    if app_id != APPLICATION_ID:
        if app_id == 0 and version == 0 and objects == 0:
            return 0  # an empty SQLite file: ours to use
        raise JournalError(
            f"{path} is not a journal: it is an SQLite database of another application "
            f"(application_id {app_id:#x}, {objects} schema objects, user_version {version}); "
            f"{_fix_hint()}. The file was not modified."
        )
    if version > LATEST_VERSION:
        raise JournalError(
            f"{path} was written by a newer version of the daemon (journal schema {version}, "
            f"this version knows up to {LATEST_VERSION}); upgrade, or set "
            "storage.journal_path to another file. The file was not modified."
        )
    return version


def _inspect(path: Path) -> int | None:
    """None for a new journal (absent or empty file), else its schema version."""
    if not _check_header(path):
        return None
    try:
        conn = _connect_ro(path)
    except sqlite3.Error as exc:
        raise JournalError(f"{path} cannot be opened ({exc}); {_fix_hint()}") from exc
    try:
        version = _classify(conn, path)
        _quick_check(conn, path)
    finally:
        conn.close()
    return version


def _quick_check(conn: sqlite3.Connection, path: Path) -> None:
    try:
        problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as exc:
        problems = [str(exc)]
    if problems != ["ok"]:
        text = "; ".join(problems).replace("\n", "; ")
        if len(text) > 300:
            text = text[:300] + " ..."
        raise JournalError(
            f"{path} is damaged (PRAGMA quick_check: {text}); restore it from a backup or "
            f"{_fix_hint()}. The file was not modified."
        )


def backup_path(path: Path, version: int) -> Path:
    """Where the copy taken before migrating a version-``version`` journal goes."""
    return path.with_name(f"{path.name}.v{version}.bak")


def _create_private(path: Path) -> None:
    """Create an empty owner-only file (the journal holds account data)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _backup(path: Path, version: int) -> Path:
    target = backup_path(path, version)
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    _create_private(tmp)
    src = _connect_ro(path)
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
    os.replace(tmp, target)  # a half-written copy never takes the backup's name
    return target


# -- JSON -----------------------------------------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, Enum):
        return value.value
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    if isinstance(value, Path):
        return str(value)
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def _dumps(value: object) -> str:
    return json.dumps(value, default=_json_default, sort_keys=True, separators=(",", ":"))


def _dumps_opt(value: object) -> str | None:
    return None if value is None else _dumps(value)


def _loads_opt(text: str | None) -> object:
    return None if text is None else json.loads(text)


def _require_aware(name: str, moment: datetime) -> None:
    if moment.tzinfo is None:
        raise ValueError(f"{name} is naive ({moment!r}); journal times must be UTC-aware")


def _side_text(side: object) -> str:
    text = side.value if isinstance(side, Enum) else side
    if text not in ("buy", "sell"):
        raise ValueError(f"side must be 'buy' or 'sell' (got {side!r})")
    return str(text)


def _opt_text(value: object) -> str | None:
    if value is None:
        return None
    return str(value.value) if isinstance(value, Enum) else str(value)


def _full_iso(moment: datetime) -> str:
    """Like iso_utc but always with 6 fraction digits: the normalised form used in comparisons."""
    _require_aware("time", moment)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- reads (usable as ops, and on read-only connections) ------------------------------


def _rows(conn: sqlite3.Connection, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
    cur = conn.cursor()
    cur.row_factory = sqlite3.Row
    try:
        return list(cur.execute(sql, params).fetchall())
    finally:
        cur.close()


def _opt_time(text: str | None) -> datetime | None:
    return None if text is None else parse_iso_utc(text)


def _trade_row(r: sqlite3.Row) -> TradeRow:
    return TradeRow(
        id=r["id"],
        client_order_id=r["client_order_id"],
        symbol=r["symbol"],
        side=r["side"],
        volume=r["volume"],
        open_time=parse_iso_utc(r["open_time"]),
        open_price=r["open_price"],
        sl=r["sl"],
        tp=r["tp"],
        broker_position_id=r["broker_position_id"],
        status=r["status"],
        close_time=_opt_time(r["close_time"]),
        close_price=r["close_price"],
        close_reason=r["close_reason"],
        profit=r["profit"],
        commission=r["commission"],
        swap=r["swap"],
        net_profit=r["net_profit"],
        confidence=r["confidence"],
        model_set=r["model_set"],
        bars_held=r["bars_held"],
        mode=r["mode"],
    )


def _event_row(r: sqlite3.Row) -> EventRow:
    return EventRow(
        id=r["id"],
        time=parse_iso_utc(r["time"]),
        level=r["level"],
        kind=r["kind"],
        message=r["message"],
        details=_loads_opt(r["details_json"]),
    )


def fetch_state(conn: sqlite3.Connection, key: str, default: object = None) -> object:
    rows = _rows(conn, "SELECT value FROM state WHERE key = ?", (key,))
    return json.loads(rows[0]["value"]) if rows else default


def fetch_market_times(conn: sqlite3.Connection) -> dict[str, datetime]:
    """Each symbol's last processed bar time (market time); unreadable values are skipped."""
    rows = conn.execute(
        "SELECT key, value FROM state WHERE substr(key, 1, ?) = ?",
        (len(LAST_BAR_KEY), LAST_BAR_KEY),
    ).fetchall()
    times: dict[str, datetime] = {}
    for key, value in rows:
        with contextlib.suppress(ValueError, TypeError):
            times[str(key)[len(LAST_BAR_KEY) :]] = parse_iso_utc(json.loads(value))
    return times


def fetch_open_trades(conn: sqlite3.Connection) -> list[TradeRow]:
    rows = _rows(conn, "SELECT * FROM trades WHERE status = 'open' ORDER BY id")
    return [_trade_row(r) for r in rows]


def fetch_closed_trades(conn: sqlite3.Connection, since: datetime | None = None) -> list[TradeRow]:
    """Closed trades in close-time order; ``since`` keeps those closed at or after it.

    Stored times come from ``iso_utc``, which drops a zero fraction, so text order
    is not time order within one second: compare a normalised form instead.
    """
    rows = _rows(
        conn,
        "SELECT * FROM trades WHERE status = 'closed' AND (? IS NULL OR "
        "(CASE WHEN length(close_time) = 20 THEN substr(close_time, 1, 19) || '.000000Z' "
        "ELSE close_time END) >= ?) "
        "ORDER BY (CASE WHEN length(close_time) = 20 THEN substr(close_time, 1, 19) "
        "|| '.000000Z' ELSE close_time END), id",
        (None if since is None else 1, None if since is None else _full_iso(since)),
    )
    return [_trade_row(r) for r in rows]


def fetch_realized_pnl(conn: sqlite3.Connection) -> float:
    rows = _rows(
        conn, "SELECT COALESCE(SUM(net_profit), 0.0) AS pnl FROM trades WHERE status = 'closed'"
    )
    return float(rows[0]["pnl"])


def fetch_last_events(
    conn: sqlite3.Connection, n: int = 5, min_level: str = "warning"
) -> list[EventRow]:
    """The ``n`` newest events at ``min_level`` or above, newest first."""
    wanted: list[str | None] = list(LEVELS[LEVELS.index(_level(min_level)) :])
    wanted += [None] * (len(LEVELS) - len(wanted))
    rows = _rows(
        conn,
        "SELECT * FROM events WHERE level IN (?, ?, ?, ?, ?) ORDER BY id DESC LIMIT ?",
        (*wanted, int(n)),
    )
    return [_event_row(r) for r in rows]


def fetch_last_equity(conn: sqlite3.Connection) -> EquityRow | None:
    rows = _rows(conn, "SELECT * FROM equity ORDER BY id DESC LIMIT 1")
    if not rows:
        return None
    r = rows[0]
    return EquityRow(
        id=r["id"],
        time=parse_iso_utc(r["time"]),
        balance=r["balance"],
        equity=r["equity"],
        margin=r["margin"],
        free_margin=r["free_margin"],
        open_positions=r["open_positions"],
    )


def fetch_max_position_id(conn: sqlite3.Connection) -> int | None:
    """Highest broker position id in trades or orders (a paper broker continues after it)."""
    row = _rows(
        conn,
        "SELECT (SELECT max(broker_position_id) FROM trades) AS t, "
        "(SELECT max(position_id) FROM orders) AS o",
    )[0]
    found = [int(v) for v in (row["t"], row["o"]) if v is not None]
    return max(found) if found else None


def summary(conn: sqlite3.Connection, now: datetime) -> JournalSummary:
    """Everything ``status`` shows, read in one snapshot. Works on a read-only connection."""
    _require_aware("now", now)
    own_tx = not conn.in_transaction
    if own_tx:
        conn.execute("BEGIN")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        day = now.astimezone(UTC).date().isoformat()
        today = _rows(
            conn,
            "SELECT count(*) AS n, COALESCE(SUM(net_profit > 0), 0) AS wins, "
            "COALESCE(SUM(net_profit), 0.0) AS pnl FROM trades "
            "WHERE status = 'closed' AND substr(close_time, 1, 10) = ?",
            (day,),
        )[0]
        total = _rows(
            conn,
            "SELECT count(*) AS n, COALESCE(SUM(net_profit), 0.0) AS pnl FROM trades "
            "WHERE status = 'closed'",
        )[0]
        beat = _rows(conn, "SELECT value, updated FROM state WHERE key = ?", (HEARTBEAT_KEY,))
        last_equity = fetch_last_equity(conn)
        open_trades = tuple(fetch_open_trades(conn))
        last_errors = tuple(fetch_last_events(conn, 5, "warning"))
    finally:
        if own_tx:
            conn.execute("COMMIT")
    heartbeat: str | None = None
    heartbeat_updated: datetime | None = None
    if beat:
        value = json.loads(beat[0]["value"])
        heartbeat = value if isinstance(value, str) else _dumps(value)
        heartbeat_updated = parse_iso_utc(beat[0]["updated"])
    trades_today = int(today["n"])
    wins_today = int(today["wins"])
    return JournalSummary(
        now=now,
        schema_version=version,
        last_equity=last_equity,
        open_trades=open_trades,
        trades_today=trades_today,
        wins_today=wins_today,
        win_rate_today=wins_today / trades_today if trades_today else None,
        pnl_today=float(today["pnl"]),
        trades_total=int(total["n"]),
        pnl_total=float(total["pnl"]),
        last_errors=last_errors,
        heartbeat=heartbeat,
        heartbeat_updated=heartbeat_updated,
        heartbeat_age_s=(
            (now - heartbeat_updated).total_seconds() if heartbeat_updated is not None else None
        ),
    )


def _level(level: str) -> str:
    norm = level.lower()
    if norm not in LEVELS:
        raise ValueError(f"event level must be one of {', '.join(LEVELS)} (got {level!r})")
    return norm


# -- the journal ----------------------------------------------------------------------


@dataclass(slots=True)
class _Item:
    op: Callable[[sqlite3.Connection], Any]
    future: JournalFuture[Any]


class _Stop:
    """Queue sentinel: everything queued before it is written, then the writer stops."""


class _BatchFailed(Exception):
    """The batch was rolled back for a reason outside its ops; ``args[0]`` is the cause."""


def _environment_failure(exc: BaseException) -> bool:
    """True for a failure of the disk, the file system or another process, not of one op."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _ENVIRONMENT_ERRNOS
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in _ENVIRONMENT_CODES
        text = str(exc).lower()
        return any(part in text for part in _ENVIRONMENT_TEXT)
    return False


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, sqlite3.Error) else f"{type(exc).__name__}: {text}"


@dataclass(slots=True)
class _Failure:
    reason: str
    since: datetime  # clock time of the first failed attempt
    since_mono: float  # time.monotonic() of it: outage durations are real time
    attempts: int


def _noop(_conn: sqlite3.Connection) -> None:
    return None


@dataclass(slots=True)
class _Group:
    journal: Journal
    items: list[_Item]


# The open ``Journal.atomic()`` block of this task (or thread), if any.
_GROUP: contextvars.ContextVar[_Group | None] = contextvars.ContextVar(
    "journal_atomic_group", default=None
)


def _in_group(journal: Journal) -> bool:
    group = _GROUP.get()
    return group is not None and group.journal is journal


class Journal:
    """The daemon's journal: one writer thread, batched FIFO commits, typed helpers.

    ``submit``/helpers return a :class:`JournalFuture` at once (never blocking the
    event loop); ``await`` it or call ``.result()`` where durability matters.
    The writer takes the first queued op plus whatever else is already queued, at
    most ``batch_max`` ops, runs each under its own SAVEPOINT (a failing op is
    rolled back alone and its future gets the exception) and commits them in one
    transaction. A batch failed by the environment (disk full, I/O error, a lock
    held past ``busy_timeout_ms``) is rolled back and retried, backing off from
    ``retry_backoff_s[0]`` to ``retry_backoff_s[1]`` seconds, until it commits;
    meanwhile :attr:`write_failure` says why and :attr:`on_write_state` is told.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        clock: Clock,
        batch_max: int = 500,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        retry_backoff_s: tuple[float, float] = (0.05, 5.0),
        close_timeout_s: float = 10.0,
    ) -> None:
        if batch_max < 1:
            raise ValueError(f"batch_max must be >= 1 (got {batch_max})")
        if not 0 < retry_backoff_s[0] <= retry_backoff_s[1]:
            raise ValueError(f"retry_backoff_s must be 0 < first <= cap (got {retry_backoff_s})")
        self.path = Path(path)
        self._clock = clock
        self._batch_max = batch_max
        self._busy_timeout_ms = int(busy_timeout_ms)
        self._retry_backoff_s = retry_backoff_s
        self._close_timeout_s = close_timeout_s
        self._closing = threading.Event()
        self._close_started: float | None = None
        self._failure: _Failure | None = None
        # Called on the writer thread with "journal write failing: <reason>" when writes
        # start failing and with None when they succeed again (the daemon halts entries
        # on it). It must be quick and must not write to this journal synchronously.
        self.on_write_state: Callable[[str | None], None] | None = None
        self._queue: queue.SimpleQueue[_Item | _Stop] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._accepting = False
        self._thread: threading.Thread | None = None
        self._batches = 0
        self._ops = 0
        self._ops_failed = 0
        self._batches_failed = 0
        self.backup: Path | None = None  # the copy taken before migrating, if any
        self.schema_version_at_open: int | None = None

    # -- life cycle ------------------------------------------------------------------

    def open(self) -> None:
        """Validate, back up if migrating, migrate, and start the writer thread.

        Raises :class:`JournalError` (file untouched) for a file that is not a
        journal, a newer schema, or one that fails ``PRAGMA quick_check``.
        """
        if self._thread is not None:
            raise RuntimeError(f"journal {self.path} is already open")
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        thread = threading.Thread(
            target=self._writer_main, args=(ready,), name="journal-writer", daemon=True
        )
        self._thread = thread
        thread.start()
        try:
            ready.result()  # the writer accepts writes before it resolves this
        except BaseException:
            thread.join()
            self._thread = None
            raise

    def close(self) -> None:
        """Write everything queued, stop the writer, close the connection. Idempotent."""
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            if self._accepting:
                self._accepting = False
                self._close_started = time.monotonic()
                self._closing.set()  # an outage in progress gets close_timeout_s more
                self._queue.put(_Stop())
        if threading.current_thread() is thread:
            raise RuntimeError("Journal.close() called from a journal operation")
        thread.join()
        with self._lock:
            self._thread = None

    def __enter__(self) -> Journal:
        self.open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._accepting

    @property
    def stats(self) -> JournalStats:
        return JournalStats(
            batches_committed=self._batches,
            ops_committed=self._ops,
            ops_failed=self._ops_failed,
            batches_failed=self._batches_failed,
            queued=self._queue.qsize(),
            write_failure=self.write_failure,
        )

    @property
    def write_failure(self) -> str | None:
        """``"journal write failing: <reason>"`` while writes fail (they are being retried)."""
        failure = self._failure
        return None if failure is None else f"journal write failing: {failure.reason}"

    @property
    def write_failing_since(self) -> datetime | None:
        failure = self._failure
        return None if failure is None else failure.since

    # -- the queue -------------------------------------------------------------------

    def submit(self, op: Op[T]) -> JournalFuture[T]:
        """Queue ``op(conn)`` for the writer thread; its future resolves after commit."""
        fut: JournalFuture[T] = JournalFuture()
        fut.set_running_or_notify_cancel()  # a queued write cannot be cancelled
        group = _GROUP.get()
        if group is not None and group.journal is self:
            if not self._accepting:
                raise JournalError(
                    f"journal {self.path} is closed (or was never opened); no write is accepted"
                )
            group.items.append(_Item(op, fut))
            return fut
        with self._lock:
            if not self._accepting:
                raise JournalError(
                    f"journal {self.path} is closed (or was never opened); no write is accepted"
                )
            self._queue.put(_Item(op, fut))
        return fut

    @contextlib.contextmanager
    def atomic(self) -> Generator[None, None, None]:
        """Writes submitted in this block commit together, or none of them does.

        They are queued as one operation when the block ends: one batch, one
        SAVEPOINT. A crash can then never keep one without the other (an entry's
        order row without its trade row). Each write keeps its own future; if one
        fails, all fail. Never await a write of this journal inside the block (it is
        queued only at the end); other tasks' writes are not grouped (a context
        variable, so per task and per thread). Nested blocks join the outer one.
        """
        current = _GROUP.get()
        if current is not None and current.journal is self:
            yield
            return
        group = _Group(self, [])
        token = _GROUP.set(group)
        try:
            yield
        finally:
            _GROUP.reset(token)
            if group.items:
                self._submit_group(group.items)

    def _submit_group(self, items: list[_Item]) -> None:
        ops = [item.op for item in items]

        def op(conn: sqlite3.Connection) -> list[Any]:
            return [each(conn) for each in ops]

        def settle(done: concurrent.futures.Future[list[Any]]) -> None:
            exc = done.exception()
            for n, item in enumerate(items):
                if exc is not None:
                    item.future.set_exception(exc)
                else:
                    item.future.set_result(done.result()[n])

        try:
            outer = self.submit(op)
        except JournalError as exc:
            for item in items:
                item.future.set_exception(exc)
            raise
        outer.add_done_callback(settle)

    async def run(self, op: Op[T]) -> T:
        """Run ``op`` on the writer thread and await its committed result."""
        if _in_group(self):
            raise RuntimeError("Journal.run() inside Journal.atomic() would wait forever")
        return await self.submit(op)

    def call(self, op: Op[T], timeout: float | None = None) -> T:
        """Blocking ``run`` for start-up, the CLI and tests (blocks an event loop)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("Journal.call() from a journal operation would deadlock")
        if _in_group(self):
            raise RuntimeError("Journal.call() inside Journal.atomic() would wait forever")
        return self.submit(op).result(timeout)

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed (or has failed)."""
        if _in_group(self):
            raise RuntimeError("Journal.flush() inside Journal.atomic() would wait forever")
        if self._accepting:
            await asyncio.wrap_future(self.submit(_noop))

    def flush_sync(self) -> None:
        if self._accepting:
            self.call(_noop)

    # -- the writer thread -----------------------------------------------------------

    def _writer_main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            conn = self._setup()
        except BaseException as exc:  # noqa: BLE001 - handed to open(), which raises it
            ready.set_exception(exc)
            return
        with self._lock:
            self._accepting = True
        ready.set_result(None)
        try:
            self._serve(conn)
        finally:
            with self._lock:
                self._accepting = False
            self._fail_queued(JournalError(f"journal {self.path} is closed"))
            conn.close()

    def _fail_queued(self, exc: BaseException) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Item) and not item.future.done():
                item.future.set_exception(exc)

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            first = self._queue.get()
            if isinstance(first, _Stop):
                return
            batch = [first]
            stop = False
            while len(batch) < self._batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Stop):
                    stop = True
                    break
                batch.append(item)
            try:
                committed = self._run_batch(conn, batch)
            except BaseException as exc:
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(exc)
                self._rollback(conn)
                log.exception("journal_writer_crashed", path=str(self.path))
                raise
            if stop or not committed:
                return

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Item]) -> bool:
        """Commit ``batch``, retrying while the environment fails it.

        False only when the journal was closed during an outage that outlasted
        ``close_timeout_s``: then the batch and everything queued after it failed.
        """
        attempt = 0
        while True:
            try:
                outcomes = self._attempt(conn, batch)
                break
            except _BatchFailed as failed:
                attempt += 1
                self._batches_failed += 1
                cause = failed.args[0]
                self._note_failure(cause, len(batch), attempt)
                if not self._wait_before_retry(attempt):
                    self._give_up(batch, cause)
                    return False
        self._batches += 1
        for it, ok, value in outcomes:
            if ok:
                self._ops += 1
                it.future.set_result(value)
            else:
                self._ops_failed += 1
                it.future.set_exception(value)
        if self._failure is not None:
            self._recovered(conn)
        return True

    def _attempt(
        self, conn: sqlite3.Connection, batch: list[_Item]
    ) -> list[tuple[_Item, bool, Any]]:
        """One transaction over ``batch``; raises :class:`_BatchFailed` (rolled back) to retry."""
        outcomes: list[tuple[_Item, bool, Any]] = []
        try:
            self._begin(conn)
            for item in batch:
                conn.execute("SAVEPOINT journal_op")
                try:
                    value = item.op(conn)
                except Exception as exc:
                    # SQLite rolled the whole transaction back, or the disk failed under
                    # this op: not the op's fault, so not its future's.
                    if not conn.in_transaction or _environment_failure(exc):
                        raise _BatchFailed(exc) from exc
                    conn.execute("ROLLBACK TO journal_op")
                    conn.execute("RELEASE journal_op")
                    outcomes.append((item, False, exc))
                else:
                    conn.execute("RELEASE journal_op")
                    outcomes.append((item, True, value))
            self._commit(conn)
        except _BatchFailed:
            self._rollback(conn)
            raise
        except (sqlite3.Error, OSError, MemoryError) as exc:
            self._rollback(conn)
            raise _BatchFailed(exc) from exc
        return outcomes

    def _note_failure(self, cause: BaseException, ops: int, attempt: int) -> None:
        reason = _describe(cause)
        failure = self._failure
        if failure is None:
            now = self._clock.now()
            self._failure = _Failure(reason, now, time.monotonic(), 1)
            log.error("journal_write_failing", path=str(self.path), reason=reason, ops=ops)
            self._tell(self.write_failure)
            return
        failure.attempts += 1
        if failure.reason != reason:
            failure.reason = reason
            self._tell(self.write_failure)
        if attempt & (attempt - 1) == 0:  # 1, 2, 4, 8, ...: a log line, not a flood
            log.warning(
                "journal_write_retry", path=str(self.path), reason=reason, attempt=attempt, ops=ops
            )

    def _wait_before_retry(self, attempt: int) -> bool:
        """Back off before the next attempt; False when a closing journal should give up."""
        first, cap = self._retry_backoff_s
        delay = min(cap, first * 2 ** min(attempt - 1, 30))
        if self._closing.is_set():
            closed_at = self._close_started or time.monotonic()
            left = closed_at + self._close_timeout_s - time.monotonic()
            if left <= 0:
                return False
            delay = min(delay, left)
            # A real sleep: this waits for the disk, not for market time.
            time.sleep(delay)
            return True
        self._closing.wait(delay)  # close() cuts the wait short for a prompt last try
        return True

    def _give_up(self, batch: list[_Item], cause: BaseException) -> None:
        pending = [it for it in batch if not it.future.done()]
        error = JournalError(
            f"journal {self.path}: writes kept failing ({_describe(cause)}) until the journal "
            f"was closed; {len(pending)} write(s) of the last batch and every later one were "
            "not saved"
        )
        for it in pending:
            it.future.set_exception(error)
        self._fail_queued(error)
        log.critical("journal_writes_abandoned", path=str(self.path), reason=_describe(cause))

    def _recovered(self, conn: sqlite3.Connection) -> None:
        failure = self._failure
        if failure is None:
            return
        self._failure = None
        seconds = time.monotonic() - failure.since_mono
        log.warning(
            "journal_write_recovered",
            path=str(self.path),
            failed_for_s=round(seconds, 3),
            attempts=failure.attempts,
            reason=failure.reason,
        )
        message = (
            f"journal writes failed for {seconds:.1f} s ({failure.attempts} attempts, "
            f"since {iso_utc(failure.since)}): {failure.reason}; every queued write was "
            "saved once they succeeded again"
        )
        details = _dumps(
            {"reason": failure.reason, "attempts": failure.attempts, "seconds": seconds}
        )
        params = (iso_utc(self._clock.now()), message, details)

        def record(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO events (time, level, kind, message, details_json) "
                "VALUES (?, 'warning', 'journal_write_recovered', ?, ?)",
                params,
            )

        with contextlib.suppress(_BatchFailed):  # failing again: the next batch says so
            self._attempt(conn, [_Item(record, JournalFuture())])
        self._tell(None)

    def _tell(self, state: str | None) -> None:
        callback = self.on_write_state
        if callback is None:
            return
        try:
            callback(state)
        except Exception:  # a broken hook must not stop the writer
            log.exception("journal_write_state_hook_failed", path=str(self.path))

    def _begin(self, conn: sqlite3.Connection) -> None:
        # busy_timeout already waits for another process's lock; past it, the batch
        # is retried like any other environment failure.
        conn.execute("BEGIN IMMEDIATE")

    def _commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("journal_rollback_failed", path=str(self.path), error=repr(exc))

    # -- opening (on the writer thread) ----------------------------------------------

    def _setup(self) -> sqlite3.Connection:
        path = self.path
        try:
            mkdir_private(path.parent)
        except OSError as exc:
            raise JournalError(
                f"cannot create the directory of journal {path} ({exc}); "
                "fix its permissions or set storage.journal_path"
            ) from exc
        version = _inspect(path)
        self.schema_version_at_open = version
        if version is None and not path.exists():
            _create_private(path)
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        path = self.path
        conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        # Re-check with this connection: another process may have migrated meanwhile.
        version = _classify(conn, path)
        if 0 < version < LATEST_VERSION:
            self.backup = _backup(path, version)
            log.info("journal_backup", path=str(path), backup=str(self.backup), version=version)
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        if mode != "wal":
            raise JournalError(
                f"{path}: the journal needs WAL mode but SQLite kept {mode!r} (a network or "
                "read-only file system?); set storage.journal_path to a file on a local disk"
            )
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        for number, description, sql in MIGRATIONS:
            if number <= version:
                continue
            script = f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {number};\nCOMMIT;"
            try:
                conn.executescript(script)
            except sqlite3.Error as exc:
                self._rollback(conn)
                saved = f" (the copy from before the upgrade: {self.backup})" if self.backup else ""
                raise JournalError(
                    f"{path}: migration {number} ({description}) failed: {exc}{saved}"
                ) from exc
            log.info("journal_migrated", path=str(path), version=number, what=description)

    @staticmethod
    def open_reader(path: Path | str) -> sqlite3.Connection:
        """A read-only connection for ``status`` and reports while the daemon writes.

        Never creates a file; refuses non-journals and newer schemas like ``open``.
        """
        p = Path(path)
        if not _check_header(p):
            raise JournalError(f"{p}: no journal there yet (the daemon has not run with this path)")
        try:
            conn = _connect_ro(p)
        except sqlite3.Error as exc:
            raise JournalError(f"{p} cannot be opened ({exc}); {_fix_hint()}") from exc
        try:
            version = _classify(conn, p)
            if version == 0:
                raise JournalError(f"{p}: an empty journal (the daemon has not written it yet)")
            conn.execute("PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    # -- typed writes ----------------------------------------------------------------

    def _insert(self, table: str, row: Mapping[str, object]) -> JournalFuture[int]:
        """Queue one INSERT of ``row`` (column -> value) into ``table``; the future holds its id.

        ``table`` and the column names are constants of this module, never input.
        """
        columns = ", ".join(row)
        placeholders = ", ".join("?" * len(row))
        sql = f"INSERT INTO {table} ({columns}) VALUES ({placeholders})"  # noqa: S608
        params = tuple(row.values())

        def op(conn: sqlite3.Connection) -> int:
            return int(conn.execute(sql, params).lastrowid or 0)

        return self.submit(op)

    def record_order(
        self,
        *,
        time: datetime,
        client_order_id: str,
        symbol: str,
        action: str,
        side: str | None = None,
        volume: float | None = None,
        price: float | None = None,
        sl: float | None = None,
        tp: float | None = None,
        position_id: int | None = None,
        retcode: int | None = None,
        retcode_name: str | None = None,
        result_price: float | None = None,
        result_volume: float | None = None,
        comment: str | None = None,
        request: Mapping[str, object] | None = None,
        result: Mapping[str, object] | None = None,
    ) -> JournalFuture[int]:
        """One order request and its outcome (every request, accepted or not)."""
        return self._insert(
            "orders",
            {
                "time": iso_utc(time),
                "client_order_id": client_order_id,
                "symbol": symbol,
                "action": action,
                "side": _opt_text(side),
                "volume": volume,
                "price": price,
                "sl": sl,
                "tp": tp,
                "position_id": position_id,
                "retcode": retcode,
                "retcode_name": retcode_name,
                "result_price": result_price,
                "result_volume": result_volume,
                "comment": comment,
                "request_json": _dumps_opt(request),
                "result_json": _dumps_opt(result),
            },
        )

    def open_trade(self, trade: TradeOpen) -> JournalFuture[int]:
        """Insert an open trade; the same client order id again is a no-op. Returns its id."""
        params = (
            trade.client_order_id,
            trade.symbol,
            trade.side,
            trade.volume,
            iso_utc(trade.open_time),
            trade.open_price,
            trade.sl,
            trade.tp,
            trade.broker_position_id,
            trade.commission,
            trade.confidence,
            trade.model_set,
            trade.mode,
        )

        def op(conn: sqlite3.Connection) -> int:
            conn.execute(
                "INSERT INTO trades (client_order_id, symbol, side, volume, open_time, "
                "open_price, sl, tp, broker_position_id, status, commission, confidence, "
                "model_set, mode) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', ?, ?, ?, ?) "
                "ON CONFLICT (client_order_id) DO NOTHING",
                params,
            )
            row = conn.execute(
                "SELECT id FROM trades WHERE client_order_id = ?", (trade.client_order_id,)
            ).fetchone()
            return int(row[0])

        return self.submit(op)

    def close_trade(self, close: TradeClose) -> JournalFuture[bool]:
        """Close a trade: True if this call closed it, False if it was closed already.

        ``commission`` is the closing deal's and is added to the opening one;
        ``net_profit = profit + commission (both deals) + swap``. An unknown
        client order id fails the future with :class:`UnknownTradeError`.
        """
        params = {
            "coid": close.client_order_id,
            "close_time": iso_utc(close.close_time),
            "close_price": close.close_price,
            "close_reason": close.close_reason,
            "profit": close.profit,
            "commission": close.commission,
            "swap": close.swap,
            "bars_held": close.bars_held,
        }

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE trades SET status = 'closed', close_time = :close_time, "
                "close_price = :close_price, close_reason = :close_reason, profit = :profit, "
                "commission = commission + :commission, swap = swap + :swap, "
                "net_profit = :profit + commission + :commission + swap + :swap, "
                "bars_held = :bars_held "
                "WHERE client_order_id = :coid AND status = 'open'",
                params,
            )
            if cur.rowcount:
                return True
            known = conn.execute(
                "SELECT 1 FROM trades WHERE client_order_id = ?", (close.client_order_id,)
            ).fetchone()
            if known is None:
                raise UnknownTradeError(
                    f"close_trade: no trade with client_order_id {close.client_order_id!r} "
                    f"in journal {self.path}"
                )
            return False

        return self.submit(op)

    def record_event(
        self,
        level: str,
        kind: str,
        message: str,
        details: Mapping[str, object] | None = None,
        *,
        time: datetime | None = None,
    ) -> JournalFuture[int]:
        """An operational event; ``level`` is one of LEVELS (case-insensitive)."""
        return self._insert(
            "events",
            {
                "time": iso_utc(time or self._clock.now()),
                "level": _level(level),
                "kind": kind,
                "message": message,
                "details_json": _dumps_opt(details),
            },
        )

    def record_equity(
        self,
        time: datetime,
        balance: float,
        equity: float,
        margin: float,
        free_margin: float,
        open_positions: int,
    ) -> JournalFuture[int]:
        return self._insert(
            "equity",
            {
                "time": iso_utc(time),
                "balance": balance,
                "equity": equity,
                "margin": margin,
                "free_margin": free_margin,
                "open_positions": int(open_positions),
            },
        )

    def set_state(self, key: str, value: object) -> JournalFuture[None]:
        """Store a JSON-able value under ``key`` (encoded now, so later mutation is harmless)."""
        params = (key, _dumps(value), iso_utc(self._clock.now()))

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO state (key, value, updated) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                "updated = excluded.updated",
                params,
            )

        return self.submit(op)

    def record_predictions(self, rows: Sequence[PredictionRow]) -> JournalFuture[int]:
        """Insert prediction rows; the future holds how many."""
        params = [
            (
                iso_utc(r.time),
                iso_utc(r.bar_time),
                r.symbol,
                r.model,
                r.version,
                r.stage,
                float(r.p_down),
                float(r.p_flat),
                float(r.p_up),
                None if r.latency_us is None else float(r.latency_us),
            )
            for r in rows
        ]

        def op(conn: sqlite3.Connection) -> int:
            conn.executemany(
                "INSERT INTO predictions (time, bar_time, symbol, model, version, stage, "
                "p_down, p_flat, p_up, latency_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                params,
            )
            return len(params)

        return self.submit(op)

    def prune_predictions(self, symbol: str, before: datetime) -> JournalFuture[int]:
        """Delete ``symbol``'s prediction rows for bars opened before ``before``.

        Predictions are the bulk of the journal (one row per model per bar); this
        is their retention (``storage.predictions_keep_days``). Trades, orders,
        events and model events are never pruned. The future holds the rows deleted.
        """
        _require_aware("before", before)
        # Whole seconds: bar times are stored by iso_utc without a fraction, so the
        # text comparison orders them correctly.
        cutoff = iso_utc(before.replace(microsecond=0))

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM predictions WHERE symbol = ? AND bar_time < ?", (symbol, cutoff)
            )
            return int(cur.rowcount)

        return self.submit(op)

    def record_model_event(
        self,
        event: str,
        *,
        symbol: str | None = None,
        kind: str | None = None,
        version: str | None = None,
        details: Mapping[str, object] | None = None,
        time: datetime | None = None,
    ) -> JournalFuture[int]:
        """trained, validated, rejected, promoted, swapped, rolled_back, drift, ..."""
        return self._insert(
            "model_events",
            {
                "time": iso_utc(time or self._clock.now()),
                "symbol": symbol,
                "kind": kind,
                "version": version,
                "event": event,
                "details_json": _dumps_opt(details),
            },
        )

    def record_training_run(
        self,
        *,
        started: datetime,
        symbol: str,
        kind: str,
        status: str,
        finished: datetime | None = None,
        version: str | None = None,
        metrics: Mapping[str, object] | None = None,
        error: str | None = None,
    ) -> JournalFuture[int]:
        """Insert a training run; the future holds its id (for ``finish_training_run``)."""
        return self._insert(
            "training_runs",
            {
                "started": iso_utc(started),
                "finished": None if finished is None else iso_utc(finished),
                "symbol": symbol,
                "kind": kind,
                "version": version,
                "status": status,
                "metrics_json": _dumps_opt(metrics),
                "error": error,
            },
        )

    def finish_training_run(
        self,
        run_id: int,
        *,
        finished: datetime,
        status: str,
        version: str | None = None,
        metrics: Mapping[str, object] | None = None,
        error: str | None = None,
    ) -> JournalFuture[None]:
        """Complete a run recorded by ``record_training_run`` (version/metrics kept if None)."""
        params = (iso_utc(finished), status, version, _dumps_opt(metrics), error, int(run_id))

        def op(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE training_runs SET finished = ?, status = ?, "
                "version = COALESCE(?, version), metrics_json = COALESCE(?, metrics_json), "
                "error = ? WHERE id = ?",
                params,
            )
            if not cur.rowcount:
                raise LookupError(f"no training run {run_id} in journal {self.path}")

        return self.submit(op)

    # -- reads (blocking: they wait for the writer, so they see every earlier write) --

    def get_state(self, key: str, default: object = None) -> object:
        return self.call(lambda conn: fetch_state(conn, key, default))

    def open_trades(self) -> list[TradeRow]:
        return self.call(fetch_open_trades)

    def closed_trades(self, since: datetime | None = None) -> list[TradeRow]:
        return self.call(lambda conn: fetch_closed_trades(conn, since))

    def realized_pnl(self) -> float:
        return self.call(fetch_realized_pnl)

    def last_events(self, n: int = 5, min_level: str = "warning") -> list[EventRow]:
        _level(min_level)
        return self.call(lambda conn: fetch_last_events(conn, n, min_level))

    def last_equity(self) -> EquityRow | None:
        return self.call(fetch_last_equity)

    def max_position_id(self) -> int | None:
        return self.call(fetch_max_position_id)


__all__ = [
    "APPLICATION_ID",
    "HEARTBEAT_KEY",
    "LATEST_VERSION",
    "LEVELS",
    "MIGRATIONS",
    "EquityRow",
    "EventRow",
    "Journal",
    "JournalError",
    "JournalFuture",
    "JournalStats",
    "JournalSummary",
    "PredictionRow",
    "TradeClose",
    "TradeOpen",
    "TradeRow",
    "UnknownTradeError",
    "backup_path",
    "fetch_closed_trades",
    "fetch_last_equity",
    "fetch_last_events",
    "fetch_max_position_id",
    "fetch_open_trades",
    "fetch_realized_pnl",
    "fetch_state",
    "summary",
]
