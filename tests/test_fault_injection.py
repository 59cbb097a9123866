"""Fault injection (short form): kills at random instants, a full disk, readers, a stalled feed.

The SIGKILL drills are the CI form of ``bench/faults.py`` (same code, fewer
kills, seeded instants): a child saving model versions is killed 30 times and
the paper daemon 10 times (random instants and deterministic crash points),
each kill followed by the checks a restart relies on. A full disk is injected
into the model store's file writes and into the journal's commits; readers
hold the journal open while it is written; a polling feed stalls, then bursts.
Assertions are on invariants, never on timings.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bench import faults
from config.settings import load_settings
from execution.broker import AccountInfo
from market_data.bars import Bar
from market_data.feeds import PollingFeed, ReplayFeed
from ml import store as store_mod
from ml.store import ModelStore, StoreError
from utils.clock import FakeClock, iso_utc
from utils.trade_journal import Journal, JournalError, TradeOpen

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2024, 1, 2, 9, 0, tzinfo=UTC)
WAIT_S = 60.0  # upper bound on any wait; tests never sleep for a fixed time otherwise
POSIX_KILL = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX SIGKILL")
S, K = "EURUSD", "rf"


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.005)


def query(path: Path, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path, timeout=30)
    try:
        return conn.execute(sql, tuple(params)).fetchall()
    finally:
        conn.close()


# --------------------------------------------------------------------------- a) model store


@POSIX_KILL
def test_sigkill_while_saving_models_leaves_a_loadable_store_that_verifies(
    tmp_path: Path,
) -> None:
    """30 SIGKILLs at seeded random instants while a child saves and promotes versions."""
    report = faults.store_kills(tmp_path, kills=30, seed=20240607)
    assert report.failures == []
    assert report.kills == 30
    assert report.versions_committed > 30 and report.promotions > 10


# --------------------------------------------------------------------------- b) paper daemon


@POSIX_KILL
def test_sigkill_the_paper_daemon_ten_times_loses_and_duplicates_no_trade(
    tmp_path: Path,
) -> None:
    """10 kills in a row (7 at random instants, 3 crash points), a restart after each."""
    report = faults.daemon_kills(
        tmp_path, kills=10, seed=7, crash_points=("order:3", "trade:2", "bar:150")
    )
    assert report.failures == []
    assert report.kills == 10 and len(report.crash_points) == 3
    assert report.trades > 50 and report.closed > 0
    assert report.entry_fills == report.trades
    assert report.balance == pytest.approx(report.expected_balance, abs=0.005)


# --------------------------------------------------------------------------- c) disk full: store


class DiskFull:
    """ENOSPC from the store's file writes, fsyncs or renames, while ``active``."""

    def __init__(self, site: str) -> None:
        self.site = site
        self.active = False
        self.hits = 0

    def _fail(self, what: str) -> None:
        self.hits += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open, real_fsync, real_replace = open, os.fsync, os.replace
        fault = self

        class Handle:
            def __init__(self, inner: Any, name: str) -> None:
                self._inner, self._name = inner, name

            def write(self, data: bytes) -> int:
                if fault.active and fault.site == self._name:
                    fault._fail(self._name)
                return int(self._inner.write(data))

            def __getattr__(self, attr: str) -> Any:
                return getattr(self._inner, attr)

            def __enter__(self) -> Handle:
                return self

            def __exit__(self, *exc: object) -> None:
                self._inner.close()

        def fake_open(path: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:
            return Handle(real_open(path, mode, *args, **kw), Path(path).name)

        def fake_fsync(fd: int) -> None:
            if fault.active and fault.site == "fsync":
                fault._fail("fsync")
            real_fsync(fd)

        def fake_replace(src: Any, dst: Any) -> None:
            if fault.active and fault.site == "rename" and Path(src).name.startswith(".tmp-"):
                fault._fail("rename")
            real_replace(src, dst)

        monkeypatch.setattr(store_mod, "open", fake_open, raising=False)
        monkeypatch.setattr(store_mod.os, "fsync", fake_fsync)
        monkeypatch.setattr(store_mod.os, "replace", fake_replace)


def save_version(store: ModelStore, i: int, *, promote: bool) -> str:
    """A version saved the way ModelManager saves one: draft, commit (discard on failure)."""
    draft = store.new_draft_dir(S, K)
    try:
        (draft / "model.onnx").write_bytes(bytes([i % 256]) * 5000)
        (draft / "scaler.json").write_text(json.dumps({"mean": [i]}), encoding="utf-8")
        info = store.commit_draft(
            draft,
            symbol=S,
            kind=K,
            manifest={"feature_hash": "f", "architecture": "a", "hyperparams": {}},
        )
    except BaseException:
        store.discard_draft(draft)
        raise
    store.set_stage(S, K, info.version, "validated")
    if promote:
        store.promote(S, K, info.version)
    return info.version


def leftovers(root: Path) -> list[str]:
    kdir = root / S / K
    return sorted(p.name for p in kdir.iterdir() if p.name.startswith(".tmp-") or ".tmp" in p.name)


def models_verify_ok(root: Path) -> bool:
    from ml.cli_models import models_verify

    out = io.StringIO()
    settings = load_settings(environ={"SCALPER__STORAGE__MODELS_DIR": str(root)})
    rc = models_verify(settings, out=out, clock=FakeClock())
    return rc == 0 and "FAILED" not in out.getvalue()


@pytest.mark.parametrize(
    "site",
    ["fsync", "manifest.json", "rename", "stages.json.tmp", "aliases.json.tmp"],
)
def test_disk_full_during_a_model_save_fails_cleanly_and_production_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, site: str
) -> None:
    root = tmp_path / "models"
    store = ModelStore(root, clock=FakeClock(), retention=5)
    production = save_version(store, 1, promote=True)
    fault = DiskFull(site)
    fault.install(monkeypatch)
    fault.active = True
    with pytest.raises((StoreError, OSError)) as raised:
        save_version(store, 2, promote=True)
    assert fault.hits >= 1
    assert "No space left on device" in str(raised.value)
    fault.active = False
    # Nothing corrupted, nothing half-done visible, production unchanged.
    assert store.aliases(S, K)["production"] == production
    assert leftovers(root) == []
    assert store.verify(S, K) == []
    resolved = store.resolve(S, K)
    assert resolved is not None and resolved.version == production
    # A restart finds nothing to clean; the next save works and is served.
    restarted = ModelStore(root, clock=FakeClock(), retention=5)
    assert restarted.cleanup_leftovers() == []
    after = save_version(restarted, 3, promote=True)
    assert restarted.aliases(S, K)["production"] == after
    assert restarted.verify(S, K) == []
    assert models_verify_ok(root)


