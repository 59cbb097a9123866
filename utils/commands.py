"""CLI -> daemon requests through the journal's ``commands`` table.

While the daemon runs, only the daemon writes the model store (CONVENTIONS.md):
the CLI puts every store-writing request (``train``, ``promote``, ``rollback``,
``delete``) into ``commands`` with :func:`enqueue` and waits for the answer with
:func:`wait_for`; the daemon claims pending rows with :func:`poll_commands`
(usually through :func:`serve_commands`, a task of its event loop), runs them
and writes ``done`` or ``failed`` with a JSON result. With no daemon
(:func:`daemon_alive` is False) the CLI acts itself.

Row life cycle::

    pending --(daemon claims)--> running --(handler returns)--> done   result = handler's dict
                                         \\-(handler raises)--> failed result = {"error", "type"}
    pending --(CLI gave up: cancel)--> failed                         result = {"error", "type"}
    running --(daemon restarted: fail_interrupted)--> failed

The CLI side uses its own short-lived ``sqlite3`` connections (one small write
transaction each, ``busy_timeout`` set), which works while the daemon holds the
journal open in WAL mode. The daemon side goes through ``Journal.run``, so its
event loop never blocks on SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import structlog

from utils.clock import Clock, SystemClock, iso_utc, parse_iso_utc
from utils.trade_journal import (
    APPLICATION_ID,
    BUSY_TIMEOUT_MS,
    HEARTBEAT_KEY,
    Journal,
    JournalError,
    JournalFuture,
)

log = structlog.get_logger(__name__)

STATUSES: Final = ("pending", "running", "done", "failed")
FINISHED: Final = frozenset({"done", "failed"})
# The schema version that created the commands table (utils.trade_journal.MIGRATIONS).
COMMANDS_SCHEMA_VERSION: Final = 2
# The daemon writes its heartbeat every ~5 s; three missed beats mean it is gone.
DEFAULT_MAX_HEARTBEAT_AGE_S: Final = 15.0
# Event kind the daemon journals when it stops cleanly (main.serve).
DAEMON_STOPPED_EVENT: Final = "daemon_stopped"
_COLUMNS: Final = "id, created, command, args_json, status, result_json, updated"


class CommandQueueError(Exception):
    """The journal cannot take or answer commands (absent, not a journal, too old)."""


@dataclass(frozen=True, slots=True)
class CommandRow:
    """One row of ``commands``; JSON columns decoded."""

    id: int
    created: datetime
    command: str
    args: Mapping[str, Any] = field(hash=False)
    status: str
    result: Mapping[str, Any] | None = field(hash=False)
    updated: datetime | None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def error(self) -> str | None:
        """The failure message of a failed command (None otherwise)."""
        if self.status != "failed":
            return None
        if isinstance(self.result, Mapping) and self.result.get("error"):
            return str(self.result["error"])
        return "failed (no reason recorded)"

    @property
    def error_type(self) -> str | None:
        """The exception class name behind a failure (``StoreError``, ``CommandError``, ...)."""
        if self.status != "failed" or not isinstance(self.result, Mapping):
            return None
        value = self.result.get("type")
        return None if value is None else str(value)


# -- encoding -------------------------------------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return tolist()
    return str(value)


def _dumps(value: object) -> str:
    return json.dumps(value, default=_json_default, sort_keys=True, separators=(",", ":"))


def _decode_object(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return {"error": f"undecodable JSON {text[:80]!r}"}
    return value if isinstance(value, dict) else {"value": value}


def _row(values: tuple[Any, ...] | sqlite3.Row) -> CommandRow:
    rid, created, command, args_json, status, result_json, updated = tuple(values)
    args = _decode_object(args_json) or {}
    return CommandRow(
        id=int(rid),
        created=parse_iso_utc(created),
        command=str(command),
        args=args,
        status=str(status),
        result=_decode_object(result_json),
        updated=None if updated is None else parse_iso_utc(updated),
    )


def _failure(message: str, kind: str) -> str:
    return _dumps({"error": message, "type": kind})


# -- the CLI side ---------------------------------------------------------------------


def _connect_rw(journal_path: Path | str) -> sqlite3.Connection:
    """A read-write connection to an existing, migrated journal (never creates one)."""
    path = Path(journal_path)
    if not path.is_file():
        raise CommandQueueError(f"{path}: no journal there (the daemon has not run with this path)")
    try:
        conn = sqlite3.connect(
            path.resolve().as_uri() + "?mode=rw",
            uri=True,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
    except sqlite3.Error as exc:
        raise CommandQueueError(f"{path} cannot be opened for writing ({exc})") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error as exc:
        conn.close()
        raise CommandQueueError(f"{path} cannot be read as a journal ({exc})") from exc
    if app_id != APPLICATION_ID or version < COMMANDS_SCHEMA_VERSION:
        conn.close()
        raise CommandQueueError(
            f"{path} has no commands table (application_id {app_id:#x}, schema v{version}); "
            "start the daemon once so it migrates the journal"
        )
    return conn


def enqueue(
    journal_path: Path | str,
    command: str,
    args: Mapping[str, Any],
    *,
    now: datetime | None = None,
) -> int:
    """Queue ``command`` with ``args`` for the daemon; returns the command id.

    One short ``BEGIN IMMEDIATE`` transaction on its own connection; SQLite's busy
    timeout waits out the daemon's writer (WAL: readers never block it).
    """
    if not isinstance(command, str) or not command:
        raise ValueError(f"command must be a non-empty string (got {command!r})")
    args_json = _dumps(dict(args))
    created = iso_utc(now or datetime.now(UTC))
    conn = _connect_rw(journal_path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(
                "INSERT INTO commands (created, command, args_json, status, updated) "
                "VALUES (?, ?, ?, 'pending', ?)",
                (created, command, args_json, created),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return int(cur.lastrowid or 0)
    except sqlite3.Error as exc:
        raise CommandQueueError(f"{journal_path}: cannot queue {command!r} ({exc})") from exc
    finally:
        conn.close()


def fetch_command(conn: sqlite3.Connection, command_id: int) -> CommandRow | None:
    """One command row (any connection, read-only ones included)."""
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM commands WHERE id = ?",  # noqa: S608 - constant column list
        (int(command_id),),
    ).fetchone()
    return None if row is None else _row(row)


def wait_for(
    journal_path: Path | str,
    command_id: int,
    timeout_s: float,
    clock: Clock,
    *,
    poll_s: float = 0.25,
    sleep: Callable[[float], None] = time.sleep,
) -> CommandRow:
    """Poll the command until it is done or failed, or ``timeout_s`` passed on ``clock``.

    Returns the last row read: check ``row.finished`` (still ``pending`` or
    ``running`` means the daemon did not answer in time). ``sleep(poll_s)`` runs
    between polls and must let ``clock.monotonic()`` advance: the real pair is
    ``SystemClock`` + ``time.sleep``; a test passes a ``FakeClock`` and a sleep
    that advances it (and may play the daemon meanwhile).
    """
    if poll_s <= 0:
        raise ValueError(f"poll_s must be > 0 (got {poll_s})")
    try:
        conn = Journal.open_reader(journal_path)
    except JournalError as exc:
        raise CommandQueueError(str(exc)) from exc
    try:
        deadline = clock.monotonic() + timeout_s
        while True:
            row = fetch_command(conn, command_id)
            if row is None:
                raise CommandQueueError(f"{journal_path}: no command {command_id}")
            if row.finished or clock.monotonic() >= deadline:
                return row
            sleep(poll_s)
    finally:
        conn.close()


def cancel(
    journal_path: Path | str, command_id: int, reason: str, *, now: datetime | None = None
) -> bool:
    """Fail a command that is still pending (the CLI gave up); False once it was claimed."""
    stamp = iso_utc(now or datetime.now(UTC))
    conn = _connect_rw(journal_path)
    try:
        cur = conn.execute(
            "UPDATE commands SET status = 'failed', result_json = ?, updated = ? "
            "WHERE id = ? AND status = 'pending'",
            (_failure(reason, "Cancelled"), stamp, int(command_id)),
        )
        return cur.rowcount == 1
    except sqlite3.Error as exc:
        raise CommandQueueError(
            f"{journal_path}: cannot cancel command {command_id} ({exc})"
        ) from exc
    finally:
        conn.close()


def _heartbeat(conn: sqlite3.Connection) -> datetime | None:
    row = conn.execute(
        "SELECT value, updated FROM state WHERE key = ?", (HEARTBEAT_KEY,)
    ).fetchone()
    if row is None:
        return None
    try:
        value = json.loads(row[0])
        return parse_iso_utc(value) if isinstance(value, str) else parse_iso_utc(row[1])
    except (ValueError, TypeError):
        try:
            return parse_iso_utc(row[1])
        except (ValueError, TypeError):
            return None


def _last_stop(conn: sqlite3.Connection) -> datetime | None:
    row = conn.execute(
        "SELECT time FROM events WHERE kind = ? ORDER BY id DESC LIMIT 1", (DAEMON_STOPPED_EVENT,)
    ).fetchone()
    if row is None:
        return None
    try:
        return parse_iso_utc(row[0])
    except (ValueError, TypeError):
        return None


def daemon_alive(
    journal_path: Path | str, now: datetime, max_age_s: float = DEFAULT_MAX_HEARTBEAT_AGE_S
) -> bool:
    """True when a daemon runs on this journal: its heartbeat in ``state`` is fresh.

    The heartbeat (``daemon.heartbeat``, an ISO UTC wall time the running daemon
    writes every ~5 s) counts when it is within ``max_age_s`` of ``now`` (either
    side: clocks of two processes may differ a little) and no ``daemon_stopped``
    event was journaled at or after it (a clean stop). No journal, an unreadable
    one or no heartbeat: False.
    """
    try:
        conn = Journal.open_reader(journal_path)
    except JournalError:
        return False
    try:
        conn.execute("BEGIN")
        try:
            beat = _heartbeat(conn)
            stopped = _last_stop(conn)
        finally:
            conn.execute("COMMIT")
    except sqlite3.Error:
        return False
    finally:
        conn.close()
    if beat is None:
        return False
    if abs((now - beat).total_seconds()) > max_age_s:
        return False
    return stopped is None or stopped < beat


# -- the daemon side ------------------------------------------------------------------

Handler = Callable[[CommandRow], Awaitable[Mapping[str, Any]]]


def _claim_op(stamp: str) -> Callable[[sqlite3.Connection], CommandRow | None]:
    def op(conn: sqlite3.Connection) -> CommandRow | None:
        rows = conn.execute(
            "UPDATE commands SET status = 'running', updated = ? WHERE id = "  # noqa: S608
            "(SELECT min(id) FROM commands WHERE status = 'pending') "
            f"RETURNING {_COLUMNS}",
            (stamp,),
        ).fetchall()
        return _row(rows[0]) if rows else None

    return op


def _finish_op(
    command_id: int, status: str, result_json: str, stamp: str
) -> Callable[[sqlite3.Connection], None]:
    def op(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE commands SET status = ?, result_json = ?, updated = ? "
            "WHERE id = ? AND status = 'running'",
            (status, result_json, stamp, command_id),
        )

    return op


def _expire_op(now: datetime, max_age_s: float, stamp: str) -> Callable[[sqlite3.Connection], int]:
    def op(conn: sqlite3.Connection) -> int:
        pending = conn.execute(
            "SELECT id, created FROM commands WHERE status = 'pending'"
        ).fetchall()
        expired = []
        for rid, created in pending:
            try:
                age = (now - parse_iso_utc(created)).total_seconds()
            except (ValueError, TypeError):
                age = float("inf")
            if age > max_age_s:
                expired.append(int(rid))
        for rid in expired:
            conn.execute(
                "UPDATE commands SET status = 'failed', result_json = ?, updated = ? "
                "WHERE id = ? AND status = 'pending'",
                (
                    _failure(
                        f"expired: pending for more than {max_age_s:g} s before a daemon "
                        "picked it up; run the command again",
                        "Expired",
                    ),
                    stamp,
                    rid,
                ),
            )
        return len(expired)

    return op


async def poll_commands(
    journal: Journal,
    handler: Handler,
    *,
    clock: Clock | None = None,
    expire_after_s: float | None = None,
) -> int:
    """Answer every pending command, oldest first; returns how many were handled.

    Each row is claimed (``running``) in its own journal write, ``handler`` is
    awaited, and the row becomes ``done`` with the handler's dict as
    ``result_json``, or ``failed`` with ``{"error": str(exc), "type":
    exception class}``. Pending commands older than ``expire_after_s`` (if set)
    fail as expired instead of running: a request nobody waits for any more.
    If this coroutine is cancelled while a handler runs, the row is marked
    failed ("interrupted") without waiting, and the cancellation goes on.
    """
    clock = clock or SystemClock()
    if expire_after_s is not None:
        await journal.run(_expire_op(clock.now(), expire_after_s, iso_utc(clock.now())))
    handled = 0
    while True:
        row = await journal.run(_claim_op(iso_utc(clock.now())))
        if row is None:
            return handled
        handled += 1
        try:
            result = await handler(row)
            if not isinstance(result, Mapping):
                raise TypeError(
                    f"command handler returned {type(result).__name__}, expected a dict"
                )
            status, payload = "done", _dumps(dict(result))
        except asyncio.CancelledError:
            with contextlib.suppress(JournalError):  # a closed journal: fail_interrupted at start
                journal.submit(
                    _finish_op(
                        row.id,
                        "failed",
                        _failure("interrupted: the daemon stopped while running it", "Interrupted"),
                        iso_utc(clock.now()),
                    )
                )
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is the command's answer
            message = str(exc) or type(exc).__name__
            status, payload = "failed", _failure(message, type(exc).__name__)
            log.warning(
                "command_failed",
                id=row.id,
                command=row.command,
                error=message,
                type=type(exc).__name__,
            )
        else:
            log.info("command_done", id=row.id, command=row.command)
        await journal.run(_finish_op(row.id, status, payload, iso_utc(clock.now())))


def fail_interrupted(journal: Journal, *, clock: Clock | None = None) -> JournalFuture[int]:
    """Mark commands left ``running`` by a daemon that died as failed (call at start-up)."""
    stamp = iso_utc((clock or SystemClock()).now())
    payload = _failure(
        "interrupted: the daemon stopped while running it; check the result "
        "(python main.py models list) and run the command again if needed",
        "Interrupted",
    )

    def op(conn: sqlite3.Connection) -> int:
        cur = conn.execute(
            "UPDATE commands SET status = 'failed', result_json = ?, updated = ? "
            "WHERE status = 'running'",
            (payload, stamp),
        )
        return int(cur.rowcount)

    return journal.submit(op)


async def serve_commands(
    journal: Journal,
    handler: Handler,
    *,
    clock: Clock,
    interval_s: float = 1.0,
    expire_after_s: float | None = 600.0,
) -> None:
    """The daemon's command task: ``poll_commands`` every ``interval_s`` until cancelled.

    First fails the commands a previous daemon left ``running``
    (:func:`fail_interrupted`). A journal that closed ends the task; any other
    error is logged and the next poll tries again (a command is never lost: it
    stays pending or running).
    """
    try:
        interrupted = await fail_interrupted(journal, clock=clock)
    except JournalError:
        return
    if interrupted:
        log.warning("commands_interrupted", count=interrupted)
    while True:
        try:
            await poll_commands(journal, handler, clock=clock, expire_after_s=expire_after_s)
        except JournalError:
            log.info("command_poller_stopped", reason="journal closed")
            return
        except (sqlite3.Error, OSError) as exc:
            log.error("command_poll_failed", error=repr(exc))
        await clock.sleep(interval_s)


__all__ = [
    "COMMANDS_SCHEMA_VERSION",
    "DAEMON_STOPPED_EVENT",
    "DEFAULT_MAX_HEARTBEAT_AGE_S",
    "FINISHED",
    "STATUSES",
    "CommandQueueError",
    "CommandRow",
    "Handler",
    "cancel",
    "daemon_alive",
    "enqueue",
    "fail_interrupted",
    "fetch_command",
    "poll_commands",
    "serve_commands",
    "wait_for",
]
