"""The SQLite trade journal: migrations, refusals, batching, durability and the status summary."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from utils.clock import FakeClock, iso_utc
from utils.trade_journal import (
    APPLICATION_ID,
    HEARTBEAT_KEY,
    LATEST_VERSION,
    MIGRATIONS,
    Journal,
    JournalError,
    PredictionRow,
    TradeClose,
    TradeOpen,
    UnknownTradeError,
    backup_path,
    fetch_closed_trades,
    summary,
)

T0 = datetime(2024, 1, 2, 9, 0, tzinfo=UTC)
WAIT_S = 30  # generous upper bound on any future; tests never sleep
REPO = Path(__file__).resolve().parents[1]


# -- helpers --------------------------------------------------------------------------


class Gate:
    """An op that holds the writer thread until released, so a test controls batching."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, _conn: sqlite3.Connection) -> None:
        self.started.set()
        if not self.release.wait(WAIT_S):
            raise TimeoutError("gate never released")

    def hold(self, journal: Journal) -> None:
        journal.submit(self)
        assert self.started.wait(WAIT_S)


def insert_event(message: str, *, fail: bool = False) -> Callable[[sqlite3.Connection], int]:
    def op(conn: sqlite3.Connection) -> int:
        cur = conn.execute(
            "INSERT INTO events (time, level, kind, message) VALUES (?, 'info', 'test', ?)",
            (iso_utc(T0), message),
        )
        if fail:
            raise ValueError(f"op {message} failed after writing")
        return int(cur.lastrowid or 0)

    return op