def test_disk_full_in_a_training_run_is_a_failed_run_and_the_daemon_keeps_its_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ModelManager.train_one (the daemon's path) with ENOSPC while committing the draft."""
    from ml.model_manager import ModelManager, TrainingRequest
    from ml.predictor_map import PredictorMap
    from ml.store import journal_hook
    from ml.training import TrainJob, TrainOutcome
    from strategy.baseline import MomentumBaseline
    from strategy.features import BarColumns, FeatureSpec

    class Backend:
        def submit(self, job: TrainJob) -> Future[TrainOutcome]:
            (Path(job.draft_dir) / "model.onnx").write_bytes(b"onnx" * 1000)
            fut: Future[TrainOutcome] = Future()
            fut.set_result(
                TrainOutcome(job.symbol, job.kind, job.draft_dir, {"hyperparams": {}}, {}, 0.1)
            )
            return fut

        def reset(self) -> None: ...

        def shutdown(self) -> None: ...

    clock = FakeClock(T0)
    settings = load_settings(environ={"SCALPER__STORAGE__MODELS_DIR": str(tmp_path / "models")})
    journal = Journal(tmp_path / "journal.sqlite3", clock=clock)
    journal.open()
    try:
        store = ModelStore(tmp_path / "models", clock=clock, on_event=journal_hook(journal))
        production = save_version(store, 1, promote=True)
        predictors = PredictorMap()
        manager = ModelManager(
            settings=settings,
            store=store,
            backend=Backend(),
            predictors=predictors,
            journal=journal,
            clock=clock,
            feature_spec=FeatureSpec(),
            cache_dir=tmp_path / "cache",
            recent_rows=lambda symbol: [],
            call_in_loop=lambda fn: fn(),
            baseline=lambda: MomentumBaseline(FeatureSpec()),
        )
        bars = [Bar(S, T0 + timedelta(minutes=i), 1.1, 1.1, 1.1, 1.1, 1, 10) for i in range(50)]
        request = TrainingRequest(S, (K,), BarColumns.from_bars(bars), "test", 50, validate=False)
        fault = DiskFull("manifest.json")
        fault.install(monkeypatch)
        fault.active = True
        assert manager.train_one(request, K) is None  # never raises: a failed run
        fault.active = False
        journal.flush_sync()
        run = query(tmp_path / "journal.sqlite3", "SELECT status, error FROM training_runs")
        assert run == [("failed", run[0][1])]
        assert "No space left on device" in run[0][1] and "nothing was registered" in run[0][1]
        events = query(
            tmp_path / "journal.sqlite3", "SELECT message FROM events WHERE kind='training_failed'"
        )
        assert len(events) == 1 and "No space left on device" in events[0][0]
        assert store.aliases(S, K)["production"] == production
        assert [v.version for v in store.versions(S, K)] == [production]
        assert leftovers(tmp_path / "models") == []
        assert store.verify(S, K) == []
        manager.stop()
    finally:
        journal.close()


# --------------------------------------------------------------------------- c) disk full: journal


def insert(message: str) -> Callable[[sqlite3.Connection], int]:
    def op(conn: sqlite3.Connection) -> int:
        cur = conn.execute(
            "INSERT INTO events (time, level, kind, message) VALUES (?, 'info', 'test', ?)",
            (iso_utc(T0), message),
        )
        return int(cur.lastrowid or 0)

    return op


def messages(path: Path, kind: str = "test") -> list[str]:
    return [
        r[0] for r in query(path, "SELECT message FROM events WHERE kind = ? ORDER BY id", (kind,))
    ]


class StateLog:
    """Records ``on_write_state`` calls (writer thread) and lets a test wait for them."""

    def __init__(self) -> None:
        self.states: list[str | None] = []
        self.changed = threading.Condition()

    def __call__(self, state: str | None) -> None:
        with self.changed:
            self.states.append(state)
            self.changed.notify_all()

    def wait_for(self, n: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.states) >= n, WAIT_S), self.states


