"""The auto-trainer: schedule over market time, runners, scoring, shadow, promotion, rollback.

Everything runs on a fake clock with ``InlineRunner`` (jobs run on the spot) and
a fake model manager over a real store and journal, so each path is driven
deterministically; one test runs the real APScheduler runner.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from config.settings import Settings, load_settings
from market_data.bars import Bar
from ml.auto_trainer import (
    AutoTrainer,
    InlineRunner,
    JobKey,
    Schedule,
    SchedulerRunner,
    ScoreTracker,
)
from ml.model_manager import TrainingRequest, TrainResult
from ml.predictor_map import PredictorMap
from ml.store import ModelStore, VersionInfo
from ml.training import TrainOutcome
from strategy.ensemble import EnsembleResult, ModelOutput
from strategy.features import FeatureSpec
from tests.test_store import commit
from utils.clock import FakeClock
from utils.trade_journal import Journal, TradeClose, TradeOpen

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
SPEC = FeatureSpec()
ATR = SPEC.index("atr")


# --------------------------------------------------------------------------- schedule


def test_schedule_is_a_pure_function_of_market_time() -> None:
    rf, lstm = JobKey("retrain", "EURUSD", "rf"), JobKey("retrain", "EURUSD", "lstm")
    drift = JobKey("drift", "EURUSD")
    schedule = Schedule({rf: 4 * 3600, lstm: 86400, drift: 3600}, {lstm: T0 - timedelta(days=2)})
    # lstm's newest version is two days old: due at once; the others count from now.
    assert schedule.due(T0) == [lstm]
    schedule.mark(lstm, T0)
    assert schedule.due(T0 + timedelta(minutes=59)) == []
    assert schedule.due(T0 + timedelta(hours=1)) == [drift]
    schedule.mark(drift, T0 + timedelta(hours=1))
    assert schedule.due(T0 + timedelta(hours=4)) == [drift, rf]
    nxt = schedule.next_runs()
    assert nxt[lstm] == T0 + timedelta(days=1) and nxt[rf] == T0 + timedelta(hours=4)


def test_a_zero_interval_never_runs() -> None:
    key = JobKey("retrain", "EURUSD", "xgb")
    schedule = Schedule({key: 0})
    assert schedule.due(T0) == [] and schedule.due(T0 + timedelta(days=365)) == []


# --------------------------------------------------------------------------- runners


def test_inline_runner_coalesces_a_job_that_is_already_running() -> None:
    runner = InlineRunner()
    ran: list[str] = []

    def outer() -> None:
        ran.append("outer")
        # The same id while it runs is coalesced; another id runs.
        assert runner.submit("retrain:EURUSD:xgb", lambda: ran.append("dup"), lane="x") is False
        assert runner.submit("retrain:EURUSD:rf", lambda: ran.append("rf"), lane="x") is True

    assert runner.submit("retrain:EURUSD:xgb", outer, lane="training")
    assert ran == ["outer", "rf"]
    assert runner.active() == []


def test_scheduler_runner_one_job_per_id_and_failures_do_not_stop_others() -> None:
    errors: list[str] = []
    runner = SchedulerRunner(lambda job, exc: errors.append(f"{job}: {exc}"), misfire_grace_s=60)
    runner.start()
    try:
        release = threading.Event()
        started = threading.Event()
        done: list[str] = []

        def slow() -> None:
            started.set()
            assert release.wait(30)
            done.append("slow")

        def boom() -> None:
            raise RuntimeError("broken job")

        assert runner.submit("retrain:EURUSD:xgb", slow, lane="training")
        assert started.wait(30)
        # Coalesced while it runs; a failing job on the other lane does not stop anything.
        assert not runner.submit("retrain:EURUSD:xgb", slow, lane="training")
        assert runner.submit("drift:EURUSD", boom, lane="checks")
        checked = threading.Event()
        assert runner.submit("emergency:EURUSD", checked.set, lane="checks")
        assert checked.wait(30)
        assert "retrain:EURUSD:xgb (running)" in runner.active()
        release.set()
        assert runner.wait_idle(30)
        assert done == ["slow"]
        assert errors == ["drift:EURUSD: broken job"]
        # Free again once finished.
        assert runner.submit("retrain:EURUSD:xgb", lambda: None, lane="training")
        assert runner.wait_idle(30)
    finally:
        runner.shutdown()


# --------------------------------------------------------------------------- scoring


def bar(i: int, close: float, symbol: str = "EURUSD") -> Bar:
    return Bar(
        symbol=symbol,
        time=T0 + timedelta(minutes=i),
        open=close,
        high=close,
        low=close,
        close=close,
        tick_volume=1,
        spread=10,
        real_volume=0,
    )


def row(atr: float) -> np.ndarray:
    r = np.zeros(len(SPEC.names), dtype=np.float32)
    r[ATR] = atr
    return r


def result(kind: str, version: str, proba: Sequence[float], stage: str) -> EnsembleResult:
    p = np.array(proba, dtype=np.float64)
    return EnsembleResult(p, (ModelOutput(kind, version, p, 1.0, stage),), ())


def test_score_tracker_scores_both_models_by_the_realised_label() -> None:
    tracker = ScoreTracker(horizon=2, threshold_atr=0.5, atr_index=ATR)
    tracker.watch("EURUSD", "xgb", slot_version="1.0.1", prod_version="1.0.0")
    closes = [1.0, 1.0, 1.002, 1.002]  # bar 0 -> bar 2 moves +0.002 > 0.5 * ATR 0.001: up
    prod, cand = [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]
    for i, c in enumerate(closes):
        tracker.on_bar(
            bar(i, c),
            row(0.001),
            result("xgb", "1.0.0", prod, "production"),
            result("xgb", "1.0.1", cand, "shadow"),
        )
    pairs = tracker.pairs("EURUSD", "xgb")
    assert pairs is not None
    slot, serving = pairs
    # Bar 0 (up) and bar 1 (1.0 -> 1.002: up); bars 2, 3 have no label yet.
    assert slot.tolist() == pytest.approx([-np.log(0.8)] * 2)
    assert serving.tolist() == pytest.approx([-np.log(0.2)] * 2)


def test_score_tracker_ignores_bars_answered_by_other_versions() -> None:
    tracker = ScoreTracker(horizon=1, threshold_atr=0.5, atr_index=ATR)
    tracker.watch("EURUSD", "xgb", slot_version="1.0.1", prod_version="1.0.0")
    for i in range(5):
        tracker.on_bar(
            bar(i, 1.0),
            row(0.001),
            result("xgb", "0.9.9", [0.2, 0.6, 0.2], "production"),
            result("xgb", "1.0.1", [0.2, 0.6, 0.2], "shadow"),
        )
    pairs = tracker.pairs("EURUSD", "xgb")
    assert pairs is not None and len(pairs[0]) == 0


# --------------------------------------------------------------------------- lifecycle


@dataclass
class FakePredictor:
    kind: str
    version: str
    stage: str = "production"
    feature_hash: str = SPEC.hash

    def predict_proba(self, row: np.ndarray) -> np.ndarray:
        return np.array([1 / 3, 1 / 3, 1 / 3])

    def observe(self, row: np.ndarray) -> None:
        """Stateless."""


class FakeManager:
    """What the auto-trainer needs of ModelManager, over a real store."""

    def __init__(self, store: ModelStore, predictors: PredictorMap) -> None:
        self.store = store
        self.predictors = predictors
        self.weights: dict[str, float] = {}
        self.verdicts: list[bool | None] = []  # next trainings: passed / rejected / failed
        self.trained: list[tuple[str, str, str]] = []
        self.served: list[tuple[str, str, str]] = []
        self.stopped = False
        self.broken: set[str] = set()  # versions whose warm-up fails

    def train_one(
        self, request: TrainingRequest, kind: str, *, timeout_s: float | None = None
    ) -> TrainResult | None:
        self.trained.append((request.symbol, kind, request.reason))
        verdict = self.verdicts.pop(0) if self.verdicts else True
        if verdict is None:
            return None
        info = commit(
            self.store,
            symbol=request.symbol,
            kind=kind,
            payload=f"{len(self.trained)}".encode(),
            bump="patch",
        )
        self.store.set_stage(
            request.symbol, kind, info.version, "validated" if verdict else "rejected"
        )
        validation = {"passed": verdict, "reasons": "" if verdict else "sim_sharpe -2 < -1"}
        outcome = TrainOutcome(request.symbol, kind, "", {}, {}, 0.1, validation)
        return TrainResult(info, outcome, len(self.trained))

    def serve_version(self, symbol: str, kind: str, info: VersionInfo) -> None:
        self.served.append((symbol, kind, info.version))
        self.predictors.swap(symbol, kind, FakePredictor(kind, info.version))

    def load(self, symbol: str, kind: str, info: VersionInfo) -> FakePredictor:
        if info.version in self.broken:
            raise RuntimeError("warm-up failed: ONNX Runtime cannot run the graph")
        return FakePredictor(kind, info.version)

    def install(self, symbol: str, kind: str, predictor: Any, info: VersionInfo) -> None:
        self.served.append((symbol, kind, info.version))
        self.predictors.swap(symbol, kind, predictor)

    def load_for_shadow(self, symbol: str, kind: str, info: VersionInfo) -> FakePredictor:
        predictor = self.load(symbol, kind, info)
        predictor.stage = "shadow"
        return predictor

    def install_shadow(self, symbol: str, kind: str, predictor: Any) -> None:
        self.predictors.swap_shadow(symbol, kind, predictor)

    def call_in_loop(self, fn: Any) -> None:
        fn()

    def weight_of(self, kind: str, info: VersionInfo) -> float:
        return 1.0

    def retire(self, predictor: object) -> None:
        """Dropped at once here."""

    def reload(self, symbol: str, kind: str) -> None:
        info = self.store.resolve(symbol, kind)
        if info is not None:
            self.serve_version(symbol, kind, info)

    def missing_or_stale(self, symbol: str, now: datetime) -> tuple[list[str], list[str]]:
        return [], []

    def stop(self) -> None:
        self.stopped = True


@dataclass
class World:
    auto: AutoTrainer
    manager: FakeManager
    store: ModelStore
    predictors: PredictorMap
    journal: Journal
    settings: Settings
    clock: FakeClock

    def events(self) -> list[tuple[str, str | None]]:
        return self.journal.call(
            lambda conn: [
                (r[0], r[1])
                for r in conn.execute("SELECT event, version FROM model_events ORDER BY id")
            ]
        )


def make_world(tmp_path: Path, **env: str) -> Iterator[World]:
    settings = load_settings(
        environ={
            "SCALPER__TRADING__SYMBOLS": '["EURUSD"]',
            "SCALPER__MODELS__RF__ENABLED": "false",
            "SCALPER__MODELS__LSTM__ENABLED": "false",
            "SCALPER__MODELS__MLP__ENABLED": "false",
            "SCALPER__MODELS__HORIZON_BARS": "1",
            "SCALPER__AUTOTRAIN__SHADOW_MIN_BARS": "40",
            "SCALPER__AUTOTRAIN__SHADOW_MAX_BARS": "200",
            "SCALPER__AUTOTRAIN__ROLLBACK_MIN_BARS": "40",
            "SCALPER__AUTOTRAIN__ROLLBACK_MAX_BARS": "200",
            **env,
        }
    )
    clock = FakeClock(T0)
    journal = Journal(tmp_path / "journal.sqlite3", clock=clock)
    journal.open()
    store = ModelStore(tmp_path / "models", clock=clock)
    predictors = PredictorMap()
    manager = FakeManager(store, predictors)
    auto = AutoTrainer(
        settings=settings,
        manager=manager,  # type: ignore[arg-type]
        store=store,
        journal=journal,
        predictors=predictors,
        clock=clock,
        feature_spec=SPEC,
        bars_for=lambda symbol: [bar(i, 1.0) for i in range(50)],
        runner=InlineRunner(),
    )
    try:
        yield World(auto, manager, store, predictors, journal, settings, clock)
    finally:
        journal.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def feed(world: World, n: int, *, serving_p_up: float, slot_p_up: float, start: int = 0) -> None:
    """``n`` bars of a steady up-move: every label is "up"; each model says p(up)."""
    serving = world.predictors.snapshot("EURUSD")["xgb"]
    slot = world.predictors.shadow_snapshot("EURUSD")["xgb"]

    def proba(p_up: float) -> list[float]:
        return [(1 - p_up) / 2, (1 - p_up) / 2, p_up]

    for i in range(start, start + n):
        world.auto.tracker.on_bar(
            bar(i, 1.0 + 0.01 * i),
            row(0.001),
            result("xgb", serving.version, proba(serving_p_up), "production"),
            result("xgb", slot.version, proba(slot_p_up), slot.stage),
        )


def first_model(world: World) -> str:
    world.auto.request_training("EURUSD", ["xgb"], None, reason="no usable model", rows=50)
    version = world.store.aliases("EURUSD", "xgb")["production"]
    assert version is not None
    return version


def test_a_first_candidate_that_passes_serves_at_once(world: World) -> None:
    v1 = first_model(world)
    assert world.manager.served == [("EURUSD", "xgb", v1)]
    assert ("auto_promoted", v1) in world.events()
    assert world.auto.outcomes[("EURUSD", "xgb")]["outcome"] == "promoted"


def test_a_rejected_candidate_stays_rejected_and_production_is_untouched(world: World) -> None:
    v1 = first_model(world)
    world.manager.verdicts = [False]
    world.auto.request_training("EURUSD", ["xgb"], None, reason="schedule", rows=50)
    aliases = world.store.aliases("EURUSD", "xgb")
    assert aliases["production"] == v1 and aliases["shadow"] is None
    rejected = [v for v, s in world.store.stages("EURUSD", "xgb").items() if s == "rejected"]
    assert len(rejected) == 1
    assert world.predictors.shadow_snapshot("EURUSD") == {}
    outcome = world.auto.outcomes[("EURUSD", "xgb")]
    assert outcome["outcome"] == "rejected" and "sim_sharpe" in outcome["why"]


def test_shadow_success_promotes_and_a_bad_promotion_is_rolled_back(world: World) -> None:
    v1 = first_model(world)
    world.auto.request_training("EURUSD", ["xgb"], None, reason="schedule", rows=50)
    v2 = world.store.aliases("EURUSD", "xgb")["shadow"]
    assert v2 is not None and world.auto.trials[("EURUSD", "xgb")].mode == "shadow"
    # Too few scored bars: inconclusive, nothing moves.
    feed(world, 20, serving_p_up=0.4, slot_p_up=0.7)
    assert world.auto.evaluate_trial("EURUSD", "xgb") == "inconclusive"
    feed(world, 60, serving_p_up=0.4, slot_p_up=0.7, start=20)
    assert world.auto.evaluate_trial("EURUSD", "xgb") == "success"
    aliases = world.store.aliases("EURUSD", "xgb")
    assert (aliases["production"], aliases["previous"]) == (v2, v1)
    serving = world.predictors.snapshot("EURUSD")["xgb"]
    watching = world.predictors.shadow_snapshot("EURUSD")["xgb"]
    assert (serving.version, serving.stage) == (v2, "production")
    assert (watching.version, watching.stage) == (v1, "previous")
    assert world.auto.trials[("EURUSD", "xgb")].mode == "watch"
    # Live, the new model does worse than the one it replaced: automatic rollback.
    feed(world, 80, serving_p_up=0.3, slot_p_up=0.6, start=100)
    assert world.auto.evaluate_trial("EURUSD", "xgb") == "failure"
    aliases = world.store.aliases("EURUSD", "xgb")
    assert aliases["production"] == v1
    assert world.store.stages("EURUSD", "xgb")[v2] == "rejected"
    assert world.predictors.snapshot("EURUSD")["xgb"].version == v1
    assert world.predictors.shadow_snapshot("EURUSD") == {}
    events = [e for e, _ in world.events()]
    assert {"shadow_started", "shadow_promoted", "swapped", "auto_rolled_back"} <= set(events)
    alerts = world.journal.call(
        lambda conn: conn.execute("SELECT kind FROM events WHERE level='error'").fetchall()
    )
    assert ("auto_rollback",) in alerts


def test_a_candidate_that_passes_during_a_rollback_watch_waits_for_its_verdict(
    world: World,
) -> None:
    v1 = first_model(world)
    world.auto.request_training("EURUSD", ["xgb"], None, reason="schedule", rows=50)
    v2 = world.store.aliases("EURUSD", "xgb")["shadow"]
    feed(world, 80, serving_p_up=0.4, slot_p_up=0.7)
    assert world.auto.evaluate_trial("EURUSD", "xgb") == "success"  # v2 promoted, watched
    # An emergency retrain passes the gates while the watch runs: it waits.
    world.auto.request_training("EURUSD", ["xgb"], None, reason="emergency", rows=50)
    v3 = world.store.stages("EURUSD", "xgb")
    waiting = max(v3, key=lambda v: tuple(int(x) for x in v.split(".")))
    assert world.auto.trials[("EURUSD", "xgb")].mode == "watch"
    assert world.predictors.shadow_snapshot("EURUSD")["xgb"].version == v1
    assert ("shadow_waiting", waiting) in world.events()
    # The promoted model goes bad: rolled back first, then the waiting one shadows.
    feed(world, 80, serving_p_up=0.3, slot_p_up=0.6, start=100)
    assert world.auto.evaluate_trial("EURUSD", "xgb") == "failure"
    assert world.store.aliases("EURUSD", "xgb")["production"] == v1
    assert world.store.stages("EURUSD", "xgb")[str(v2)] == "rejected"
    trial = world.auto.trials[("EURUSD", "xgb")]
    assert (trial.mode, trial.version, trial.other) == ("shadow", waiting, v1)
    assert world.predictors.shadow_snapshot("EURUSD")["xgb"].version == waiting


def test_a_candidate_worse_than_production_is_never_promoted(world: World) -> None:
    v1 = first_model(world)
    world.auto.request_training("EURUSD", ["xgb"], None, reason="schedule", rows=50)
    v2 = world.store.aliases("EURUSD", "xgb")["shadow"]
    outcomes = []
    for start in range(0, 200, 20):
        feed(world, 20, serving_p_up=0.6, slot_p_up=0.45, start=start)
        outcomes.append(world.auto.evaluate_trial("EURUSD", "xgb"))
        if outcomes[-1] != "inconclusive":
            break
    assert outcomes[-1] == "failure" and "success" not in outcomes
    assert world.store.aliases("EURUSD", "xgb")["production"] == v1
    assert world.store.stages("EURUSD", "xgb")[str(v2)] == "rejected"
    assert world.predictors.shadow_snapshot("EURUSD") == {}


def test_an_inconclusive_trial_expires_and_is_rejected(world: World) -> None:
    v1 = first_model(world)
    world.auto.request_training("EURUSD", ["xgb"], None, reason="schedule", rows=50)
    rng = np.random.default_rng(3)
    serving = world.predictors.snapshot("EURUSD")["xgb"]
    slot = world.predictors.shadow_snapshot("EURUSD")["xgb"]
    outcome = None
    for i in range(260):
        # Equal on average and noisy: no verdict before shadow_max_bars (200).
        p = float(rng.uniform(0.2, 0.8))
        q = float(np.clip(p + rng.normal(0, 0.3), 0.05, 0.95))
        world.auto.tracker.on_bar(
            bar(i, 1.0 + 0.01 * i),
            row(0.001),
            result("xgb", serving.version, [(1 - p) / 2, (1 - p) / 2, p], "production"),
            result("xgb", slot.version, [(1 - q) / 2, (1 - q) / 2, q], "shadow"),
        )
        if i % 20 == 19:
            outcome = world.auto.evaluate_trial("EURUSD", "xgb")
            if outcome != "inconclusive":
                break
    assert outcome in ("expired", "failure", "success")
    if outcome != "success":
        assert world.store.aliases("EURUSD", "xgb")["production"] == v1


def test_a_newer_candidate_replaces_the_one_in_shadow(world: World) -> None:
    first_model(world)
    world.auto.request_training("EURUSD", ["xgb"], None, reason="schedule", rows=50)
    v2 = world.store.aliases("EURUSD", "xgb")["shadow"]
    world.auto.request_training("EURUSD", ["xgb"], None, reason="drift", rows=50)
    v3 = world.store.aliases("EURUSD", "xgb")["shadow"]
    assert v3 != v2 and world.store.stages("EURUSD", "xgb")[str(v2)] == "rejected"
    assert world.predictors.shadow_snapshot("EURUSD")["xgb"].version == v3


def test_a_scheduled_retrain_waits_for_the_trial_in_progress(world: World) -> None:
    first_model(world)
    world.auto.request_training("EURUSD", ["xgb"], None, reason="drift", rows=50)
    v2 = world.store.aliases("EURUSD", "xgb")["shadow"]
    trained = len(world.manager.trained)
    interval = world.settings.models.xgb.retrain_every_s
    world.auto.tick(T0)
    ran = world.auto.tick(T0 + timedelta(seconds=interval))
    assert JobKey("retrain", "EURUSD", "xgb") in ran  # due, but deferred
    assert len(world.manager.trained) == trained
    assert world.store.aliases("EURUSD", "xgb")["shadow"] == v2


def test_a_manual_promote_ends_the_trial(world: World) -> None:
    first_model(world)
    world.auto.request_training("EURUSD", ["xgb"], None, reason="schedule", rows=50)
    v2 = str(world.store.aliases("EURUSD", "xgb")["shadow"])
    world.store.promote("EURUSD", "xgb", v2)
    world.auto.reload("EURUSD", "xgb")
    assert world.auto.trials == {}
    assert world.predictors.snapshot("EURUSD")["xgb"].version == v2


def test_a_candidate_that_fails_warm_up_is_not_swapped(world: World) -> None:
    v1 = first_model(world)
    world.manager.broken = {"1.0.1"}
    world.auto.request_training("EURUSD", ["xgb"], None, reason="schedule", rows=50)
    assert world.store.aliases("EURUSD", "xgb")["shadow"] is None
    assert world.store.stages("EURUSD", "xgb")["1.0.1"] == "rejected"
    assert world.predictors.shadow_snapshot("EURUSD") == {}
    assert world.predictors.snapshot("EURUSD")["xgb"].version == v1
    assert ("swap_failed", "1.0.1") in world.events()


def test_failed_runs_alert_after_three_in_a_row(world: World) -> None:
    world.manager.verdicts = [None, None, None]
    for _ in range(3):
        world.auto.request_training("EURUSD", ["xgb"], None, reason="schedule", rows=50)
    alerts = world.journal.call(
        lambda conn: conn.execute(
            "SELECT kind FROM events WHERE kind='training_failing'"
        ).fetchall()
    )
    assert len(alerts) == 1


def test_tick_dispatches_due_retrains_and_writes_the_status(world: World) -> None:
    first_model(world)
    interval = world.settings.models.xgb.retrain_every_s
    trained_before = len(world.manager.trained)
    world.auto.tick(T0)
    # The first model's data ends at "trained" in its manifest (none here: created = T0).
    ran = world.auto.tick(T0 + timedelta(seconds=interval))
    assert JobKey("retrain", "EURUSD", "xgb") in ran
    assert len(world.manager.trained) == trained_before + 1
    assert world.manager.trained[-1][2] == "schedule"
    world.auto._write_status(force=True)
    state = world.journal.get_state("autotrain")
    assert isinstance(state, dict)
    assert "retrain:EURUSD:xgb" in state["next_runs"]
    assert state["last_outcomes"]["EURUSD/xgb"]["outcome"] == "shadow"


# --------------------------------------------------------------------------- emergency


def close_trades(journal: Journal, profits: Sequence[float], start: int = 0) -> None:
    for i, profit in enumerate(profits, start=start):
        coid = f"T{i:05d}"
        journal.open_trade(
            TradeOpen(coid, "EURUSD", "buy", 0.1, T0, 1.1, None, None, i, 0.0, 0.6, "xgb", "paper")
        )
        journal.close_trade(TradeClose(coid, T0 + timedelta(minutes=5), 1.1, "tp", profit, 0, 0, 5))
    journal.flush_sync()


def test_emergency_retrain_on_a_losing_streak_fires_once_per_new_trades(tmp_path: Path) -> None:
    gen = make_world(tmp_path, SCALPER__AUTOTRAIN__EMERGENCY_MIN_TRADES="5")
    world = next(gen)
    try:
        close_trades(world.journal, [5.0, -1.0, -1.0, -1.0, -1.0, -1.0])
        why = world.auto.check_emergency("EURUSD")
        assert why is not None and "win rate 0%" in why
        assert world.manager.trained[-1][2].startswith("emergency: win rate")
        # The same losing trades do not fire again...
        assert world.auto.check_emergency("EURUSD") is None
        # ...five new winners do not either.
        close_trades(world.journal, [1.0] * 5, start=100)
        assert world.auto.check_emergency("EURUSD") is None
    finally:
        gen.close()


def test_emergency_retrain_on_drawdown_since_the_last_promotion(tmp_path: Path) -> None:
    gen = make_world(tmp_path, SCALPER__AUTOTRAIN__EMERGENCY_MAX_DRAWDOWN_PCT="5")
    world = next(gen)
    try:
        first_model(world)
        for i, equity in enumerate([10_000, 10_200, 9_600, 9_500]):
            world.journal.record_equity(T0 + timedelta(minutes=i + 1), equity, equity, 0, equity, 0)
        world.journal.flush_sync()
        why = world.auto.check_emergency("EURUSD")
        assert why is not None and "drawdown 6.9%" in why
        # The same drawdown does not fire again before new trades close.
        assert world.auto.check_emergency("EURUSD") is None
    finally:
        gen.close()


# --------------------------------------------------------------------------- drift


def synthetic_bars(n: int) -> list[Bar]:
    from market_data.synthetic import SyntheticMarket

    frame = SyntheticMarket(seed=5).generate(n)
    return [
        Bar(
            symbol="EURUSD",
            time=t.to_pydatetime(),
            open=float(o),
            high=float(h),
            low=float(lo),
            close=float(c),
            tick_volume=int(v),
            spread=int(sp),
        )
        for t, o, h, lo, c, v, sp in zip(
            frame["time"],
            frame["open"],
            frame["high"],
            frame["low"],
            frame["close"],
            frame["tick_volume"],
            frame["spread"],
            strict=True,
        )
    ]


def test_drift_alarm_triggers_one_retrain_per_serving_version(tmp_path: Path) -> None:
    from ml.drift import save_reference
    from strategy.features import BarColumns, compute_features

    gen = make_world(tmp_path)
    world = next(gen)
    try:
        bars = synthetic_bars(3000)
        world.auto._bars_for = lambda symbol: bars
        v1 = first_model(world)
        X = compute_features(
            SPEC, BarColumns.from_bars(bars), point=0.00001, default_spread_points=10
        )
        path = world.store.version_info("EURUSD", "xgb", v1).path
        # The model learnt on these very bars' features: no drift.
        save_reference(path, X[500:], SPEC.names)
        assert world.auto.check_drift("EURUSD") == []
        events = world.events()
        assert ("drift_check", v1) in events
        # A model trained on a market twice as volatile and shifted: drift, one retrain.
        world.auto._references.clear()
        save_reference(path, X[500:] * 2.0 + 1.0, SPEC.names)
        trained = len(world.manager.trained)
        assert world.auto.check_drift("EURUSD") == ["xgb"]
        assert world.manager.trained[trained:] == [("EURUSD", "xgb", "drift")]
        assert ("drift_alarm", v1) in world.events()
        # Still drifted, but this version already had its retrain.
        assert world.auto.check_drift("EURUSD") == []
        assert len(world.manager.trained) == trained + 1
    finally:
        gen.close()