def messages(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT message FROM events ORDER BY id")]
    finally:
        conn.close()


def build_version(path: Path, k: int) -> None:
    """A journal at schema version k, built by hand from MIGRATIONS[:k], with one v1 row."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for number, _description, sql in MIGRATIONS[:k]:
            conn.executescript(f"BEGIN;\n{sql}\nPRAGMA user_version = {number};\nCOMMIT;")
        conn.execute(
            "INSERT INTO events (time, level, kind, message) "
            "VALUES ('2023-12-31T23:59:59Z', 'warning', 'old', 'kept across the upgrade')"
        )
    finally:
        conn.close()


def pragma(path: Path, name: str) -> object:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def trade_open(coid: str = "T1", **over: object) -> TradeOpen:
    fields: dict[str, object] = {
        "client_order_id": coid,
        "symbol": "EURUSD",
        "side": "buy",
        "volume": 0.1,
        "open_time": T0,
        "open_price": 1.1000,
        "sl": 1.0990,
        "tp": 1.1020,
        "broker_position_id": 7,
        "commission": -0.35,
        "confidence": 0.61,
        "model_set": "rf:v1,xgb:v2",
        "mode": "paper",
    }
    fields.update(over)
    return TradeOpen(**fields)  # type: ignore[arg-type]


def trade_close(coid: str = "T1", **over: object) -> TradeClose:
    fields: dict[str, object] = {
        "client_order_id": coid,
        "close_time": T0 + timedelta(minutes=5),
        "close_price": 1.1020,
        "close_reason": "tp",
        "profit": 20.0,
        "commission": -0.35,
        "swap": -0.1,
        "bars_held": 5,
    }
    fields.update(over)
    return TradeClose(**fields)  # type: ignore[arg-type]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "journal.sqlite3"


@pytest.fixture
def journal(path: Path, fake_clock: FakeClock) -> Iterator[Journal]:
    j = Journal(path, clock=fake_clock)
    j.open()
    yield j
    j.close()


# -- opening and migrations -----------------------------------------------------------


def test_new_journal_gets_latest_schema_wal_and_owner_only_file(path: Path) -> None:
    with Journal(path, clock=FakeClock()) as j:
        assert j.call(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
        assert j.call(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2  # FULL
        assert j.call(lambda c: c.execute("PRAGMA foreign_keys").fetchone()[0]) == 1
        assert j.call(lambda c: c.execute("PRAGMA busy_timeout").fetchone()[0]) == 5000
        tables = j.call(
            lambda c: {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        )
    assert tables == {
        "trades",
        "orders",
        "equity",
        "state",
        "events",
        "predictions",
        "model_events",
        "training_runs",
        "commands",
    }
    assert pragma(path, "user_version") == LATEST_VERSION
    assert pragma(path, "application_id") == APPLICATION_ID == 0x5343414C
    assert not list(path.parent.glob("*.bak"))
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o600


def test_empty_file_is_a_new_journal(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    with Journal(path, clock=FakeClock()) as j:
        j.record_event("info", "k", "m").result(WAIT_S)
    assert pragma(path, "user_version") == LATEST_VERSION


def test_migration_1_sql_marks_the_file_as_ours() -> None:
    assert f"PRAGMA application_id = {APPLICATION_ID};" in MIGRATIONS[0][2]
    assert [m[0] for m in MIGRATIONS] == list(range(1, LATEST_VERSION + 1))


@pytest.mark.parametrize("k", range(1, LATEST_VERSION))
def test_migrates_every_earlier_version_keeping_rows_and_a_backup(path: Path, k: int) -> None:
    path.parent.mkdir(parents=True)
    build_version(path, k)
    with Journal(path, clock=FakeClock()) as j:
        assert j.schema_version_at_open == k
        assert j.backup == backup_path(path, k) == path.with_name(f"journal.sqlite3.v{k}.bak")
        old = j.last_events(10, "warning")
        j.record_predictions(
            [PredictionRow(T0, T0, "EURUSD", "rf", "v1", "production", 0.2, 0.5, 0.3, 80.0)]
        ).result(WAIT_S)
    assert [e.message for e in old] == ["kept across the upgrade"]
    assert pragma(path, "user_version") == LATEST_VERSION
    bak = backup_path(path, k)
    assert pragma(bak, "user_version") == k
    conn = sqlite3.connect(bak)
    try:
        assert conn.execute("SELECT message FROM events").fetchall() == [
            ("kept across the upgrade",)
        ]
    finally:
        conn.close()


def test_current_version_is_not_backed_up_again(path: Path) -> None:
    with Journal(path, clock=FakeClock()):
        pass
    with Journal(path, clock=FakeClock()) as j:
        assert j.backup is None
        assert j.schema_version_at_open == LATEST_VERSION
    assert not list(path.parent.glob("*.bak"))


def _refused(path: Path, *fragments: str) -> None:
    before = path.read_bytes()
    with pytest.raises(JournalError) as caught:
        Journal(path, clock=FakeClock()).open()
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert path.read_bytes() == before
    with pytest.raises(JournalError):
        Journal.open_reader(path).close()
    assert path.read_bytes() == before


def test_refuses_a_file_that_is_not_sqlite(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"time,open,high,low,close\n2024-01-01,1,2,0,1\n")
    _refused(path, "not a journal", "storage.journal_path")


def test_refuses_a_foreign_sqlite_database(path: Path) -> None:
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO customers (name) VALUES ('ada')")
    conn.commit()
    conn.close()
    _refused(path, "another application", "storage.journal_path")


def test_refuses_a_journal_from_a_newer_version(path: Path) -> None:
    with Journal(path, clock=FakeClock()) as j:
        j.call(lambda c: c.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}"))
    _refused(path, "newer version of the daemon", "upgrade", "storage.journal_path")


def test_refuses_a_damaged_journal(path: Path) -> None:
    with Journal(path, clock=FakeClock()) as j:
        for i in range(200):
            j.record_event("info", "filler", f"event {i} " + "x" * 100)
        root, page_size = j.call(
            lambda c: (
                c.execute("SELECT rootpage FROM sqlite_master WHERE name = 'events'").fetchone()[0],
                c.execute("PRAGMA page_size").fetchone()[0],
            )
        )
    data = bytearray(path.read_bytes())
    start = (root - 1) * page_size
    data[start : start + 12] = b"\x0d\x00\x00\x00\xff\xff\xff\xff\x00\x00\x00\x00"
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(JournalError, match="damaged"):
        Journal(path, clock=FakeClock()).open()
    assert path.read_bytes() == before


def test_open_reader_never_creates_a_file(path: Path) -> None:
    with pytest.raises(JournalError, match="no journal"):
        Journal.open_reader(path)
    assert not path.exists()
    assert not path.parent.exists()


# -- the writer: commits, batches, failures -------------------------------------------


def test_a_future_resolves_only_after_its_write_is_committed(journal: Journal, path: Path) -> None:
    def count_elsewhere() -> int:
        other = sqlite3.connect(path)
        try:
            return int(other.execute("SELECT count(*) FROM events").fetchone()[0])
        finally:
            other.close()

    during: list[int] = []
    after: list[int] = []

    def op(conn: sqlite3.Connection) -> None:
        insert_event("one")(conn)
        during.append(count_elsewhere())

    called_back = threading.Event()

    def on_done(_fut: object) -> None:
        after.append(count_elsewhere())
        called_back.set()

    fut = journal.submit(op)
    fut.add_done_callback(on_done)
    fut.result(WAIT_S)
    assert count_elsewhere() == 1  # the moment result() returns, another reader sees it
    assert called_back.wait(WAIT_S)
    assert during == [0]  # uncommitted inside the op
    assert after == [1]  # already committed when the writer resolved the future


def test_one_failing_op_does_not_lose_the_others_in_its_batch(journal: Journal, path: Path) -> None:
    gate = Gate()
    gate.hold(journal)
    batches_before = journal.stats.batches_committed
    a = journal.submit(insert_event("a"))
    b = journal.submit(insert_event("b", fail=True))
    c = journal.submit(insert_event("c"))
    gate.release.set()
    assert a.result(WAIT_S) > 0
    assert c.result(WAIT_S) > 0
    with pytest.raises(ValueError, match="op b failed"):
        b.result(WAIT_S)
    assert journal.stats.batches_committed == batches_before + 2  # the gate's, then a-b-c's
    assert messages(path) == ["a", "c"]


def test_batches_hold_at_most_batch_max_ops(path: Path) -> None:
    with Journal(path, clock=FakeClock(), batch_max=3) as j:
        gate = Gate()
        gate.hold(j)
        before = j.stats.batches_committed
        for i in range(10):
            j.submit(insert_event(str(i)))
        last = j.submit(lambda _c: None)
        gate.release.set()
        last.result(WAIT_S)
        assert j.stats.batches_committed == before + 1 + 4  # gate, then 11 ops in 3s
    assert messages(path) == [str(i) for i in range(10)]


def test_committed_rows_follow_submission_order(path: Path) -> None:
    with Journal(path, clock=FakeClock(), batch_max=13) as j:
        futures = [j.submit(insert_event(str(i), fail=(i % 97 == 0))) for i in range(1, 1001)]
        j.flush_sync()
        assert all(f.done() for f in futures)
    expected = [str(i) for i in range(1, 1001) if i % 97 != 0]
    assert messages(path) == expected


CRASH_SCRIPT = """
import os, sys
from datetime import UTC, datetime
from utils.clock import FakeClock
from utils.trade_journal import Journal
path, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
journal = Journal(path, clock=FakeClock(datetime(2024, 1, 2, tzinfo=UTC)), batch_max=7)
journal.open()
futures = [journal.record_event("info", "seq", str(i)) for i in range(n)]
futures[k].result(60)
os._exit(0)  # a crash: the writer may be in the middle of a batch
"""


def test_a_crash_leaves_a_prefix_of_the_submitted_writes(path: Path) -> None:
    path.parent.mkdir(parents=True)
    n, k = 3000, 500
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(path), str(n), str(k)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    with Journal(path, clock=FakeClock()):
        pass  # recovery is just opening again
    got = messages(path)
    assert len(got) >= k + 1
    assert got == [str(i) for i in range(len(got))]


def test_reader_holding_a_snapshot_does_not_block_1000_commits(
    journal: Journal, path: Path
) -> None:
    journal.record_event("info", "k", "first").result(WAIT_S)
    reader = Journal.open_reader(path)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 1
        futures = [journal.record_event("info", "k", f"m{i}") for i in range(1000)]
        for fut in futures:
            fut.result(WAIT_S)
        assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 1
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 1001
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.execute("DELETE FROM events")
    finally:
        reader.close()


def test_close_is_idempotent_and_refuses_later_writes(path: Path) -> None:
    j = Journal(path, clock=FakeClock())
    j.open()
    fut = j.record_event("info", "k", "queued before close")
    j.close()
    assert fut.result(0) > 0  # close wrote everything queued first
    j.close()
    with pytest.raises(JournalError, match="closed"):
        j.record_event("info", "k", "too late")
    j.flush_sync()  # nothing pending: returns at once


# -- trades ---------------------------------------------------------------------------


def test_open_trade_twice_is_one_trade(journal: Journal) -> None:
    first = journal.open_trade(trade_open()).result(WAIT_S)
    again = journal.open_trade(trade_open(volume=5.0)).result(WAIT_S)
    assert first == again
    trades = journal.open_trades()
    assert len(trades) == 1
    t = trades[0]
    assert (t.volume, t.status, t.open_time, t.commission) == (0.1, "open", T0, -0.35)
    assert t.broker_position_id == 7 and t.model_set == "rf:v1,xgb:v2" and t.mode == "paper"


def test_close_trade_sums_commission_and_net_profit_once(journal: Journal) -> None:
    journal.open_trade(trade_open())
    assert journal.close_trade(trade_close()).result(WAIT_S) is True
    assert journal.close_trade(trade_close(profit=999.0)).result(WAIT_S) is False
    assert journal.open_trades() == []
    (t,) = journal.closed_trades()
    assert t.status == "closed" and t.close_reason == "tp" and t.bars_held == 5
    assert t.close_time == T0 + timedelta(minutes=5)
    assert t.profit == 20.0
    assert t.commission == pytest.approx(-0.70)
    assert t.swap == pytest.approx(-0.1)
    assert t.net_profit == pytest.approx(20.0 - 0.70 - 0.1)


def test_closing_an_unknown_trade_raises(journal: Journal) -> None:
    with pytest.raises(UnknownTradeError, match="NOPE"):
        journal.close_trade(trade_close("NOPE")).result(WAIT_S)


def test_trade_values_are_validated_where_they_are_built() -> None:
    with pytest.raises(ValueError, match="side"):
        trade_open(side="long")
    with pytest.raises(ValueError, match="naive"):
        trade_open(open_time=datetime(2024, 1, 2, 9, 0))  # noqa: DTZ001 - the point of the test
    with pytest.raises(ValueError, match="volume"):
        trade_open(volume=0.0)


def test_realized_pnl_sums_closed_trades_only(journal: Journal) -> None:
    journal.open_trade(trade_open("A"))
    journal.open_trade(trade_open("B"))
    journal.open_trade(trade_open("C"))
    journal.close_trade(trade_close("A", profit=10.0, commission=0.0, swap=0.0))
    journal.close_trade(trade_close("B", profit=-4.0, commission=-0.15, swap=0.0))
    # A: 10 - 0.35; B: -4 - 0.35 - 0.15; C still open
    assert journal.realized_pnl() == pytest.approx(10 - 0.35 - 4 - 0.5)
    assert [t.client_order_id for t in journal.open_trades()] == ["C"]


def test_closed_trades_since_compares_times_not_text(journal: Journal) -> None:
    times = {
        "early": datetime(2024, 1, 2, 8, 59, 59, 900000, tzinfo=UTC),
        "whole": datetime(2024, 1, 2, 9, 0, 0, tzinfo=UTC),  # stored without a fraction
        "half": datetime(2024, 1, 2, 9, 0, 0, 500000, tzinfo=UTC),
    }
    for coid, moment in times.items():
        journal.open_trade(trade_open(coid))
        journal.close_trade(trade_close(coid, close_time=moment))
    journal.flush_sync()
    assert [t.client_order_id for t in journal.closed_trades()] == ["early", "whole", "half"]
    since_whole = journal.closed_trades(times["whole"])
    assert [t.client_order_id for t in since_whole] == ["whole", "half"]
    since_third = journal.call(
        lambda c: fetch_closed_trades(c, datetime(2024, 1, 2, 9, 0, 0, 300000, tzinfo=UTC))
    )
    assert [t.client_order_id for t in since_third] == ["half"]


# -- other records and reads ----------------------------------------------------------


def test_state_round_trips_json_and_is_snapshotted_at_submit(
    journal: Journal, fake_clock: FakeClock
) -> None:
    losses = [1, 2]
    journal.set_state("risk.state", {"day": "2024-01-02", "losses": losses})
    losses.append(3)  # a later mutation does not reach the journal
    assert journal.get_state("risk.state") == {"day": "2024-01-02", "losses": [1, 2]}
    fake_clock.advance(60)
    journal.set_state("risk.state", {"day": "2024-01-03"})
    assert journal.get_state("risk.state") == {"day": "2024-01-03"}
    assert journal.get_state("missing", default=42) == 42
    updated = journal.call(
        lambda c: c.execute("SELECT updated FROM state WHERE key = 'risk.state'").fetchone()[0]
    )
    assert updated == iso_utc(T0 + timedelta(seconds=60))


def test_events_filter_by_minimum_level_newest_first(journal: Journal) -> None:
    journal.record_event("info", "started", "hello")
    journal.record_event("WARNING", "spread", "wide spread", {"points": 40})
    journal.record_event("error", "broker", "disconnected")
    journal.record_event("critical", "halt", "trading halted")
    events = journal.last_events(5, "warning")
    assert [e.kind for e in events] == ["halt", "broker", "spread"]
    assert events[-1].details == {"points": 40} and events[-1].time == T0
    assert [e.kind for e in journal.last_events(2, "info")] == ["halt", "broker"]
    with pytest.raises(ValueError, match="level"):
        journal.record_event("loud", "k", "m")


def test_orders_equity_predictions_model_events_and_training_runs(journal: Journal) -> None:
    assert journal.max_position_id() is None
    assert journal.last_equity() is None
    journal.record_order(
        time=T0,
        client_order_id="T1",
        symbol="EURUSD",
        action="open",
        side="buy",
        volume=0.1,
        price=None,
        sl=1.099,
        tp=1.102,
        position_id=None,
        retcode=10009,
        retcode_name="DONE",
        result_price=1.1,
        result_volume=0.1,
        comment="",
        request={"symbol": "EURUSD", "at": T0},
        result={"retcode": 10009, "position_id": 41},
    )
    journal.record_order(
        time=T0, client_order_id="C1", symbol="EURUSD", action="close", position_id=41
    )
    journal.open_trade(trade_open(broker_position_id=12))
    assert journal.max_position_id() == 41
    journal.record_equity(T0, 1000.0, 1001.5, 11.0, 990.5, 1)
    journal.record_equity(T0 + timedelta(minutes=1), 1000.0, 1003.0, 11.0, 992.0, 1)
    eq = journal.last_equity()
    assert eq is not None and eq.equity == 1003.0 and eq.time == T0 + timedelta(minutes=1)
    assert (
        journal.record_predictions(
            [
                PredictionRow(T0, T0, "EURUSD", m, "v1", "shadow", 0.1, 0.2, 0.7)
                for m in ("rf", "xgb")
            ]
        ).result(WAIT_S)
        == 2
    )
    journal.record_model_event("promoted", symbol="EURUSD", kind="rf", version="v1")
    run_id = journal.record_training_run(
        started=T0, symbol="EURUSD", kind="rf", status="running"
    ).result(WAIT_S)
    journal.finish_training_run(
        run_id, finished=T0 + timedelta(minutes=2), status="done", version="v2", metrics={"f1": 0.5}
    ).result(WAIT_S)
    row = journal.call(
        lambda c: c.execute(
            "SELECT o.request_json, r.status, r.version, r.metrics_json, "
            "(SELECT count(*) FROM model_events) FROM orders o, training_runs r WHERE o.id = 1"
        ).fetchone()
    )
    assert row == (
        '{"at":"2024-01-02T09:00:00Z","symbol":"EURUSD"}',
        "done",
        "v2",
        '{"f1":0.5}',
        1,
    )


# -- async use ------------------------------------------------------------------------


def test_async_writes_never_block_the_event_loop(path: Path) -> None:
    async def scenario() -> tuple[int, int, bool]:
        with Journal(path, clock=FakeClock()) as j:
            trade_id = await j.open_trade(trade_open())
            gate = Gate()
            gate.hold(j)
            task = asyncio.create_task(j.run(insert_event("while held")))
            for _ in range(10):
                await asyncio.sleep(0)  # the loop keeps running while the writer is busy
            pending_while_held = not task.done()
            gate.release.set()
            await task
            closed = await j.close_trade(trade_close())
            await j.flush()
            count = await j.run(
                lambda c: int(c.execute("SELECT count(*) FROM events").fetchone()[0])
            )
            return trade_id, count, pending_while_held and closed

    trade_id, count, ok = asyncio.run(scenario())
    assert trade_id == 1 and count == 1 and ok


def test_cancelling_the_waiting_task_does_not_drop_the_write(path: Path) -> None:
    async def scenario() -> None:
        with Journal(path, clock=FakeClock()) as j:
            gate = Gate()
            gate.hold(j)
            task = asyncio.create_task(j.run(insert_event("must survive")))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            gate.release.set()
            await j.flush()

    asyncio.run(scenario())
    assert messages(path) == ["must survive"]


# -- summary --------------------------------------------------------------------------


def test_summary_numbers_on_a_hand_built_journal(path: Path) -> None:
    clock = FakeClock(T0)
    yesterday = T0 - timedelta(days=1)
    with Journal(path, clock=clock) as j:
        # yesterday: one win of 50 (net 49.3)
        j.open_trade(trade_open("Y", open_time=yesterday))
        j.close_trade(trade_close("Y", close_time=yesterday + timedelta(hours=1), profit=50.0))
        # today: two wins, one loss
        for coid, profit in (("A", 10.0), ("B", 5.0), ("C", -8.0)):
            j.open_trade(trade_open(coid))
            j.close_trade(trade_close(coid, profit=profit, commission=-0.5, swap=0.0))
        j.open_trade(trade_open("OPEN1", side="sell"))
        j.record_equity(T0, 1000.0, 1002.0, 10.0, 992.0, 1)
        j.record_equity(T0 + timedelta(minutes=10), 1006.0, 1004.0, 10.0, 994.0, 1)
        j.record_event("info", "noise", "not shown")
        for i in range(7):
            j.record_event("warning" if i % 2 else "error", f"k{i}", f"problem {i}")
        j.set_state(HEARTBEAT_KEY, iso_utc(T0))
    now = T0 + timedelta(hours=2)
    conn = Journal.open_reader(path)
    try:
        s = summary(conn, now)
    finally:
        conn.close()
    assert s.schema_version == LATEST_VERSION
    assert s.last_equity is not None and s.last_equity.equity == 1004.0
    assert [t.client_order_id for t in s.open_trades] == ["OPEN1"]
    assert s.trades_today == 3 and s.wins_today == 2
    assert s.win_rate_today == pytest.approx(2 / 3)
    each_cost = -0.35 - 0.5
    assert s.pnl_today == pytest.approx(10 + 5 - 8 + 3 * each_cost)
    assert s.trades_total == 4
    assert s.pnl_total == pytest.approx(s.pnl_today + 50 - 0.35 - 0.35 - 0.1)
    assert [e.kind for e in s.last_errors] == ["k6", "k5", "k4", "k3", "k2"]
    assert s.heartbeat == iso_utc(T0)
    assert s.heartbeat_updated == T0 and s.heartbeat_age_s == 7200.0


def test_summary_of_a_fresh_journal_has_no_win_rate(path: Path) -> None:
    with Journal(path, clock=FakeClock()):
        pass
    conn = Journal.open_reader(path)
    try:
        s = summary(conn, T0)
    finally:
        conn.close()
    assert (s.trades_today, s.win_rate_today, s.pnl_today, s.pnl_total) == (0, None, 0.0, 0.0)
    assert s.last_equity is None and s.heartbeat is None and s.open_trades == ()


def test_prune_predictions_deletes_only_that_symbols_older_bars(journal: Journal) -> None:
    t0 = datetime(2024, 3, 1, tzinfo=UTC)

    def row(symbol: str, minutes: int) -> PredictionRow:
        when = t0 + timedelta(minutes=minutes)
        return PredictionRow(when, when, symbol, "xgb", "1.0.0", "production", 0.2, 0.5, 0.3)

    rows = [row(s, m) for s in ("EURUSD", "GBPUSD") for m in (0, 59, 60, 61, 120)]
    assert journal.record_predictions(rows).result() == 10
    # Bars opened before 01:00 go; 01:00 itself stays (the cut-off is exclusive).
    deleted = journal.prune_predictions("EURUSD", t0 + timedelta(minutes=60, microseconds=5))
    assert deleted.result() == 2
    left = journal.call(
        lambda c: c.execute(
            "SELECT symbol, bar_time FROM predictions ORDER BY symbol, bar_time"
        ).fetchall()
    )
    assert [r[1][11:16] for r in left if r[0] == "EURUSD"] == ["01:00", "01:01", "02:00"]
    assert len([r for r in left if r[0] == "GBPUSD"]) == 5