def full_on_commit(journal: Journal, monkeypatch: pytest.MonkeyPatch, kind: str) -> threading.Event:
    """While the returned event is set, every commit (or the op itself) fails like a full disk."""
    full = threading.Event()
    real_commit, real_begin = journal._commit, journal._begin

    def commit(conn: sqlite3.Connection) -> None:
        if full.is_set():
            if kind == "oserror":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise sqlite3.OperationalError("database or disk is full")
        real_commit(conn)

    def begin(conn: sqlite3.Connection) -> None:
        # The real SQLITE_FULL: the database may not grow past its current size, so an
        # insert fails inside the op (statement level), not at commit.
        pages = "(SELECT page_count FROM pragma_page_count())"
        limit = conn.execute(f"SELECT {pages}").fetchone()[0] if full.is_set() else 1073741823
        conn.execute(f"PRAGMA max_page_count = {int(limit)}")
        real_begin(conn)

    if kind == "sqlite_full":
        monkeypatch.setattr(journal, "_begin", begin)
    else:
        monkeypatch.setattr(journal, "_commit", commit)
    return full


@pytest.mark.parametrize("kind", ["commit_full", "oserror", "sqlite_full"])
def test_disk_full_journal_writes_are_retried_in_order_and_the_failure_is_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path, clock=FakeClock(T0), retry_backoff_s=(0.001, 0.01))
    states = StateLog()
    journal.on_write_state = states
    journal.open()
    try:
        journal.submit(insert("before")).result(WAIT_S)
        full = full_on_commit(journal, monkeypatch, kind)
        full.set()
        big = "x" * 300_000  # larger than any free page: a real SQLITE_FULL needs to grow
        futures = [journal.submit(insert(f"{i}:{big if i == 0 else ''}")) for i in range(20)]
        trade = journal.open_trade(
            TradeOpen("C1", S, "buy", 0.1, T0, 1.1, None, None, 1, -0.35, None, "b", "paper")
        )
        states.wait_for(1)
        assert states.states[0] is not None and states.states[0].startswith(
            "journal write failing: "
        )
        assert journal.write_failure == states.states[0]
        assert ("full" in states.states[0]) or ("No space" in states.states[0])
        wait_until(lambda: journal.stats.batches_failed >= 3, "retries")
        assert not any(f.done() for f in [*futures, trade])  # waiting, not dropped
        full.clear()
        for fut in futures:
            fut.result(WAIT_S)
        assert trade.result(WAIT_S) > 0
        states.wait_for(2)
        assert states.states[1:] == [None] and journal.write_failure is None
        assert journal.stats.ops_failed == 0
    finally:
        journal.close()
    got = messages(path)
    assert got[0] == "before" and [m.split(":")[0] for m in got[1:]] == [str(i) for i in range(20)]
    assert query(path, "SELECT client_order_id FROM trades") == [("C1",)]
    recovered = messages(path, "journal_write_recovered")
    assert len(recovered) == 1 and "every queued write was saved" in recovered[0]
    assert query(path, "PRAGMA integrity_check") == [("ok",)]


