"""``models ...`` and ``train``: the operator CLI, and the CLI -> daemon command queue."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from config.settings import (
    LSTMSettings,
    MLPSettings,
    ModelsSettings,
    PaperSettings,
    RFSettings,
    Settings,
    StorageSettings,
    ValidationSettings,
    XGBSettings,
)
from ml import cli_models
from ml.cli_models import (
    CommandError,
    handle_command,
    make_command_handler,
    models_delete,
    models_diff,
    models_events,
    models_list,
    models_promote,
    models_rollback,
    models_show,
    models_verify,
    training_bars,
)
from ml.store import ModelStore, StoreError, VersionInfo
from strategy.features import BarColumns
from utils.clock import FakeClock, iso_utc
from utils.commands import (
    CommandRow,
    cancel,
    daemon_alive,
    enqueue,
    fail_interrupted,
    fetch_command,
    poll_commands,
    serve_commands,
    wait_for,
)
from utils.trade_journal import HEARTBEAT_KEY, Journal

T0 = datetime(2024, 1, 2, 9, 0, tzinfo=UTC)
S, K = "EURUSD", "rf"


# ----------------------------------------------------------------------------- helpers


def settings_for(tmp_path: Path, **models: Any) -> Settings:
    return Settings(
        storage=StorageSettings(
            journal_path=str(tmp_path / "data" / "journal.sqlite3"),
            models_dir=str(tmp_path / "models"),
        ),
        models=ModelsSettings(**models),
    )


def manifest(*, depth: int, accuracy: float, trained: str, data: str = "d1") -> dict[str, Any]:
    return {
        "feature_hash": "fh1",
        "feature_names": ["ret_1", "rsi_14", "atr_14"],
        "feature_params": {"rsi_period": 14},
        "architecture": "forest",
        "hyperparams": {"n_estimators": 100, "max_depth": depth},
        "seed": 0,
        "trained": trained,
        "training_window": {"first": "2023-12-30T00:00:00Z", "last": trained},
        "samples": {"train": 700, "val": 150, "test": 150, "embargo": 5},
        "dataset_hash": data,
        "library_versions": {"sklearn": "1.9.1"},
        "metrics": {
            "holdout": {
                "accuracy": accuracy,
                "log_loss": 1.05,
                "majority_rate": 0.41,
                "holdout_rows": 150.0,
            }
        },
    }


def make_version(store: ModelStore, symbol: str, kind: str, payload: bytes, **kw: Any) -> str:
    draft = store.new_draft_dir(symbol, kind)
    (draft / "model.onnx").write_bytes(payload)
    (draft / "scaler.json").write_text('{"mean": [0.0], "scale": [1.0]}')
    info = store.commit_draft(draft, symbol=symbol, kind=kind, manifest=manifest(**kw))
    store.set_stage(symbol, kind, info.version, "validated")
    return info.version


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return settings_for(tmp_path)


@pytest.fixture
def store(settings: Settings, clock: FakeClock) -> ModelStore:
    """EURUSD/rf: 1.0.0 previous, 1.1.0 production, 1.1.1 validated; EURUSD/xgb: 1.0.0 draft."""
    st = cli_models.open_store(settings, clock)
    v1 = make_version(st, S, K, b"one", depth=6, accuracy=0.52, trained="2024-01-01T00:00:00Z")
    st.promote(S, K, v1)
    v2 = make_version(st, S, K, b"two", depth=8, accuracy=0.55, trained="2024-01-02T06:00:00Z")
    st.promote(S, K, v2)
    make_version(
        st, S, K, b"three", depth=8, accuracy=0.56, trained="2024-01-02T08:00:00Z", data="d2"
    )
    draft = st.new_draft_dir(S, "xgb")
    (draft / "model.ubj").write_bytes(b"x")
    st.commit_draft(
        draft,
        symbol=S,
        kind="xgb",
        manifest=manifest(depth=3, accuracy=0.5, trained="2024-01-02T07:00:00Z"),
    )
    assert [v.version for v in st.versions(S, K)] == ["1.0.0", "1.1.0", "1.1.1"]
    return st


class Run:
    """Calls a CLI function with captured out/err."""

    def __init__(self) -> None:
        self.out = io.StringIO()
        self.err = io.StringIO()

    def __call__(self, fn: Callable[..., int], *args: Any, **kw: Any) -> int:
        self.out = io.StringIO()
        self.err = io.StringIO()
        return fn(*args, out=self.out, err=self.err, **kw)

    @property
    def text(self) -> str:
        return self.out.getvalue()

    @property
    def error(self) -> str:
        return self.err.getvalue()


@pytest.fixture
def run() -> Run:
    return Run()


def open_journal(settings: Settings, clock: FakeClock) -> Journal:
    journal = Journal(settings.storage.journal_path, clock=clock)
    journal.open()
    return journal


def beat(journal: Journal, clock: FakeClock) -> None:
    journal.set_state(HEARTBEAT_KEY, iso_utc(clock.now())).result()


class FakeManager:
    def __init__(self) -> None:
        self.reloaded: list[tuple[str, str]] = []
        self.requests: list[tuple[str, tuple[str, ...], int, str, int]] = []

    def reload(self, symbol: str, kind: str) -> None:
        self.reloaded.append((symbol, kind))

    def request_training(
        self, symbol: str, kinds: Sequence[str], cols: BarColumns, *, reason: str, rows: int
    ) -> None:
        self.requests.append((symbol, tuple(kinds), len(cols), reason, rows))


def tiny_bars(n: int = 300) -> BarColumns:
    t = np.arange(n, dtype=np.int64) * 60_000_000_000 + 1_704_067_200_000_000_000
    close = 1.1 + np.cumsum(np.full(n, 1e-5))
    return BarColumns(t, close, close + 1e-4, close - 1e-4, close, np.ones(n), np.ones(n))


# ----------------------------------------------------------------------------- list


def test_list_shows_versions_stages_metrics_and_staleness_by_wall_clock(
    settings: Settings, store: ModelStore, clock: FakeClock, run: Run
) -> None:
    assert run(models_list, settings, clock=clock) == 0
    lines = run.text.splitlines()
    header = lines[0].split()
    assert header[:7] == ["SYMBOL", "KIND", "VERSION", "STAGE", "CREATED", "TRAINED", "AGE"]
    row = {line.split()[2] + line.split()[1]: line for line in lines[1:5]}
    assert "previous *" in row["1.0.0rf"] and "STALE" in row["1.0.0rf"]  # 33 h by the wall
    assert "production *" in row["1.1.0rf"] and "0.550" in row["1.1.0rf"]
    assert "3h00m" in row["1.1.0rf"] and "STALE" not in row["1.1.0rf"]
    assert "validated" in row["1.1.1rf"] and "*" not in row["1.1.1rf"]
    assert "draft" in row["1.0.0xgb"]
    assert "0.410" in row["1.1.0rf"] and "1.050" in row["1.1.0rf"]  # majority, log-loss
    assert "EURUSD: wall clock" in run.text


def test_list_ages_against_the_journals_last_processed_bar(
    settings: Settings, store: ModelStore, clock: FakeClock, run: Run
) -> None:
    journal = open_journal(settings, clock)
    try:
        journal.set_state("feed.last_bar_time.EURUSD", "2024-01-01T06:00:00Z").result()
    finally:
        journal.close()
    assert run(models_list, settings, kind="rf", clock=clock) == 0
    rows = run.text.splitlines()[1:4]
    assert all("STALE" not in r and r.split()[1] == "rf" for r in rows), rows
    assert "xgb" not in run.text
    line = next(li for li in run.text.splitlines() if li.split()[2:3] == ["1.0.0"])
    assert "6h00m" in line
    assert "2024-01-01T06:00:00Z (last processed bar)" in run.text


def test_list_refuses_an_unknown_symbol_or_kind(
    settings: Settings, store: ModelStore, clock: FakeClock, run: Run
) -> None:
    assert run(models_list, settings, "EURUSX", clock=clock) == 2
    assert "unknown symbol 'EURUSX'" in run.error and "spelling" in run.error
    assert run(models_list, settings, kind="forest", clock=clock) == 2
    assert "unknown model kind 'forest'" in run.error and "rf" in run.error
    assert run(models_list, settings, "GBPUSD", clock=clock) == 0
    assert "no models for GBPUSD" in run.text


def test_market_times_read_the_key_the_engine_writes() -> None:
    from strategy import engine
    from utils import trade_journal

    # One definition, used by the engine (writer) and the CLI (reader).
    assert engine.LAST_BAR_KEY is trade_journal.LAST_BAR_KEY


# ----------------------------------------------------------------------------- show / diff


def test_show_defaults_to_production(
    settings: Settings, store: ModelStore, clock: FakeClock, run: Run
) -> None:
    assert run(models_show, settings, S, K, clock=clock) == 0
    assert run.text.startswith("EURUSD/rf 1.1.0\n")
    assert "stage:    production (alias: production)" in run.text
    assert "production=1.1.0  previous=1.0.0  shadow=-" in run.text
    assert "verify:   ok (2 files" in run.text
    body = run.text.split("manifest.json:\n", 1)[1]
    assert json.loads(body)["hyperparams"]["max_depth"] == 8

    assert run(models_show, settings, S, K, "1.1.1", clock=clock) == 0
    assert "stage:    validated\n" in run.text


def test_show_refuses_missing_things(
    settings: Settings, store: ModelStore, clock: FakeClock, run: Run
) -> None:
    assert run(models_show, settings, S, "xgb", clock=clock) == 2
    assert "EURUSD/xgb has no production version (versions: 1.0.0); pass --version" in run.error
    assert run(models_show, settings, S, K, "9.9.9", clock=clock) == 2
    assert "has no version 9.9.9 (it has 1.0.0, 1.1.0, 1.1.1)" in run.error
    assert run(models_show, settings, S, None, clock=clock) == 2
    assert "needs --kind" in run.error
    assert run(models_show, settings, S, K, "1.0", clock=clock) == 2
    assert "'1.0' is not a version" in run.error


def test_diff_groups_what_changed(
    settings: Settings, store: ModelStore, clock: FakeClock, run: Run
) -> None:
    assert run(models_diff, settings, S, K, "1.0.0", "1.1.0", clock=clock) == 0
    text = run.text
    assert text.startswith("EURUSD/rf 1.0.0 (previous) -> 1.1.0 (production)")
    params = text.split("params:\n", 1)[1]
    assert params.startswith("  hyperparams.max_depth: 6 -> 8 (+2)")
    assert "metrics:\n  metrics.holdout.accuracy: 0.52 -> 0.55 (+0.03)" in text
    assert "data window:\n" in text and "trained:" in text
    assert "features:" not in text  # same features
    assert "artifacts:\n  2 of 2 files differ" not in text
    assert "1 of 2 files differ: model.onnx" in text

    assert run(models_diff, settings, S, K, "1.1.0", "1.1.1", clock=clock) == 0
    assert "dataset_hash" in run.text and "params:" not in run.text
    assert run(models_diff, settings, S, K, "1.1.0", "3.0.0", clock=clock) == 2
    assert "no version 3.0.0" in run.error


# ----------------------------------------------------------------------------- verify


def test_verify_names_a_tampered_file(
    settings: Settings, store: ModelStore, clock: FakeClock, run: Run
) -> None:
    assert run(models_verify, settings, clock=clock) == 0
    assert "4 version(s) verified: 4 ok, 0 with problems" in run.text
    target = store.kind_dir(S, K) / "1.0.0" / "model.onnx"
    data = bytearray(target.read_bytes())
    data[0] ^= 0x01
    target.write_bytes(bytes(data))
    assert run(models_verify, settings, S, clock=clock) == 1
    assert "FAILED  EURUSD/rf 1.0.0 (previous)" in run.text
    assert str(target) in run.text and "SHA-256 mismatch" in run.text
    assert "ok      EURUSD/rf 1.1.0" in run.text
    # Only the selection is checked.
    assert run(models_verify, settings, S, K, "1.1.0", clock=clock) == 0
    assert "1 version(s) verified: 1 ok" in run.text
    assert run(models_verify, settings, S, K, "7.0.0", clock=clock) == 2


# ----------------------------------------------------------------------------- direct writes


def test_promote_rollback_delete_without_a_daemon(
    settings: Settings, store: ModelStore, clock: FakeClock, run: Run
) -> None:
    assert run(models_promote, settings, S, K, "1.1.1", clock=clock) == 0
    assert run.text.strip() == "EURUSD/rf 1.1.1 is production now (previous: 1.1.0)"
    assert store.aliases(S, K) == {"production": "1.1.1", "previous": "1.1.0", "shadow": None}

    assert run(models_delete, settings, S, K, "1.1.1", clock=clock) == 2
    assert "1.1.1 is the production alias and cannot be deleted" in run.error
    assert "promote another version or roll back first" in run.error

    assert run(models_rollback, settings, S, K, clock=clock) == 0
    assert "production is 1.1.0 again; 1.1.1 is rejected (previous: 1.0.0)" in run.text
    assert store.stages(S, K)["1.1.1"] == "rejected"

    assert run(models_delete, settings, S, K, "1.1.1", clock=clock) == 0
    assert [v.version for v in store.versions(S, K)] == ["1.0.0", "1.1.0"]

    # Every change is a model event in the journal.
    assert run(models_events, settings, S, K, clock=clock) == 0
    events = [line.split()[5] for line in run.text.splitlines()[1:]]
    assert events == ["promoted", "rolled_back", "deleted"]


def test_write_mistakes_get_one_clear_line_and_exit_2(
    settings: Settings, store: ModelStore, clock: FakeClock, run: Run
) -> None:
    assert run(models_promote, settings, S, K, "4.0.0", clock=clock) == 2
    assert "EURUSD/rf has no version 4.0.0" in run.error
    assert run(models_promote, settings, S, "cnn", "1.0.0", clock=clock) == 2
    assert "unknown model kind 'cnn'" in run.error
    assert run(models_delete, settings, S, K, None, clock=clock) == 2
    assert "needs --version" in run.error
    assert run(models_rollback, settings, S, "xgb", clock=clock) == 2
    assert "EURUSD/xgb has no previous version to roll back to" in run.error
    assert "models promote --symbol EURUSD --kind xgb" in run.error
    assert run.error.count("\n") == 1  # one line
    assert store.aliases(S, K)["production"] == "1.1.0"  # nothing changed


def test_events_needs_a_journal(settings: Settings, clock: FakeClock, run: Run) -> None:
    assert run(models_events, settings, clock=clock) == 2
    assert "no journal here yet" in run.error


# ----------------------------------------------------------------------------- command queue


def test_command_queue_round_trip_while_the_daemon_and_a_reader_hold_the_journal(
    settings: Settings, clock: FakeClock
) -> None:
    path = Path(settings.storage.journal_path)
    journal = open_journal(settings, clock)  # the daemon's writer (WAL)
    reader = Journal.open_reader(path)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM commands").fetchone()[0] == 0
        first = enqueue(path, "echo", {"n": 1}, now=clock.now())
        second = enqueue(path, "boom", {}, now=clock.now())
        assert second == first + 1

        seen: list[CommandRow] = []

        async def handler(row: CommandRow) -> Mapping[str, Any]:
            assert row.status == "running"
            seen.append(row)
            if row.command == "boom":
                raise StoreError("EURUSD/rf is locked")
            return {"echo": dict(row.args)}

        assert asyncio.run(poll_commands(journal, handler, clock=clock)) == 2
        assert asyncio.run(poll_commands(journal, handler, clock=clock)) == 0
        assert [r.command for r in seen] == ["echo", "boom"]
        # The reader's snapshot is older than the answers; a new one sees them.
        assert reader.execute("SELECT count(*) FROM commands").fetchone()[0] == 0
        reader.execute("COMMIT")
        done = fetch_command(reader, first)
        failed = fetch_command(reader, second)
    finally:
        reader.close()
        journal.close()
    assert done is not None and done.status == "done" and done.result == {"echo": {"n": 1}}
    assert failed is not None and failed.status == "failed"
    assert failed.error == "EURUSD/rf is locked" and failed.error_type == "StoreError"
    waited = wait_for(path, first, 5.0, clock, sleep=lambda _s: pytest.fail("no wait needed"))
    assert waited.finished and waited.result == {"echo": {"n": 1}}


def test_wait_for_times_out_on_the_clock_and_cancel_fails_a_pending_command(
    settings: Settings, clock: FakeClock
) -> None:
    path = Path(settings.storage.journal_path)
    open_journal(settings, clock).close()
    cid = enqueue(path, "promote", {"symbol": S}, now=clock.now())
    sleeps: list[float] = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.advance(seconds)

    row = wait_for(path, cid, 2.0, clock, poll_s=0.5, sleep=fake_sleep)
    assert row.status == "pending" and not row.finished
    assert sleeps == [0.5] * 4
    assert cancel(path, cid, "gave up", now=clock.now())
    assert not cancel(path, cid, "again", now=clock.now())
    row = wait_for(path, cid, 2.0, clock, sleep=fake_sleep)
    assert row.status == "failed" and row.error == "gave up" and row.error_type == "Cancelled"


def test_expired_and_interrupted_commands_fail_with_a_reason(
    settings: Settings, clock: FakeClock
) -> None:
    path = Path(settings.storage.journal_path)
    journal = open_journal(settings, clock)
    try:
        old = enqueue(path, "promote", {}, now=clock.now())
        clock.advance(3600)
        fresh = enqueue(path, "rollback", {}, now=clock.now())
        ran: list[int] = []

        async def handler(row: CommandRow) -> Mapping[str, Any]:
            ran.append(row.id)
            return {}

        n = asyncio.run(poll_commands(journal, handler, clock=clock, expire_after_s=600))
        assert n == 1 and ran == [fresh]
        stuck = enqueue(path, "delete", {}, now=clock.now())
        journal.call(
            lambda c: c.execute("UPDATE commands SET status='running' WHERE id=?", (stuck,))
        )
        assert fail_interrupted(journal, clock=clock).result() == 1
    finally:
        journal.close()
    reader = Journal.open_reader(path)
    try:
        expired = fetch_command(reader, old)
        interrupted = fetch_command(reader, stuck)
    finally:
        reader.close()
    assert expired is not None and expired.error_type == "Expired"
    assert "expired" in (expired.error or "")
    assert interrupted is not None and interrupted.error_type == "Interrupted"


def test_serve_commands_fails_leftovers_then_answers_until_cancelled(
    settings: Settings, clock: FakeClock
) -> None:
    path = Path(settings.storage.journal_path)
    journal = open_journal(settings, clock)
    try:
        stuck = enqueue(path, "promote", {}, now=clock.now())
        journal.call(
            lambda c: c.execute("UPDATE commands SET status='running' WHERE id=?", (stuck,))
        )

        async def main() -> None:
            answered = asyncio.Event()

            async def handler(row: CommandRow) -> Mapping[str, Any]:
                answered.set()
                return {"ok": row.command}

            task = asyncio.create_task(serve_commands(journal, handler, clock=clock))
            await asyncio.sleep(0)
            enqueue(path, "rollback", {}, now=clock.now())
            await asyncio.wait_for(answered.wait(), timeout=30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())
        journal.flush_sync()
        rows = journal.call(
            lambda c: c.execute("SELECT status, result_json FROM commands ORDER BY id").fetchall()
        )
    finally:
        journal.close()
    assert rows[0][0] == "failed" and "Interrupted" in rows[0][1]
    assert rows[1] == ("done", '{"ok":"rollback"}')


def test_daemon_alive_follows_the_heartbeat(settings: Settings, clock: FakeClock) -> None:
    path = Path(settings.storage.journal_path)
    assert not daemon_alive(path, clock.now())  # no journal
    journal = open_journal(settings, clock)
    try:
        assert not daemon_alive(path, clock.now())  # never beat
        beat(journal, clock)
        assert daemon_alive(path, clock.now())
        clock.advance(10)
        assert daemon_alive(path, clock.now())
        clock.advance(10)
        assert not daemon_alive(path, clock.now())  # 20 s > 15 s
        beat(journal, clock)
        assert daemon_alive(path, clock.now())
        clock.advance(1)
        journal.record_event("info", "daemon_stopped", "stopped: feed ended").result()
        assert not daemon_alive(path, clock.now())  # a clean stop after the last beat
        clock.advance(1)
        beat(journal, clock)
        assert daemon_alive(path, clock.now())  # started again
    finally:
        journal.close()


# ----------------------------------------------------------------------------- via the daemon


def playing_daemon(
    journal: Journal, clock: FakeClock, handler: Callable[[CommandRow], Any]
) -> Callable[[float], None]:
    """A CLI ``sleep`` that lets the fake daemon answer, then advances the clock."""

    def sleep(seconds: float) -> None:
        asyncio.run(poll_commands(journal, handler, clock=clock))
        clock.advance(seconds)

    return sleep


def test_promote_and_rollback_go_through_a_running_daemon(
    settings: Settings, store: ModelStore, clock: FakeClock, run: Run
) -> None:
    journal = open_journal(settings, clock)
    manager = FakeManager()
    handler = make_command_handler(
        store=store, manager=manager, settings=settings, bars_for=lambda _s: tiny_bars()
    )
    try:
        beat(journal, clock)
        sleep = playing_daemon(journal, clock, handler)
        assert run(models_promote, settings, S, K, "1.1.1", clock=clock, sleep=sleep) == 0
        assert "sent promote as command 1" in run.text
        assert "EURUSD/rf 1.1.1 is production now (previous: 1.1.0)" in run.text
        assert "from its next bar" in run.text
        assert manager.reloaded == [(S, K)]
        assert store.aliases(S, K)["production"] == "1.1.1"

        assert run(models_rollback, settings, S, K, clock=clock, sleep=sleep) == 0
        assert "production is 1.1.0 again" in run.text
        assert manager.reloaded == [(S, K), (S, K)]

        # Operator mistakes are refused before anything is queued.
        assert run(models_delete, settings, S, K, "1.1.0", clock=clock, sleep=sleep) == 2
        reader = Journal.open_reader(settings.storage.journal_path)
        try:
            assert reader.execute("SELECT count(*) FROM commands").fetchone()[0] == 2
        finally:
            reader.close()
    finally:
        journal.close()


def test_a_silent_daemon_times_out_then_the_cli_acts_itself(
    settings: Settings, store: ModelStore, clock: FakeClock, run: Run
) -> None:
    journal = open_journal(settings, clock)
    try:
        beat(journal, clock)  # then nothing answers: the daemon hung or died
    finally:
        journal.close()
    rc = run(models_promote, settings, S, K, "1.1.1", clock=clock, sleep=clock.advance)
    assert rc == 0
    assert "the daemon stopped meanwhile (command 1 cancelled); acting directly" in run.text
    assert store.aliases(S, K)["production"] == "1.1.1"
    reader = Journal.open_reader(settings.storage.journal_path)
    try:
        row = fetch_command(reader, 1)
    finally:
        reader.close()
    assert row is not None and row.status == "failed" and row.error_type == "Cancelled"


def test_handle_command_answers_train_and_refuses_nonsense(
    settings: Settings, store: ModelStore, clock: FakeClock, run: Run
) -> None:
    manager = FakeManager()

    def row(command: str, **args: Any) -> CommandRow:
        return CommandRow(7, T0, command, args, "running", None, None)

    def handle(r: CommandRow) -> dict[str, Any]:
        return handle_command(
            r, store=store, manager=manager, settings=settings, bars_for=lambda _s: tiny_bars()
        )

    result = handle(row("train", symbol=None, kind="xgb"))
    assert result == {"command": "train", "queued": [{"symbol": S, "kinds": ["xgb"], "bars": 300}]}
    assert manager.requests == [(S, ("xgb",), 300, "command 7", settings.models.train_bars)]
    with pytest.raises(CommandError, match="unknown command 'explode'"):
        handle(row("explode"))
    with pytest.raises(StoreError, match="production alias"):
        handle(row("delete", symbol=S, kind=K, version="1.1.0"))
    with pytest.raises(CommandError, match="not traded"):
        handle(row("train", symbol="XAUUSD"))
    assert manager.reloaded == []

    # The CLI side: queued without waiting.
    journal = open_journal(settings, clock)
    try:
        beat(journal, clock)
        assert run(cli_models.train, settings, S, "xgb", clock=clock) == 0
        assert run.text.startswith("queued as command 1:")
        handler = make_command_handler(
            store=store, manager=manager, settings=settings, bars_for=lambda _s: tiny_bars()
        )
        assert asyncio.run(poll_commands(journal, handler, clock=clock)) == 1
    finally:
        journal.close()
    assert manager.requests[-1][:2] == (S, ("xgb",))


# ----------------------------------------------------------------------------- train (direct)


def frames_source(frames: list[pd.DataFrame]) -> Callable[[], Iterator[pd.DataFrame]]:
    return lambda: iter(frames)


def test_training_bars_takes_the_first_bars_or_those_up_to_the_market_time() -> None:
    times = pd.date_range("2024-01-01", periods=30, freq="min", tz="UTC")
    frame = pd.DataFrame(
        {"time": times, "open": 1.0, "high": 1.1, "low": 0.9, "close": 1.0,
         "tick_volume": 1, "spread": 1}
    )  # fmt: skip
    source = frames_source([frame.iloc[:10], frame.iloc[10:20], frame.iloc[20:]])
    first = training_bars(source, 12)
    assert len(first) == 12 and first.time_ns[0] == times[0].value
    until = times[24].to_pydatetime()
    upto = training_bars(source, 12, until)
    assert len(upto) == 12 and upto.time_ns[-1] == times[24].value
    assert upto.time_ns[0] == times[13].value
    with pytest.raises(CommandError, match="no bars to train on"):
        training_bars(source, 5, times[0].to_pydatetime() - timedelta(minutes=1))


def test_train_refuses_unknown_and_disabled_kinds(
    tmp_path: Path, clock: FakeClock, run: Run
) -> None:
    settings = settings_for(tmp_path, lstm=LSTMSettings(enabled=False))
    assert run(cli_models.train, settings, kind="lstm", clock=clock) == 2
    assert "model kind 'lstm' is disabled (models.lstm.enabled = false)" in run.error
    assert run(cli_models.train, settings, kind="svm", clock=clock) == 2
    assert "unknown model kind 'svm'" in run.error
    assert run(cli_models.train, settings, "USDJPY", clock=clock) == 2
    assert "symbol 'USDJPY' is not traded" in run.error


def test_train_without_a_daemon_produces_a_production_version_per_kind(
    tmp_path: Path, clock: FakeClock, run: Run
) -> None:
    settings = Settings(
        storage=StorageSettings(
            journal_path=str(tmp_path / "data" / "journal.sqlite3"),
            models_dir=str(tmp_path / "models"),
        ),
        paper=PaperSettings(history_bars=100),
        # Gates wide open: what they refuse is tested in test_validation.
        validation=ValidationSettings(
            min_accuracy_edge=-1,
            max_log_loss=100,
            min_trades=0,
            min_sharpe=-1e6,
            max_drawdown_pct=100,
            beat_baseline=False,
            max_latency_p99_ms=1000,
        ),
        models=ModelsSettings(
            initial_train_bars=2000,
            train_bars=2000,
            rf=RFSettings(n_estimators=10, max_depth=4),
            xgb=XGBSettings(n_estimators=10, max_depth=3),
            lstm=LSTMSettings(
                seq_len=8, hidden_size_1=8, hidden_size_2=4, max_steps=10, batch_size=64
            ),
            mlp=MLPSettings(hidden_1=8, hidden_2=8, hidden_3=4, max_steps=20, batch_size=64),
        ),
    )
    assert run(cli_models.train, settings, clock=clock) == 0, run.error + run.text
    assert "EURUSD: 2000 bars" in run.text
    assert "[4/4]" in run.text
    store = cli_models.open_store(settings, clock)
    for kind in ("rf", "xgb", "lstm", "mlp"):
        info = store.resolve(S, kind)
        assert isinstance(info, VersionInfo) and info.version == "1.0.0", kind
        assert store.stages(S, kind) == {"1.0.0": "production"}
        assert f"EURUSD {kind}: 1.0.0 production (holdout accuracy" in run.text

    # A retrain of an existing production stays validated.
    assert run(cli_models.train, settings, S, "xgb", clock=clock) == 0
    assert store.stages(S, "xgb") == {"1.0.0": "production", "1.0.1": "validated"}
    assert "production stays 1.0.0: promote it with python main.py models promote" in run.text

    conn = sqlite3.connect(settings.storage.journal_path)
    try:
        runs = conn.execute("SELECT kind, status FROM training_runs ORDER BY id").fetchall()
        events = [r[0] for r in conn.execute("SELECT event FROM model_events")]
    finally:
        conn.close()
    assert [r[1] for r in runs] == ["passed"] * 5
    assert events.count("promoted") == 4


def test_train_wait_follows_the_daemons_training_runs(
    settings: Settings, store: ModelStore, clock: FakeClock, run: Run
) -> None:
    journal = open_journal(settings, clock)

    class TrainingManager(FakeManager):
        def request_training(
            self, symbol: str, kinds: Sequence[str], cols: BarColumns, *, reason: str, rows: int
        ) -> None:
            super().request_training(symbol, kinds, cols, reason=reason, rows=rows)
            for n, kind in enumerate(kinds):  # the trainer thread, done at once
                journal.record_training_run(
                    started=clock.now(),
                    symbol=symbol,
                    kind=kind,
                    status="done" if n == 0 else "failed",
                    version="2.0.0" if n == 0 else None,
                    error=None if n == 0 else "ValueError: constant labels",
                )

    manager = TrainingManager()
    handler = make_command_handler(
        store=store, manager=manager, settings=settings, bars_for=lambda _s: tiny_bars()
    )
    try:
        beat(journal, clock)
        sleep = playing_daemon(journal, clock, handler)
        rc = run(cli_models.train, settings, S, None, True, clock=clock, sleep=sleep)
    finally:
        journal.close()
    assert rc == 1  # one kind failed
    assert "the daemon queued 4 training run(s)" in run.text
    assert "EURUSD xgb: trained version 2.0.0" in run.text
    assert "EURUSD mlp: failed: ValueError: constant labels" in run.text
    assert [r[1] for r in manager.requests] == [("xgb", "mlp", "rf", "lstm")]


def test_parsers_and_dispatch(settings: Settings, store: ModelStore, clock: FakeClock) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None)
    sub = parser.add_subparsers(dest="command")
    cli_models.add_parsers(sub)
    out = io.StringIO()
    args = parser.parse_args(["models", "diff", "--symbol", S, "--kind", K, "1.0.0", "1.1.1"])
    assert cli_models.run(settings, args, out=out, clock=clock) == 0
    assert "hyperparams.max_depth: 6 -> 8" in out.getvalue()
    args = parser.parse_args(["models", "list", "--kind", "xgb"])
    assert cli_models.run(settings, args, out=out, clock=clock) == 0
    args = parser.parse_args(["train", "--symbol", S, "--kind", "rf", "--wait"])
    assert (args.symbol, args.kind, args.wait) == (S, "rf", True)
