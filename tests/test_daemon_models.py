"""The daemon with its own models: train at first start, serve from the store after, fall back.

Tiny model sizes keep this fast; training runs in-process (``InlineBackend``)
and the auto-trainer runs its jobs on the spot (``InlineRunner``), so every bar
after start-up is decided by the trained models (deterministic). The gates are
opened wide here: what they reject is tested in test_validation/test_auto_trainer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import itertools
import json
import re
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from config.settings import Settings, load_settings
from main import cmd_status, serve, start_daemon
from ml.auto_trainer import AutoTrainer, InlineRunner
from ml.store import ModelStore
from ml.training import InlineBackend, TrainJob, TrainOutcome
from utils.clock import FakeClock

KINDS = ("rf", "xgb", "lstm", "mlp")


OPEN_GATES = {
    "SCALPER__VALIDATION__MIN_ACCURACY_EDGE": "-1",
    "SCALPER__VALIDATION__MAX_LOG_LOSS": "100",
    "SCALPER__VALIDATION__MIN_TRADES": "0",
    "SCALPER__VALIDATION__MIN_SHARPE": "-1000000",
    "SCALPER__VALIDATION__MAX_DRAWDOWN_PCT": "100",
    "SCALPER__VALIDATION__BEAT_BASELINE": "false",
    "SCALPER__VALIDATION__MAX_LATENCY_P99_MS": "1000",
    "SCALPER__VALIDATION__MAX_ACCURACY_DROP": "1",
    "SCALPER__VALIDATION__MAX_LOG_LOSS_INCREASE": "100",
}


def tiny_settings(tmp_path: Path, **extra: str) -> Settings:
    env = {
        "SCALPER__STORAGE__JOURNAL_PATH": str(tmp_path / "journal.sqlite3"),
        "SCALPER__STORAGE__MODELS_DIR": str(tmp_path / "models"),
        "SCALPER__RISK__KILL_SWITCH_PATH": str(tmp_path / "KILL"),
        "SCALPER__LOGGING__LEVEL": "WARNING",
        "SCALPER__PAPER__HISTORY_BARS": "100",
        "SCALPER__MODELS__INITIAL_TRAIN_BARS": "2500",
        "SCALPER__MODELS__RF__N_ESTIMATORS": "8",
        "SCALPER__MODELS__RF__MAX_DEPTH": "4",
        "SCALPER__MODELS__XGB__N_ESTIMATORS": "8",
        "SCALPER__MODELS__XGB__MAX_DEPTH": "3",
        "SCALPER__MODELS__LSTM__SEQ_LEN": "8",
        "SCALPER__MODELS__LSTM__HIDDEN_SIZE_1": "8",
        "SCALPER__MODELS__LSTM__HIDDEN_SIZE_2": "4",
        "SCALPER__MODELS__LSTM__MAX_STEPS": "6",
        "SCALPER__MODELS__LSTM__BATCH_SIZE": "32",
        "SCALPER__MODELS__MLP__HIDDEN_1": "8",
        "SCALPER__MODELS__MLP__HIDDEN_2": "8",
        "SCALPER__MODELS__MLP__HIDDEN_3": "8",
        "SCALPER__MODELS__MLP__MAX_STEPS": "20",
        "SCALPER__MODELS__MLP__BATCH_SIZE": "64",
        # No scheduled retrain, drift or emergency runs inside these short replays.
        **{f"SCALPER__MODELS__{k}__RETRAIN_EVERY_S": "0" for k in ("RF", "XGB", "LSTM", "MLP")},
        "SCALPER__AUTOTRAIN__DRIFT_CHECK_EVERY_S": "100000000",
        "SCALPER__AUTOTRAIN__EMERGENCY_CHECK_EVERY_S": "100000000",
        **OPEN_GATES,
    }
    env.update(extra)
    return load_settings(environ=env)


def query(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def run_once(settings: Settings, bars: int, backend: object = None) -> dict[str, str]:
    clock = FakeClock(datetime(2026, 1, 5, 8, 0, tzinfo=UTC))
    daemon = await start_daemon(
        settings,
        clock=clock,
        max_bars=bars,
        backend=backend or InlineBackend(),
        runner=InlineRunner(),
    )
    try:
        # The first trainings ran at start-up; let their swaps run on this loop.
        await asyncio.sleep(0)
        serving = {kind: p.version for kind, p in daemon.predictors.snapshot("EURUSD").items()}
        await serve(daemon, install_signals=False, command_poll_s=None)
    finally:
        daemon.journal.close()
    return serving


def test_first_start_trains_every_kind_then_serves_them_and_restart_loads_from_store(
    tmp_path: Path,
) -> None:
    settings = tiny_settings(tmp_path)
    journal = tmp_path / "journal.sqlite3"
    serving = asyncio.run(run_once(settings, 300))
    assert serving == dict.fromkeys(KINDS, "1.0.0")
    runs = query(journal, "SELECT kind, status, version FROM training_runs ORDER BY id")
    assert [(k, s) for k, s, _ in runs] == [(k, "passed") for k in ("xgb", "mlp", "rf", "lstm")]
    predicted = {r[0] for r in query(journal, "SELECT DISTINCT model FROM predictions")}
    assert set(KINDS) <= predicted
    events = {r[0] for r in query(journal, "SELECT DISTINCT event FROM model_events")}
    assert {"registered", "validated", "auto_promoted", "promoted", "swapped"} <= events
    last_bar_models = query(
        journal,
        "SELECT model, version FROM predictions WHERE bar_time = "
        "(SELECT max(bar_time) FROM predictions)",
    )
    assert sorted(last_bar_models) == sorted((k, "1.0.0") for k in KINDS)
    for kind in KINDS:
        aliases = (tmp_path / "models" / "EURUSD" / kind / "aliases.json").read_text("utf-8")
        assert '"production": "1.0.0"' in aliases

    # The first models were loaded before their promotion; they serve as production.
    stages = query(
        journal, "SELECT DISTINCT model, stage FROM predictions WHERE model != 'baseline'"
    )
    assert sorted(stages) == sorted((k, "production") for k in KINDS)
    # Second start: the store serves, nothing is retrained.
    serving_again = asyncio.run(run_once(settings, 50))
    assert serving_again == dict.fromkeys(KINDS, "1.0.0")
    assert len(query(journal, "SELECT id FROM training_runs")) == 4


def test_a_tampered_artifact_is_refused_and_the_kind_is_retrained(tmp_path: Path) -> None:
    settings = tiny_settings(
        tmp_path, **{f"SCALPER__MODELS__{k}__ENABLED": "false" for k in ("RF", "LSTM", "MLP")}
    )
    journal = tmp_path / "journal.sqlite3"
    assert asyncio.run(run_once(settings, 20)) == {"xgb": "1.0.0"}
    onnx = tmp_path / "models" / "EURUSD" / "xgb" / "1.0.0" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    # 1.0.0 no longer verifies: it is not served; a new version is trained and served.
    assert asyncio.run(run_once(settings, 20)) == {"xgb": "1.0.1"}
    events = [r[0] for r in query(journal, "SELECT event FROM model_events")]
    assert "integrity_failed" in events
    # ...and the operator sees it in status's "last errors".
    alerts = query(journal, "SELECT level, message FROM events WHERE kind='model_integrity_failed'")
    assert alerts and alerts[0][0] == "error" and "xgb 1.0.0" in str(alerts[0][1])


class FailingBackend:
    def submit(self, job: TrainJob) -> concurrent.futures.Future[TrainOutcome]:
        future: concurrent.futures.Future[TrainOutcome] = concurrent.futures.Future()
        future.set_exception(ValueError("training data too short: need 300 rows, got 12"))
        return future

    def reset(self) -> None:
        """Nothing runs."""

    def shutdown(self) -> None:
        """Nothing to stop."""


class HangingBackend:
    """A worker that never answers; ``reset`` is how the trainer kills it."""

    def __init__(self) -> None:
        self.resets = 0

    def submit(self, job: TrainJob) -> concurrent.futures.Future[TrainOutcome]:
        return concurrent.futures.Future()  # never completes

    def reset(self) -> None:
        self.resets += 1

    def shutdown(self) -> None:
        """Nothing to stop."""


def test_a_training_job_past_its_timeout_is_killed_and_recorded_as_failed(
    tmp_path: Path,
) -> None:
    only_xgb = {f"SCALPER__MODELS__{k}__ENABLED": "false" for k in ("RF", "LSTM", "MLP")}
    settings = tiny_settings(tmp_path, SCALPER__AUTOTRAIN__JOB_TIMEOUT_S="0.05", **only_xgb)
    backend = HangingBackend()
    assert asyncio.run(run_once(settings, 5, backend=backend)) == {"baseline": "1.0.0"}
    assert backend.resets == 1
    runs = query(tmp_path / "journal.sqlite3", "SELECT status, error FROM training_runs")
    assert runs[0][0] == "failed" and "job_timeout_s = 0.05 s" in str(runs[0][1])


def test_failed_training_is_journaled_and_the_baseline_keeps_serving(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path)
    journal = tmp_path / "journal.sqlite3"
    serving = asyncio.run(run_once(settings, 50, backend=FailingBackend()))
    assert serving == {"baseline": "1.0.0"}
    runs = query(journal, "SELECT status, error FROM training_runs")
    assert len(runs) == 4 and all(r[0] == "failed" for r in runs)
    assert "too short" in str(runs[0][1])
    errors = query(journal, "SELECT kind FROM events WHERE kind='training_failed'")
    assert len(errors) == 4
    assert not (tmp_path / "models" / "EURUSD" / "xgb" / "aliases.json").exists() or (
        '"production": null' in (tmp_path / "models/EURUSD/xgb/aliases.json").read_text("utf-8")
    )
    # No leftovers of the failed drafts.
    leftovers = list((tmp_path / "models").rglob(".tmp-*"))
    assert [p for p in leftovers if p.is_dir()] == []


def test_a_stale_model_is_retrained_into_shadow_and_old_candidates_pruned(
    tmp_path: Path,
) -> None:
    settings = tiny_settings(
        tmp_path,
        SCALPER__MODELS__RETENTION="2",
        SCALPER__MODELS__MAX_MODEL_AGE_S="60",  # every restart finds xgb stale
        **{f"SCALPER__MODELS__{k}__ENABLED": "false" for k in ("RF", "LSTM", "MLP")},
    )
    for _ in range(4):
        # Production keeps serving while its replacement is on trial (too few bars here
        # for a verdict): the stale model trades until a better one has proved itself.
        assert asyncio.run(run_once(settings, 50)) == {"xgb": "1.0.0"}
    kind_dir = tmp_path / "models" / "EURUSD" / "xgb"
    kept = sorted(p.name for p in kind_dir.iterdir() if p.is_dir() and p.name[0].isdigit())
    # Each restart's retrain replaced the previous candidate in shadow (rejected);
    # retention (2) keeps the newest two plus production.
    assert kept == ["1.0.0", "1.0.2", "1.0.3"]
    aliases = json.loads((kind_dir / "aliases.json").read_text("utf-8"))
    assert aliases["production"] == "1.0.0" and aliases["shadow"] == "1.0.3"
    journal = tmp_path / "journal.sqlite3"
    events = [r[0] for r in query(journal, "SELECT event FROM model_events")]
    assert "retention_deleted" in events and events.count("shadow_started") == 3
    shadow_rows = query(journal, "SELECT DISTINCT version FROM predictions WHERE stage='shadow'")
    assert ("1.0.3",) in shadow_rows
    # status shows what serves, what is on trial and the last run, per symbol and kind.
    out = io.StringIO()
    assert cmd_status(journal, check=False, clock=FakeClock(), out=out) == 0
    text = out.getvalue()
    assert "models (auto-trainer on):" in text
    line = next(x for x in text.splitlines() if x.startswith("  EURUSD/xgb"))
    assert "production 1.0.0, age" in line
    scored = re.search(r"shadow 1.0.3 vs 1.0.0: (\d+) bars scored", line)
    # 50 bars, each scored once its 5-bar label is known (sequence warm-up aside).
    assert scored and 30 <= int(scored.group(1)) <= 45
    assert "last run passed 1.0.3" in line


@pytest.mark.parametrize("weight_by", ["settings", "validation"])
def test_ensemble_weights_follow_the_setting(tmp_path: Path, weight_by: str) -> None:
    settings = tiny_settings(
        tmp_path,
        SCALPER__MODELS__WEIGHT_BY=weight_by,
        SCALPER__MODELS__XGB__WEIGHT="3.0",
        **{f"SCALPER__MODELS__{k}__ENABLED": "false" for k in ("RF", "LSTM")},
    )

    async def scenario() -> dict[str, float]:
        daemon = await start_daemon(
            settings,
            clock=FakeClock(datetime(2026, 1, 5, tzinfo=UTC)),
            max_bars=5,
            backend=InlineBackend(),
            runner=InlineRunner(),
        )
        try:
            await asyncio.sleep(0)
            return dict(daemon.models.weights)
        finally:
            await asyncio.to_thread(daemon.auto.stop)
            daemon.journal.close()

    weights = asyncio.run(scenario())
    if weight_by == "settings":
        assert weights == {"xgb": 3.0, "mlp": 1.0}
    else:
        expected = {}
        for kind in ("xgb", "mlp"):
            path = tmp_path / "models" / "EURUSD" / kind / "1.0.0" / "manifest.json"
            holdout = json.loads(path.read_text("utf-8"))["metrics"]["holdout"]
            expected[kind] = max(0.0, holdout["accuracy"] - holdout["majority_rate"])
        assert weights == pytest.approx(expected)


def test_fallback_to_previous_is_served_and_journaled_with_its_stage(tmp_path: Path) -> None:
    only_xgb = {f"SCALPER__MODELS__{k}__ENABLED": "false" for k in ("RF", "LSTM", "MLP")}
    eager = tiny_settings(tmp_path, SCALPER__MODELS__MAX_MODEL_AGE_S="60", **only_xgb)
    asyncio.run(run_once(eager, 30))  # 1.0.0
    asyncio.run(run_once(eager, 30))  # stale: 1.0.1 in shadow
    ModelStore(tmp_path / "models", clock=FakeClock()).promote("EURUSD", "xgb", "1.0.1")
    onnx = tmp_path / "models" / "EURUSD" / "xgb" / "1.0.1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10])  # truncated
    patient = tiny_settings(tmp_path, **only_xgb)  # 1.0.0 is not stale under 24 h
    # The replacement the daemon queues fails here, so the fallback keeps serving.
    assert asyncio.run(run_once(patient, 40, backend=FailingBackend())) == {"xgb": "1.0.0"}
    journal = tmp_path / "journal.sqlite3"
    last = query(
        journal,
        "SELECT version, stage FROM predictions WHERE bar_time = "
        "(SELECT max(bar_time) FROM predictions)",
    )
    assert last == [("1.0.0", "previous")]
    kinds = {r[0] for r in query(journal, "SELECT kind FROM events")}
    assert {"model_integrity_failed", "model_fallback"} <= kinds


def test_the_running_daemon_retrains_a_model_that_goes_stale(tmp_path: Path) -> None:
    only_xgb = {f"SCALPER__MODELS__{k}__ENABLED": "false" for k in ("RF", "LSTM", "MLP")}
    settings = tiny_settings(tmp_path, SCALPER__MODELS__MAX_MODEL_AGE_S="3600", **only_xgb)

    async def scenario() -> tuple[list[object], str, str]:
        daemon = await start_daemon(
            settings,
            clock=FakeClock(datetime(2026, 1, 5, tzinfo=UTC)),
            max_bars=5,
            backend=InlineBackend(),
            runner=InlineRunner(),
        )
        try:
            await asyncio.sleep(0)
            bars = list(daemon.engine.recent_bars["EURUSD"])
            daemon.auto.tick(bars[-1].time)  # the schedule starts counting
            ran = daemon.auto.tick(bars[-1].time + timedelta(hours=2))
            await asyncio.sleep(0)
            serving = daemon.predictors.snapshot("EURUSD")["xgb"].version
            shadow = daemon.predictors.shadow_snapshot("EURUSD")["xgb"].version
            return [k.id for k in ran], serving, shadow
        finally:
            await asyncio.to_thread(daemon.auto.stop)
            daemon.journal.close()

    ran, serving, shadow = asyncio.run(scenario())
    assert "staleness:EURUSD" in ran
    assert (serving, shadow) == ("1.0.0", "1.0.1")


def test_the_bar_loop_checks_models_once_per_market_hour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[datetime | None] = []

    def spy(self: AutoTrainer, symbol: str) -> list[str]:
        calls.append(self._market_now)
        return []

    monkeypatch.setattr(AutoTrainer, "check_staleness", spy)
    settings = tiny_settings(
        tmp_path,
        **{f"SCALPER__MODELS__{k}__ENABLED": "false" for k in ("RF", "XGB", "LSTM", "MLP")},
    )
    asyncio.run(run_once(settings, 300))  # 300 M1 bars = 5 market hours
    assert len(calls) == 4
    assert all(
        a is not None and b is not None and b - a >= timedelta(hours=1)
        for a, b in itertools.pairwise(calls)
    )


def test_a_production_built_for_another_feature_spec_is_refused_and_replaced(
    tmp_path: Path,
) -> None:
    only_xgb = {f"SCALPER__MODELS__{k}__ENABLED": "false" for k in ("RF", "LSTM", "MLP")}
    settings = tiny_settings(tmp_path, **only_xgb)
    assert asyncio.run(run_once(settings, 20)) == {"xgb": "1.0.0"}
    # A verified version whose model was built for other features, promoted by hand.
    store = ModelStore(tmp_path / "models", clock=FakeClock())
    good = store.version_info("EURUSD", "xgb", "1.0.0")
    draft = store.new_draft_dir("EURUSD", "xgb")
    for f in good.path.iterdir():
        if f.name != "manifest.json":
            (draft / f.name).write_bytes(f.read_bytes())
    meta = json.loads((draft / "model_meta.json").read_text("utf-8"))
    meta["feature_hash"] = "0123456789abcdef"
    (draft / "model_meta.json").write_text(json.dumps(meta), encoding="utf-8")
    own = ("files", "version", "created", "kind", "manifest_version", "parent_version", "symbol")
    manifest = {k: v for k, v in good.manifest.items() if k not in own}
    foreign = store.commit_draft(draft, symbol="EURUSD", kind="xgb", manifest=manifest)
    store.promote("EURUSD", "xgb", foreign.version)
    # Restart: the foreign production is refused, 1.0.0 (previous) serves at once, and
    # a replacement is trained and served.
    serving = asyncio.run(run_once(settings, 20))
    journal = tmp_path / "journal.sqlite3"
    refused = query(journal, "SELECT message FROM events WHERE kind='model_load_failed'")
    assert refused and foreign.version in str(refused[0][0])
    assert serving["xgb"] not in ("1.0.0", foreign.version)
    first_bars = query(
        journal,
        "SELECT DISTINCT version FROM model_events WHERE event='swapped' ORDER BY id",
    )
    assert ("1.0.0",) in first_bars