def test_closing_during_an_outage_gives_up_after_close_timeout_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path, clock=FakeClock(T0), retry_backoff_s=(0.001, 0.01), close_timeout_s=0.2)
    journal.open()
    journal.submit(insert("kept")).result(WAIT_S)
    full_on_commit(journal, monkeypatch, "commit_full").set()
    pending = [journal.submit(insert(f"lost {i}")) for i in range(3)]
    wait_until(lambda: journal.write_failure is not None, "the failing state")
    journal.close()  # returns: it does not wait for the disk forever
    for fut in pending:
        with pytest.raises(JournalError, match="kept failing"):
            fut.result(0)
    monkeypatch.undo()
    assert messages(path) == ["kept"]


def test_an_atomic_group_commits_together_or_not_at_all(tmp_path: Path) -> None:
    """Order row and trade row of one entry land in one operation (never split by a crash)."""
    path = tmp_path / "journal.sqlite3"
    with Journal(path, clock=FakeClock(T0)) as journal:
        with journal.atomic():
            a = journal.submit(insert("order A"))
            b = journal.open_trade(
                TradeOpen("A1", S, "buy", 0.1, T0, 1.1, None, None, 1, 0.0, None, "b", "paper")
            )
            assert not a.done()  # queued only when the block ends
        assert a.result(WAIT_S) > 0 and b.result(WAIT_S) > 0

        def boom(_conn: sqlite3.Connection) -> None:
            raise ValueError("the second write fails")

        with journal.atomic():
            c = journal.submit(insert("order B"))
            d = journal.submit(boom)
        for fut in (c, d):
            with pytest.raises(ValueError, match="second write"):
                fut.result(WAIT_S)
        with pytest.raises(RuntimeError, match="atomic"), journal.atomic():
            journal.call(insert("inside"))
    assert messages(path) == ["order A"]


def test_the_daemon_halts_entries_while_the_journal_disk_is_full_and_resumes_after(
    tmp_path: Path,
) -> None:
    """The paper daemon in-process: ENOSPC on the journal's commits for a while.

    The journal's failing state, wired by ``main.start_daemon`` to the strategy's
    halts and an alert, stops new entries with the reason; the loop keeps running
    (no position is open, so no trade write is awaited); nothing queued during
    the outage is lost; trading resumes when writes succeed again.
    """
    from main import serve as serve_daemon
    from main import start_daemon

    env = {**faults.daemon_env(tmp_path), "SCALPER__PAPER__REPLAY_BARS_PER_S": "0"}
    settings = load_settings(environ={k: v for k, v in env.items() if k.startswith("SCALPER__")})
    halted_bars = 0
    entries_while_halted = 0
    states = StateLog()

    async def main() -> int:
        nonlocal halted_bars, entries_while_halted
        daemon = await start_daemon(settings, clock=FakeClock(T0), max_bars=1500)
        journal, strategy = daemon.journal, daemon.strategy
        wired = journal.on_write_state
        assert wired is not None, "main.start_daemon wires the journal's failing state"

        def on_write_state(state: str | None) -> None:
            states(state)
            wired(state)

        journal.on_write_state = on_write_state
        full = threading.Event()
        lifted = False
        real_commit = journal._commit

        def commit(conn: sqlite3.Connection) -> None:
            if full.is_set():
                raise sqlite3.OperationalError("database or disk is full")
            real_commit(conn)

        journal._commit = commit  # type: ignore[method-assign]
        real_on_bar = strategy.on_bar

        async def on_bar(bar: Bar) -> None:
            nonlocal halted_bars, entries_while_halted, lifted
            if full.is_set() and halted_bars >= 20:
                # Space again after 20 halted bars, whatever the machine's speed: the
                # loop waits for the writer's next retry to commit and clear the halt.
                full.clear()
                lifted = True
                deadline = time.monotonic() + WAIT_S
                while journal.write_failure is not None or strategy.entries_halted:
                    assert time.monotonic() < deadline, "the recovery never reached the loop"
                    await asyncio.sleep(0.001)
            armed = full.is_set() or lifted
            if (
                not armed
                and daemon.engine.stats.bars >= 300
                and not await daemon.broker.positions()
            ):
                full.set()
                journal.set_state("test.disk_full_from", iso_utc(bar.time))  # fails at once
                deadline = time.monotonic() + WAIT_S
                while strategy.entries_halted is None:
                    assert time.monotonic() < deadline, "the failing state never reached the loop"
                    await asyncio.sleep(0.001)
            if strategy.entries_halted:
                halted_bars += 1
                before = strategy.status.entries
                await real_on_bar(bar)
                entries_while_halted += strategy.status.entries - before
            else:
                await real_on_bar(bar)

        strategy.on_bar = on_bar  # type: ignore[method-assign]
        try:
            rc = await serve_daemon(daemon, install_signals=False, command_poll_s=None)
        finally:
            journal.close()
        assert lifted
        return rc

    assert asyncio.run(main()) == 0
    journal = tmp_path / "journal.sqlite3"
    assert states.states == ["journal write failing: database or disk is full", None]
    assert halted_bars >= 20 and entries_while_halted == 0
    blocked = query(journal, "SELECT message FROM events WHERE kind = 'entries_blocked'")
    assert any("journal write failing: database or disk is full" in m for (m,) in blocked)
    assert len(messages(journal, "journal_write_recovered")) == 1
    alerts = query(journal, "SELECT level, message FROM events WHERE kind = 'trading_halted'")
    assert [level for level, _ in alerts] == ["error"]
    assert "journal write failing: database or disk is full" in alerts[0][1]
    # Trading went on after the outage, and every fill is a trade.
    after = query(
        journal,
        "SELECT count(*) FROM trades WHERE open_time > "
        "(SELECT json_extract(value, '$') FROM state WHERE key = 'test.disk_full_from')",
    )
    assert after[0][0] > 0
    ledger = faults.TradeLedger()
    assert ledger.check(journal, "after the outage") == []
    report = faults.DaemonKillReport()
    assert faults._account_identity(journal, report) == []
    assert query(journal, "PRAGMA integrity_check") == [("ok",)]


class SimulatedKill(BaseException):
    """Stops the journal's writer right after a commit: what the file holds is a crash's."""


ORPHAN_FILLS = (
    "SELECT count(*) FROM orders WHERE action = 'open' AND retcode = 10009 AND "
    "client_order_id NOT IN (SELECT client_order_id FROM trades)"
)


def test_a_crash_right_after_an_entry_order_commits_keeps_its_trade_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic: the writer dies right after the first commit that holds a fill
    without its trade (one op per batch, a valid setting, makes that commit happen)."""
    from main import serve as serve_daemon
    from main import start_daemon

    env = {**faults.daemon_env(tmp_path), "SCALPER__STORAGE__JOURNAL_BATCH_MAX": "1"}
    settings = load_settings(environ={k: v for k, v in env.items() if k.startswith("SCALPER__")})
    killed: list[str] = []
    hook = threading.excepthook

    def quiet(args: threading.ExceptHookArgs) -> None:
        if not isinstance(args.exc_value, SimulatedKill):
            hook(args)

    monkeypatch.setattr(threading, "excepthook", quiet)

    async def main() -> None:
        daemon = await start_daemon(settings, clock=FakeClock(T0), max_bars=2000)
        journal = daemon.journal
        real_commit = journal._commit

        def commit(conn: sqlite3.Connection) -> None:
            orphans = conn.execute(ORPHAN_FILLS).fetchone()[0]
            real_commit(conn)
            if orphans:
                killed.append("after an entry's order row")
                raise SimulatedKill

        journal._commit = commit  # type: ignore[method-assign]
        try:
            await serve_daemon(daemon, install_signals=False, command_poll_s=None)
        except (JournalError, SimulatedKill):
            pass  # the writer is gone: the daemon cannot even journal its stop
        finally:
            journal.close()

    asyncio.run(main())
    journal = tmp_path / "journal.sqlite3"
    assert query(journal, ORPHAN_FILLS) == [(0,)], f"a fill without its trade ({killed})"


# --------------------------------------------------------------------------- d) readers


def test_readers_holding_the_journal_open_never_fail_a_write(tmp_path: Path) -> None:
    """A reader in a long read transaction, then another process's brief write lock."""
    path = tmp_path / "journal.sqlite3"
    states = StateLog()
    with Journal(path, clock=FakeClock(T0), busy_timeout_ms=2000) as journal:
        journal.on_write_state = states
        journal.submit(insert("first")).result(WAIT_S)
        reader = Journal.open_reader(path)
        try:
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM events").fetchone() == (1,)
            for fut in [journal.submit(insert(f"r{i}")) for i in range(500)]:
                fut.result(WAIT_S)
            assert reader.execute("SELECT count(*) FROM events").fetchone() == (1,)
            reader.execute("COMMIT")
        finally:
            reader.close()
        # A browser-like client takes the write lock for a moment (under busy_timeout).
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            waiting = [journal.submit(insert(f"w{i}")) for i in range(50)]
            wait_until(lambda: journal.stats.queued == 0, "the writer to take the batch")
            assert not any(f.done() for f in waiting)
            locker.execute("COMMIT")
        finally:
            locker.close()
        for fut in waiting:
            fut.result(WAIT_S)
        assert states.states == [] and journal.stats.batches_failed == 0
    assert len(messages(path)) == 551


def test_a_write_lock_held_past_the_busy_timeout_is_a_visible_outage_not_a_crash(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.sqlite3"
    states = StateLog()
    journal = Journal(path, clock=FakeClock(T0), busy_timeout_ms=50, retry_backoff_s=(0.001, 0.02))
    journal.on_write_state = states
    journal.open()
    try:
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            waiting = [journal.submit(insert(f"w{i}")) for i in range(10)]
            states.wait_for(1)
            assert states.states[0] == "journal write failing: database is locked"
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        for fut in waiting:
            fut.result(WAIT_S)
        states.wait_for(2)
        assert states.states[-1] is None
    finally:
        journal.close()
    assert messages(path) == [f"w{i}" for i in range(10)]


@pytest.mark.skipif(sys.platform == "win32", reason="runs the daemon as a POSIX child")
def test_the_daemon_keeps_writing_while_a_reader_holds_a_snapshot_and_a_lock(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "journal.sqlite3"
    err_path = tmp_path / "daemon.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "run", "--max-bars", "2500"],
            cwd=ROOT,
            env=faults.daemon_env(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            wait_until(lambda: faults._last_bar(journal) is not None, "the first bar")
            # A reader (a status, a SQLite browser) holds one snapshot open ...
            reader = sqlite3.connect(f"{journal.resolve().as_uri()}?mode=ro", uri=True)
            reader.execute("BEGIN")
            held = reader.execute("SELECT count(*) FROM trades").fetchone()[0]
            start = bar_time(journal)
            # ... while the daemon commits a few hundred more bars past it.
            wait_until(
                lambda: (
                    proc.poll() is not None or bar_time(journal) - start >= timedelta(minutes=300)
                ),
                "300 more bars",
            )
            assert proc.poll() is None, "the daemon stopped while a reader held a snapshot"
            assert reader.execute("SELECT count(*) FROM trades").fetchone()[0] == held
            # A brief write lock, the way a SQLite browser takes one, under busy_timeout.
            locker = sqlite3.connect(journal, isolation_level=None)
            locker.execute("BEGIN IMMEDIATE")
            locked_at = faults._last_bar(journal)
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
            locker.execute("ROLLBACK")
            locker.close()
            reader.execute("COMMIT")
            reader.close()
            assert proc.wait(timeout=WAIT_S) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = err_path.read_text(encoding="utf-8", errors="replace")
    for bad in ("database is locked", "journal_write_failing", "Traceback"):
        assert bad not in text, text[-2000:]
    assert faults._last_bar(journal) != locked_at
    assert query(journal, "PRAGMA integrity_check") == [("ok",)]
    assert faults.TradeLedger().check(journal, "reader run") == []


def bar_time(journal: Path) -> datetime:
    from utils.clock import parse_iso_utc

    value = faults._last_bar(journal)
    assert value is not None
    return parse_iso_utc(json.loads(value))


# --------------------------------------------------------------------------- e) feed stalls


class StallingSource:
    """A broker whose closed bars stop coming for a while, then arrive all at once."""

    def __init__(self, bars: list[Bar], clock: FakeClock) -> None:
        self.bars = bars
        self.clock = clock
        self.stall: tuple[datetime, datetime] | None = None  # (from, until), clock time
        self.probes: list[float | None] = []
        self.probe: Callable[[], float | None] | None = None

    def stall_for(self, minutes: int) -> None:
        now = self.clock.now()
        self.stall = (now, now + timedelta(minutes=minutes))

    async def closed_bars(self, symbol: str, count: int) -> list[Bar]:
        if self.probe is not None:
            self.probes.append(self.probe())
        seen_at = self.clock.now()
        if self.stall is not None and self.stall[0] <= seen_at < self.stall[1]:
            seen_at = self.stall[0]  # the terminal shows nothing new while it stalls
        visible = [b for b in self.bars if b.time + timedelta(minutes=1) <= seen_at]
        return visible[-count:]


def minute_bars(n: int, skip: frozenset[int] = frozenset()) -> list[Bar]:
    return [
        Bar(S, T0 + timedelta(minutes=i), 1.1, 1.1, 1.1, 1.1, 1, 10)
        for i in range(n)
        if i not in skip
    ]


def test_a_stalled_polling_feed_shows_the_stall_then_backfills_and_counts_the_burst() -> None:
    clock = FakeClock(T0 + timedelta(minutes=3))
    source = StallingSource(minute_bars(40, skip=frozenset({20, 21})), clock)
    feed = PollingFeed(source, [S], clock=clock, timeframe_s=60, poll_interval_s=60)

    async def run() -> list[Bar]:
        out = await feed.poll_once()  # the newest closed bar only
        source.stall_for(15)
        seen_stall: list[float | None] = []
        for _ in range(15):
            clock.advance(60)
            out += await feed.poll_once()
            seen_stall.append(feed.health.stalled_for_s(clock.monotonic()))
        assert seen_stall == [60.0 * k for k in range(1, 15)] + [0.0]
        for _ in range(10):
            clock.advance(60)
            out += await feed.poll_once()
        return out

    bars = asyncio.run(run())
    times = [b.time for b in bars]
    assert times == sorted(set(times))  # each bar once, in order
    expected = [T0 + timedelta(minutes=i) for i in range(2, 28) if i not in (20, 21)]
    assert times == expected
    h = feed.health
    assert h.missed == 2  # bars the broker never had: counted, not invented
    assert h.backfilled == 14  # the burst after the stall, all but its newest bar
    assert h.longest_gap_s == 15 * 60
    assert h.stalled_for_s(clock.monotonic()) == 0.0
    assert h.last_bar_time == T0 + timedelta(minutes=27)
    assert h.last_bar_wall_time == clock.now()


def test_the_engine_exposes_how_long_its_feed_has_been_silent(tmp_path: Path) -> None:
    """The trading engine over a stalling live feed: ``stalled_for_s`` grows, then resets."""
    from strategy.engine import TradingEngine

    clock = FakeClock(T0 + timedelta(minutes=2))
    source = StallingSource(minute_bars(60), clock)
    feed = PollingFeed(source, [S], clock=clock, timeframe_s=60, poll_interval_s=30)

    class Status:
        entries = 0

    class Strategy:
        def __init__(self) -> None:
            self.status = Status()
            self.seen: list[Bar] = []

        async def on_bar(self, bar: Bar) -> None:
            self.seen.append(bar)
            if len(self.seen) == 3:
                source.stall_for(10)

        async def record_closed_deals(self, deals: object, open_positions: object) -> None: ...

    class Broker:
        async def drain_closed_deals(self) -> list[object]:
            return []

        async def positions(self) -> list[object]:
            return []

        async def account(self) -> AccountInfo:
            return AccountInfo(1.0, 1.0, 0.0, 1.0, 100, "USD")

    class Risk:
        def state(self) -> dict[str, object]:
            return {}

    strategy = Strategy()
    with Journal(tmp_path / "journal.sqlite3", clock=clock) as journal:
        engine = TradingEngine(
            feed=feed,
            strategy=strategy,  # type: ignore[arg-type]
            broker=Broker(),  # type: ignore[arg-type]
            journal=journal,
            clock=clock,
            risk=Risk(),  # type: ignore[arg-type]
            equity_every_bars=1000,
            max_bars=20,
        )
        assert engine.stalled_for_s() is None
        source.probe = engine.stalled_for_s
        assert asyncio.run(engine.run(asyncio.Event())) == "max_bars=20"
    stall = max(p for p in source.probes if p is not None)
    assert stall >= 9 * 60  # visible while it lasted (polled every 30 s)
    times = [b.time for b in strategy.seen]
    assert times == [T0 + timedelta(minutes=1 + i) for i in range(20)]  # backfilled, in order
    assert engine.feed_health is feed.health and feed.health.backfilled > 0
    assert engine.stalled_for_s() == 0.0
    assert engine.stats.last_bar_wall_time == clock.now()


def test_a_replay_feed_reports_its_last_bar_and_silence() -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {
            "time": pd.date_range(T0, periods=20, freq="60s", tz="UTC"),
            "open": 1.1,
            "high": 1.1,
            "low": 1.1,
            "close": 1.1,
            "tick_volume": 1,
            "spread": 10,
            "real_volume": 0,
        }
    )
    clock = FakeClock(T0)
    feed = ReplayFeed({S: lambda: iter([frame])}, clock=clock, bars_per_s=1, history_bars=5)

    async def take(n: int) -> list[Bar]:
        out = []
        async for bar in feed.bars():
            out.append(bar)
            if len(out) == n:
                break
        return out

    bars = asyncio.run(take(4))
    assert feed.health.bars == 4 and feed.health.last_bar_time == bars[-1].time
    clock.advance(42)
    assert feed.health.stalled_for_s(clock.monotonic()) == pytest.approx(42.0)


# --------------------------------------------------------------------------- soak findings


def test_the_paper_brokers_deal_history_is_bounded() -> None:
    """A paper daemon that runs for months must not keep every deal in memory."""
    from execution.broker import OrderRequest, Side
    from execution.paper import PaperBroker, specs_from_settings

    symbols = load_settings(environ={}).symbols
    broker = PaperBroker(
        specs_from_settings({S: symbols[S]}),
        initial_balance=10_000.0,
        leverage=100,
        history_max_deals=5,
    )

    async def trade(n: int) -> None:
        for i in range(n):
            bar = Bar(S, T0 + timedelta(minutes=i), 1.1, 1.1, 1.1, 1.1, 1, 10)
            await broker.on_bar(bar)
            opened = await broker.market_order(
                OrderRequest(f"O{i}", S, Side.BUY, 0.01, None, None, None, "entry")
            )
            assert opened.ok
            (position,) = await broker.positions()
            assert (await broker.close_position(position, f"C{i}")).ok

    asyncio.run(trade(12))
    deals = asyncio.run(broker.history_deals(T0, T0 + timedelta(days=1)))
    assert [d.client_order_id for d in deals] == [f"C{i}" for i in range(7, 12)]
