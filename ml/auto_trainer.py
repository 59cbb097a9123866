"""The auto-trainer: what to retrain and when, and what each candidate becomes.

Two loops share one process (DESIGN.md, The two loops). The bar loop decides
trades; this module keeps the models fresh beside it:

- **When** is a pure function of market time: :class:`Schedule` ``.due(now)``
  lists the jobs whose interval has passed (retrain per symbol and kind, with
  each kind's ``models.<kind>.retrain_every_s``; staleness, drift and
  emergency checks per symbol). In paper replay the bar loop ticks it with
  every bar (``AutoTrainer.tick``); live, an APScheduler job ticks it every
  ``autotrain.tick_s`` on the scheduler's own thread. Tests tick it with a
  fake clock.
- **Where** jobs run: a :class:`SchedulerRunner` around an APScheduler
  ``BackgroundScheduler`` with two one-thread executors, ``training`` (a
  thread that waits on the training worker process) and ``checks`` (drift,
  emergency, shadow verdicts). One job per id (``retrain:EURUSD:xgb``) at a
  time: a trigger for a job that is queued or running is coalesced into it.
  A job that raises is journaled and the others go on. :class:`InlineRunner`
  runs each job on the spot, for tests and backtests (deterministic).
- **What a candidate becomes** (DESIGN.md, Lifecycle): the training worker
  runs the validation gates (``ml.validation``). A rejected candidate stays
  ``rejected`` with its failed gates journaled. A passing candidate for a
  kind with nothing serving is promoted at once (there is nothing to shadow
  against; the gates include beating the baseline). Otherwise it becomes
  ``shadow``: it predicts on live bars beside production, both are scored by
  the realised label once ``horizon_bars`` have passed (:class:`ScoreTracker`)
  and a one-sided paired test decides: promoted, rejected, or wait (up to
  ``shadow_max_bars``, then rejected). After a promotion the replaced model
  keeps predicting in the shadow slot (stage ``previous``): when the same test
  finds the new one worse, production rolls back to it and the new version is
  rejected for good (the store never promotes a rejected version again by
  itself). A scheduled retrain of a kind on trial waits for the verdict; a
  triggered one (drift, emergency, manual) replaces the candidate in shadow; a
  candidate that passes during a rollback watch waits for the watch's verdict
  (rollback is the quick way back from a bad promotion), then shadows.

Shadow scores live in memory: a restart begins the trial again from zero (the
candidate stays in the store's shadow alias and is loaded back at start-up); a
rollback watch in progress ends with a restart (the promotion stands; the
store's ``previous`` alias still allows ``python main.py models rollback``).
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import numpy as np
import structlog

from config.settings import Settings
from market_data.bars import Bar
from ml.model_manager import TRAINING_ORDER, ModelManager, TrainingRequest
from ml.predictor_map import PredictorMap
from ml.store import ModelStore, VersionInfo
from strategy.ensemble import EnsembleResult
from strategy.features import BarColumns, FeatureSpec
from utils.clock import Clock, iso_utc
from utils.trade_journal import Journal

log = structlog.get_logger(__name__)

AUTOTRAIN_STATE_KEY = "autotrain"
RETRAIN, STALENESS, DRIFT, EMERGENCY = "retrain", "staleness", "drift", "emergency"
STALENESS_EVERY_S = 3600
# Time-of-day and weekday features: a window shorter than a week cannot match the
# training window's mix of them, so drift checks leave them out.
CALENDAR_FEATURES = frozenset({"tod_sin", "tod_cos", "day_of_week"})
# Consecutive failed runs of one (symbol, kind) before an operator is alerted.
FAILURES_BEFORE_ALERT = 3


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True, order=True)
class JobKey:
    action: str
    symbol: str
    kind: str = ""

    @property
    def id(self) -> str:
        return f"{self.action}:{self.symbol}" + (f":{self.kind}" if self.kind else "")


class Schedule:
    """Which jobs are due at market time ``now``: a pure function of the times given.

    A job with no recorded last run counts from the first time it is seen, so a
    fresh start runs nothing at once; ``mark`` records a run (at dispatch, so a
    job that fails waits a whole interval before it is tried again).
    """

    def __init__(
        self, intervals: Mapping[JobKey, float], last: Mapping[JobKey, datetime] | None = None
    ) -> None:
        self._every = {k: timedelta(seconds=v) for k, v in intervals.items() if v > 0}
        self._last: dict[JobKey, datetime] = dict(last or {})

    def due(self, now: datetime) -> list[JobKey]:
        due = []
        for key, every in sorted(self._every.items()):
            last = self._last.setdefault(key, now)
            if now - last >= every:
                due.append(key)
        return due

    def mark(self, key: JobKey, now: datetime) -> None:
        self._last[key] = now

    def next_runs(self) -> dict[JobKey, datetime]:
        return {k: self._last[k] + e for k, e in sorted(self._every.items()) if k in self._last}


# --------------------------------------------------------------------------- runners


class Runner(Protocol):
    def submit(self, job_id: str, fn: Callable[[], object], *, lane: str) -> bool:
        """Run ``fn`` once on ``lane``; False when ``job_id`` is already queued or running."""
        ...

    def every(self, seconds: float, fn: Callable[[], object], *, job_id: str) -> None: ...

    def active(self) -> list[str]: ...

    def start(self) -> None: ...

    def wait_idle(self, timeout_s: float | None = None) -> bool: ...

    def shutdown(self) -> None: ...


class _Tracked:
    """Bookkeeping shared by the runners: one job per id, failures journaled."""

    def __init__(self, on_error: Callable[[str, BaseException], None] | None = None) -> None:
        self._lock = threading.Condition()
        self._active: dict[str, str] = {}  # job id -> "queued" | "running"
        self._on_error = on_error or _log_job_error

    def _claim(self, job_id: str) -> bool:
        with self._lock:
            if job_id in self._active:
                return False
            self._active[job_id] = "queued"
            return True

    def _wrap(self, job_id: str, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> None:
            with self._lock:
                self._active[job_id] = "running"
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - one job's failure never stops the others
                self._on_error(job_id, exc)
            finally:
                with self._lock:
                    self._active.pop(job_id, None)
                    self._lock.notify_all()

        return run

    def active(self) -> list[str]:
        with self._lock:
            return sorted(f"{k} ({v})" for k, v in self._active.items())

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: not self._active, timeout_s)


def _log_job_error(job_id: str, exc: BaseException) -> None:
    log.error("autotrain_job_failed", job=job_id, error=f"{type(exc).__name__}: {exc}")


class InlineRunner(_Tracked):
    """Runs every job at once in the caller's thread (tests, backtests)."""

    def submit(self, job_id: str, fn: Callable[[], object], *, lane: str) -> bool:
        if not self._claim(job_id):
            return False
        self._wrap(job_id, fn)()
        return True

    def every(self, seconds: float, fn: Callable[[], object], *, job_id: str) -> None:
        """Nothing ticks by itself here: the caller ticks."""

    def start(self) -> None:
        """Nothing to start."""

    def shutdown(self) -> None:
        """Nothing to stop."""


class SchedulerRunner(_Tracked):
    """An APScheduler ``BackgroundScheduler`` (its own thread) with two one-thread lanes."""

    def __init__(
        self, on_error: Callable[[str, BaseException], None] | None = None, *, misfire_grace_s: int
    ) -> None:
        super().__init__(on_error)
        from apscheduler.events import EVENT_JOB_MISSED, JobExecutionEvent
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        self._scheduler = BackgroundScheduler(
            executors={"training": ThreadPoolExecutor(1), "checks": ThreadPoolExecutor(1)},
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": misfire_grace_s,
            },
            timezone="UTC",
        )

        def missed(event: JobExecutionEvent) -> None:
            # A one-shot job that missed its start: release its id so it can run again.
            with self._lock:
                self._active.pop(str(event.job_id), None)
                self._lock.notify_all()
            log.warning("autotrain_job_missed", job=event.job_id)

        self._scheduler.add_listener(missed, EVENT_JOB_MISSED)

    def submit(self, job_id: str, fn: Callable[[], object], *, lane: str) -> bool:
        if not self._claim(job_id):
            return False
        try:
            self._scheduler.add_job(self._wrap(job_id, fn), id=job_id, name=job_id, executor=lane)
        except Exception:
            with self._lock:
                self._active.pop(job_id, None)
            raise
        return True

    def every(self, seconds: float, fn: Callable[[], object], *, job_id: str) -> None:
        self._scheduler.add_job(
            fn, "interval", seconds=seconds, id=job_id, name=job_id, executor="checks"
        )

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        """Stop the scheduler and wait for the job in progress (the trainer was stopped
        first, so a training job ends as soon as its worker is gone)."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)


# --------------------------------------------------------------------------- scoring


@dataclass
class _Watch:
    """One comparison on live bars: ``slot`` (shadow or previous) vs serving ``prod``."""

    slot_version: str
    prod_version: str
    slot_loss: list[float] = field(default_factory=list)
    prod_loss: list[float] = field(default_factory=list)


class ScoreTracker:
    """Per-bar log-loss of the serving and the shadow-slot model of each watched kind.

    Fed on the loop thread with every decided bar; the label of a bar is known
    ``horizon`` bars later (the training label: forward move against
    ``threshold_atr`` x the bar's ATR). Only bars where both watched versions
    answered count. Read from the scheduler thread through ``pairs``.
    """

    def __init__(self, *, horizon: int, threshold_atr: float, atr_index: int) -> None:
        self._h = horizon
        self._k = threshold_atr
        self._atr = atr_index
        self._lock = threading.Lock()
        self._watches: dict[tuple[str, str], _Watch] = {}
        # Per symbol: (close, atr, {kind: (version, proba)} serving, same for the slot).
        self._pending: dict[str, deque[tuple[float, float, dict[str, Any], dict[str, Any]]]] = {}

    def watch(self, symbol: str, kind: str, *, slot_version: str, prod_version: str) -> None:
        with self._lock:
            if not any(k[0] == symbol for k in self._watches):
                # Bars are fed only while a shadow slot is filled: start a fresh window.
                self._pending.pop(symbol, None)
            self._watches[(symbol, kind)] = _Watch(slot_version, prod_version)

    def unwatch(self, symbol: str, kind: str) -> None:
        with self._lock:
            self._watches.pop((symbol, kind), None)

    def watching(self) -> dict[tuple[str, str], tuple[str, str, int]]:
        with self._lock:
            return {
                k: (w.slot_version, w.prod_version, len(w.slot_loss))
                for k, w in self._watches.items()
            }

    def pairs(self, symbol: str, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(slot losses, serving losses) so far, or None when not watched."""
        with self._lock:
            w = self._watches.get((symbol, kind))
            if w is None:
                return None
            return np.array(w.slot_loss), np.array(w.prod_loss)

    def on_bar(
        self, bar: Bar, row: np.ndarray, result: EnsembleResult, shadow: EnsembleResult
    ) -> None:
        with self._lock:
            if not any(k[0] == bar.symbol for k in self._watches):
                self._pending.pop(bar.symbol, None)
                return
            queue = self._pending.setdefault(bar.symbol, deque(maxlen=self._h + 1))
            serving = {o.kind: (o.version, o.proba) for o in result.outputs}
            slot = {o.kind: (o.version, o.proba) for o in shadow.outputs}
            queue.append((float(bar.close), float(row[self._atr]), serving, slot))
            if len(queue) <= self._h:
                return
            close0, atr0, serving0, slot0 = queue[0]
            move = float(bar.close) - close0
            if not (math.isfinite(move) and math.isfinite(atr0) and atr0 >= 0):
                return
            band = self._k * atr0
            label = 2 if move > band else (0 if move < -band else 1)
            for (symbol, kind), w in self._watches.items():
                if symbol != bar.symbol or kind not in serving0 or kind not in slot0:
                    continue
                (pv, pp), (sv, sp) = serving0[kind], slot0[kind]
                if pv != w.prod_version or sv != w.slot_version:
                    continue
                w.prod_loss.append(-math.log(max(float(pp[label]), 1e-12)))
                w.slot_loss.append(-math.log(max(float(sp[label]), 1e-12)))


# --------------------------------------------------------------------------- trainer


@dataclass
class Trial:
    """A candidate in shadow, or a new production under the rollback watch."""

    mode: str  # "shadow" | "watch"
    version: str  # the candidate (shadow) or the new production (watch)
    other: str  # the production it is compared with (shadow) or the previous (watch)
    started: datetime
    evaluated_at: int = 0


class AutoTrainer:
    """Schedules retrains and checks, and walks candidates through their lifecycle."""

    def __init__(
        self,
        *,
        settings: Settings,
        manager: ModelManager,
        store: ModelStore,
        journal: Journal,
        predictors: PredictorMap,
        clock: Clock,
        feature_spec: FeatureSpec,
        bars_for: Callable[[str], Sequence[Bar]],
        runner: Runner | None = None,
    ) -> None:
        self._s = settings
        self._a = settings.autotrain
        self._manager = manager
        self._store = store
        self._journal = journal
        self._predictors = predictors
        self._clock = clock
        self._spec = feature_spec
        self._bars_for = bars_for
        self.runner: Runner = runner or SchedulerRunner(
            self._job_failed, misfire_grace_s=self._a.misfire_grace_s
        )
        self.tracker = ScoreTracker(
            horizon=settings.models.horizon_bars,
            threshold_atr=settings.models.label_threshold_atr,
            atr_index=feature_spec.index("atr"),
        )
        self._lock = threading.RLock()
        self.trials: dict[tuple[str, str], Trial] = {}
        # Candidates that passed the gates during a rollback watch, next in line for shadow.
        self._waiting: dict[tuple[str, str], VersionInfo] = {}
        self.outcomes: dict[tuple[str, str], dict[str, Any]] = {}
        self._failures: dict[tuple[str, str], int] = {}
        self._emergency_after: dict[str, int] = {}  # symbol -> last trade id considered
        self._references: dict[tuple[str, str, str], tuple[np.ndarray, tuple[str, ...]]] = {}
        self._market_now: datetime | None = None
        self._trained_at: dict[tuple[str, str, str], str | None] = {}
        # One drift-triggered retrain per serving version: an alarm on a market that
        # keeps differing from the training window must not retrain every hour.
        self._drift_retrained: set[tuple[str, str, str]] = set()
        # Market time of each (symbol, kind)'s latest training attempt, any outcome.
        self._attempted: dict[tuple[str, str], datetime] = {}
        # Service hooks set by the daemon: alerts (kind, message, details, symbol) and
        # each training run's outcome ("failed", "rejected", "passed", "trained").
        self.alert_sink: Callable[[str, str, dict[str, Any], str | None], None] | None = None
        self.on_training: Callable[[str], None] | None = None
        self._status_written = -math.inf
        self._stopped = False
        self.schedule = Schedule(self._intervals(), self._last_versions())

    # -- schedule -----------------------------------------------------------------------

    def _intervals(self) -> dict[JobKey, float]:
        out: dict[JobKey, float] = {}
        if not self._a.enabled:
            return out
        for symbol in self._s.trading.symbols:
            for kind in self._s.models.enabled_kinds:
                out[JobKey(RETRAIN, symbol, kind)] = self._s.models.kind(kind).retrain_every_s
            out[JobKey(STALENESS, symbol)] = STALENESS_EVERY_S
            out[JobKey(DRIFT, symbol)] = self._a.drift_check_every_s
            out[JobKey(EMERGENCY, symbol)] = self._a.emergency_check_every_s
        return out

    def _last_versions(self) -> dict[JobKey, datetime]:
        """A retrain is next due one interval after the newest version's data."""
        last = {}
        for symbol in self._s.trading.symbols:
            for kind in self._s.models.enabled_kinds:
                try:
                    versions = self._store.versions(symbol, kind)
                except Exception as exc:  # noqa: BLE001 - an unreadable store: count from now
                    log.warning("store_unreadable", symbol=symbol, kind=kind, error=str(exc))
                    continue
                if versions:
                    last[JobKey(RETRAIN, symbol, kind)] = ModelStore.trained_at(versions[-1])
        return last

    def tick(self, now: datetime) -> list[JobKey]:
        """Dispatch what is due at market time ``now`` (cheap: the bar loop calls it)."""
        if self._stopped:
            return []
        self._market_now = now
        due = self.schedule.due(now)
        for key in due:
            self.schedule.mark(key, now)
            if key.action == RETRAIN and (key.symbol, key.kind) in self.trials:
                # A trial in progress gets its verdict before a scheduled retrain
                # replaces it (triggers - drift, emergency, manual - do not wait).
                log.info("retrain_deferred", job=key.id, why="trial in progress")
            elif key.action == RETRAIN:
                self.request_training(
                    key.symbol, [key.kind], None, reason="schedule", rows=self._s.models.train_bars
                )
            elif key.action == STALENESS:
                self._submit(key.id, functools.partial(self.check_staleness, key.symbol), "checks")
            elif key.action == DRIFT:
                self._submit(key.id, functools.partial(self.check_drift, key.symbol), "checks")
            elif key.action == EMERGENCY:
                self._submit(key.id, functools.partial(self.check_emergency, key.symbol), "checks")
        self._tick_trials()
        self._write_status()
        return due

    def _tick_trials(self) -> None:
        step = max(10, min(self._a.shadow_min_bars, self._a.rollback_min_bars) // 10)
        for (symbol, kind), scored in self.tracker.watching().items():
            trial = self.trials.get((symbol, kind))
            if trial is None:
                continue
            n = scored[2]
            low = self._a.shadow_min_bars if trial.mode == "shadow" else self._a.rollback_min_bars
            if n >= low and n - trial.evaluated_at >= step:
                trial.evaluated_at = n
                self._submit(
                    f"{trial.mode}:{symbol}:{kind}",
                    functools.partial(self.evaluate_trial, symbol, kind),
                    "checks",
                )

    def _submit(self, job_id: str, fn: Callable[[], object], lane: str) -> bool:
        def guarded() -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - one job's failure never stops the others
                self._job_failed(job_id, exc)

        return self.runner.submit(job_id, guarded, lane=lane)

    def _job_failed(self, job_id: str, exc: BaseException) -> None:
        message = f"{job_id}: {type(exc).__name__}: {exc}"
        self._journal.record_event("error", "autotrain_job_failed", message, {"job": job_id})
        log.error("autotrain_job_failed", job=job_id, error=f"{type(exc).__name__}: {exc}")

    # -- lifecycle of the service -----------------------------------------------------

    def start(self, *, live: bool) -> None:
        """Start the scheduler thread; live, it also ticks ``due`` by the wall clock."""
        if live and self._a.enabled:
            self.runner.every(self._a.tick_s, lambda: self.tick(self._clock.now()), job_id="tick")
        self.runner.start()

    def stop(self) -> None:
        if not self._stopped:
            self._write_status(force=True)
        self._stopped = True
        self._manager.stop()
        self.runner.shutdown()

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        return self.runner.wait_idle(timeout_s)

    # -- training -----------------------------------------------------------------------

    def request_training(
        self,
        symbol: str,
        kinds: Sequence[str],
        cols: BarColumns | None,
        *,
        reason: str,
        rows: int,
    ) -> list[str]:
        """Queue one retrain per kind (fastest kinds first); returns the kinds queued.

        A kind already queued or training for ``symbol`` is coalesced into that job.
        """
        rank = {k: i for i, k in enumerate(TRAINING_ORDER)}
        queued = []
        for kind in sorted(kinds, key=lambda k: rank.get(k, len(rank))):
            request = TrainingRequest(symbol, (kind,), cols, reason, rows)
            job_id = JobKey(RETRAIN, symbol, kind).id
            if self._submit(job_id, functools.partial(self._retrain, request, kind), "training"):
                queued.append(kind)
            else:
                log.debug("retrain_coalesced", symbol=symbol, kind=kind, reason=reason)
        return queued

    def _retrain(self, request: TrainingRequest, kind: str) -> None:
        key = (request.symbol, kind)
        before = self.outcomes.get(key)
        try:
            self._retrain_once(request, kind)
        finally:
            after = self.outcomes.get(key)
            if after is not None and after is not before and self.on_training is not None:
                self.on_training(str(after.get("outcome")))

    def _retrain_once(self, request: TrainingRequest, kind: str) -> None:
        symbol = request.symbol
        if self._stopped:
            return
        if request.cols is None:
            bars = list(self._bars_for(symbol))[-request.rows :]
            request = TrainingRequest(
                symbol, request.kinds, BarColumns.from_bars(bars), request.reason, request.rows
            )
        log.info("training_progress", symbol=symbol, kind=kind, reason=request.reason)
        key = (symbol, kind)
        self._attempted[key] = self._now()
        result = self._manager.train_one(request, kind, timeout_s=self._a.job_timeout_s)
        when = iso_utc(self._clock.now())
        if result is None:
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            self.outcomes[key] = {"outcome": "failed", "reason": request.reason, "time": when}
            if failures >= FAILURES_BEFORE_ALERT and not self._stopped:
                self._alert(
                    "training_failing",
                    f"{symbol} {kind}: {failures} training runs in a row failed; "
                    "see training_runs and the log",
                    {"symbol": symbol, "kind": kind, "failures": failures},
                )
            return
        self._failures[key] = 0
        info, outcome = result.info, result.outcome
        if outcome.validation is None:
            self.outcomes[key] = {"outcome": "trained", "version": info.version, "time": when}
            return
        if not outcome.passed:
            self.outcomes[key] = {
                "outcome": "rejected",
                "version": info.version,
                "why": outcome.validation.get("reasons"),
                "reason": request.reason,
                "time": when,
            }
            return
        self.outcomes[key] = {
            "outcome": "passed",
            "version": info.version,
            "reason": request.reason,
            "time": when,
        }
        self._after_gates(symbol, kind, info)

    def _after_gates(self, symbol: str, kind: str, info: VersionInfo) -> None:
        """A passing candidate: serve it if nothing serves the kind, else shadow it.

        It is loaded and warmed first: a candidate that cannot serve (warm-up
        fails) is rejected and nothing is swapped or moved in the store.
        """
        serving = self._predictors.snapshot(symbol).get(kind)
        production = self._store.aliases(symbol, kind).get("production")
        first = serving is None or serving.version != production
        with self._lock:
            trial = self.trials.get((symbol, kind))
            if not first and trial is not None and trial.mode == "watch":
                # The rollback watch decides first: it is the quick way back from a bad
                # promotion. The candidate starts its shadow trial when the watch ends.
                self._waiting[(symbol, kind)] = info
                self._journal.record_model_event(
                    "shadow_waiting",
                    symbol=symbol,
                    kind=kind,
                    version=info.version,
                    details={"until": f"the rollback watch of {trial.version} ends"},
                )
                self.outcomes[(symbol, kind)]["outcome"] = "waiting for the rollback watch"
                return
        try:
            predictor = (
                self._manager.load(symbol, kind, info)
                if first
                else self._manager.load_for_shadow(symbol, kind, info)
            )
        except Exception as exc:  # noqa: BLE001 - not swapped; journaled with the reason
            self._store.set_stage(symbol, kind, info.version, "rejected")
            error = f"{type(exc).__name__}: {exc}"
            self._journal.record_model_event(
                "swap_failed",
                symbol=symbol,
                kind=kind,
                version=info.version,
                details={"error": error},
            )
            self._journal.record_event(
                "error", "swap_failed", f"{symbol} {kind} {info.version}: {error}", {}
            )
            self.outcomes[(symbol, kind)]["outcome"] = "rejected at warm-up"
            self.outcomes[(symbol, kind)]["why"] = error
            return
        if first or serving is None:
            info = self._store.promote(symbol, kind, info.version)
            self._manager.install(symbol, kind, predictor, info)
            self._journal.record_model_event(
                "auto_promoted",
                symbol=symbol,
                kind=kind,
                version=info.version,
                details={"why": "passed the gates and nothing served this kind"},
            )
            self.outcomes[(symbol, kind)]["outcome"] = "promoted"
            return
        with self._lock:
            # A newer candidate replaces one in shadow (a watch never reaches here).
            self._end_trial(symbol, kind, reject_shadow=True, why="replaced by a newer candidate")
            self._store.set_shadow(symbol, kind, info.version)
            self._manager.install_shadow(symbol, kind, predictor)
            self.tracker.watch(
                symbol, kind, slot_version=info.version, prod_version=serving.version
            )
            self.trials[(symbol, kind)] = Trial(
                "shadow", info.version, serving.version, self._now()
            )
        self._journal.record_model_event(
            "shadow_started",
            symbol=symbol,
            kind=kind,
            version=info.version,
            details={"production": serving.version, "min_bars": self._a.shadow_min_bars},
        )
        self.outcomes[(symbol, kind)]["outcome"] = "shadow"
        log.info("shadow_started", symbol=symbol, kind=kind, version=info.version)

    def _now(self) -> datetime:
        return self._market_now or self._clock.now()

    # -- shadow and rollback ------------------------------------------------------------

    def evaluate_trial(self, symbol: str, kind: str) -> str | None:
        """Run the paired test of a trial; act on success/failure/expiry. Returns the outcome."""
        from ml.validation import paired_noninferiority

        with self._lock:
            trial = self.trials.get((symbol, kind))
            pairs = self.tracker.pairs(symbol, kind)
            if trial is None or pairs is None:
                return None
            slot_loss, prod_loss = pairs
            block = max(10, 2 * self._s.models.horizon_bars)
            if trial.mode == "shadow":
                verdict = paired_noninferiority(
                    slot_loss,
                    prod_loss,
                    margin=self._a.shadow_margin,
                    alpha=self._a.shadow_alpha,
                    min_samples=self._a.shadow_min_bars,
                    max_samples=self._a.shadow_max_bars,
                    block=block,
                )
            else:
                # Rolled back only when worse than the previous by more than the margin.
                verdict = paired_noninferiority(
                    prod_loss,
                    slot_loss,
                    margin=self._a.rollback_margin,
                    alpha=self._a.shadow_alpha,
                    min_samples=self._a.rollback_min_bars,
                    max_samples=self._a.rollback_max_bars,
                    block=block,
                    failure_margin=self._a.rollback_margin,
                )
            outcome = verdict.outcome
            if outcome == "inconclusive":
                return outcome
            details = {"verdict": verdict.as_dict(), "compared_with": trial.other}
            if trial.mode == "shadow" and outcome == "success":
                self._promote_shadow(symbol, kind, trial, details)
            elif trial.mode == "shadow":
                self._end_trial(symbol, kind, reject_shadow=True, why=outcome, details=details)
            elif outcome == "failure":
                self._rollback(symbol, kind, trial, details)
            else:
                self._end_trial(symbol, kind, reject_shadow=False, why=outcome, details=details)
            if trial.mode == "watch":
                self._start_waiting(symbol, kind)
            return outcome

    def _start_waiting(self, symbol: str, kind: str) -> None:
        """A candidate that passed during a rollback watch begins its shadow trial now."""
        info = self._waiting.pop((symbol, kind), None)
        if info is None:
            return
        self.outcomes[(symbol, kind)] = {"outcome": "passed", "version": info.version}
        # Through the loop: a rollback's swap was queued there first, so the candidate
        # is compared with the production that really serves after it.
        job = functools.partial(self._after_gates, symbol, kind, info)

        def queue() -> None:
            self._submit(f"shadow:{symbol}:{kind}:next", job, "checks")

        self._manager.call_in_loop(queue)

    def _promote_shadow(
        self, symbol: str, kind: str, trial: Trial, details: dict[str, Any]
    ) -> None:
        """The shadow object becomes production; the old one watches as ``previous``."""
        info = self._store.promote(symbol, kind, trial.version)
        self.tracker.unwatch(symbol, kind)
        del self.trials[(symbol, kind)]
        new = self._predictors.shadow_snapshot(symbol).get(kind)
        old = self._predictors.snapshot(symbol).get(kind)
        self._journal.record_model_event(
            "shadow_promoted", symbol=symbol, kind=kind, version=info.version, details=details
        )
        self.outcomes[(symbol, kind)] = {
            "outcome": "promoted",
            "version": info.version,
            "time": iso_utc(self._clock.now()),
        }
        log.info("shadow_promoted", symbol=symbol, kind=kind, version=info.version)
        if new is None or new.version != info.version or old is None:
            self._manager.install_shadow(symbol, kind, None)
            self._manager.serve_version(symbol, kind, info)
            return
        started = time.perf_counter()

        def swap() -> None:
            # One loop callback: no bar sees the new model beside the old in one role.
            new.stage = "production"
            old.stage = "previous"
            self._manager.weights[kind] = self._manager.weight_of(kind, info)
            self._predictors.swap(symbol, kind, new)
            self._predictors.swap_shadow(symbol, kind, old)
            self._journal.record_model_event(
                "swapped",
                symbol=symbol,
                kind=kind,
                version=info.version,
                details={"swap_ms": round((time.perf_counter() - started) * 1000, 3)},
            )

        self._manager.call_in_loop(swap)
        self.tracker.watch(symbol, kind, slot_version=old.version, prod_version=new.version)
        self.trials[(symbol, kind)] = Trial("watch", info.version, old.version, self._now())

    def _rollback(self, symbol: str, kind: str, trial: Trial, details: dict[str, Any]) -> None:
        info = self._store.rollback(symbol, kind)
        self.tracker.unwatch(symbol, kind)
        del self.trials[(symbol, kind)]
        previous = self._predictors.shadow_snapshot(symbol).get(kind)
        self._alert(
            "auto_rollback",
            f"{symbol} {kind}: {trial.version} did worse live than {info.version}; "
            f"production rolled back to {info.version} and {trial.version} is rejected",
            {"symbol": symbol, "kind": kind, "rejected": trial.version, **details},
        )
        self._journal.record_model_event(
            "auto_rolled_back",
            symbol=symbol,
            kind=kind,
            version=info.version,
            details={"rejected": trial.version, **details},
        )
        self.outcomes[(symbol, kind)] = {
            "outcome": "rolled back",
            "version": trial.version,
            "time": iso_utc(self._clock.now()),
        }
        if previous is None or previous.version != info.version:
            self._manager.install_shadow(symbol, kind, None)
            self._manager.serve_version(symbol, kind, info)
            return

        def swap() -> None:
            previous.stage = "production"
            self._manager.weights[kind] = self._manager.weight_of(kind, info)
            self._manager.retire(self._predictors.swap(symbol, kind, previous))
            self._predictors.swap_shadow(symbol, kind, None)

        self._manager.call_in_loop(swap)

    def _end_trial(
        self,
        symbol: str,
        kind: str,
        *,
        reject_shadow: bool,
        why: str,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        trial = self.trials.pop((symbol, kind), None)
        self.tracker.unwatch(symbol, kind)
        if trial is None:
            return
        self._manager.install_shadow(symbol, kind, None)
        if trial.mode == "shadow" and reject_shadow:
            if self._store.aliases(symbol, kind).get("shadow") == trial.version:
                self._store.set_shadow(symbol, kind, None)
            self._store.set_stage(symbol, kind, trial.version, "rejected")
            event = "shadow_rejected"
            self.outcomes[(symbol, kind)] = {
                "outcome": "rejected in shadow",
                "version": trial.version,
                "why": why,
                "time": iso_utc(self._clock.now()),
            }
        else:
            event = "watch_ended"
        self._journal.record_model_event(
            event,
            symbol=symbol,
            kind=kind,
            version=trial.version,
            details={"why": why, **(details or {})},
        )
        log.info(event, symbol=symbol, kind=kind, version=trial.version, why=why)

    def resume_shadow(self, symbol: str, kind: str) -> None:
        """At start-up: a version still in the store's shadow alias begins its trial again."""
        serving = self._predictors.snapshot(symbol).get(kind)
        shadow = self._predictors.shadow_snapshot(symbol).get(kind)
        if serving is None or shadow is None:
            return
        self.tracker.watch(symbol, kind, slot_version=shadow.version, prod_version=serving.version)
        self.trials[(symbol, kind)] = Trial("shadow", shadow.version, serving.version, self._now())

    # -- commands (CLI through the journal) ---------------------------------------------

    def reload(self, symbol: str, kind: str) -> None:
        """After a manual promote/rollback: any trial of the kind ends; serve production."""
        with self._lock:
            trial = self.trials.get((symbol, kind))
            if trial is not None:
                self._end_trial(symbol, kind, reject_shadow=False, why="operator command")
        self._manager.reload(symbol, kind)
        self._waiting.pop((symbol, kind), None)  # it passed against another production

    # -- checks -------------------------------------------------------------------------

    def check_staleness(self, symbol: str) -> list[str]:
        """Retrain kinds with no usable or a stale model, unless one was attempted lately.

        A kind trained less than its ``retrain_every_s`` ago (whatever the outcome,
        typically rejected by the gates) waits for its schedule: retrying every
        hour would spend a training per hour on a market that gave no model.
        """
        now = self._now()
        missing, stale = self._manager.missing_or_stale(symbol, now)
        wanted = []
        for kind in missing + stale:
            every = self._s.models.kind(kind).retrain_every_s
            last = self._attempted.get((symbol, kind))
            if every > 0 and last is not None and (now - last).total_seconds() < every:
                continue
            wanted.append(kind)
        if not wanted:
            return []
        return self.request_training(
            symbol, wanted, None, reason="stale or missing", rows=self._s.models.train_bars
        )

    def check_drift(self, symbol: str) -> list[str]:
        """KS + PSI of recent feature rows against each serving model's reference sample."""
        from ml.drift import check_drift, load_reference
        from strategy.features import compute_features

        window = self._a.drift_window_bars
        bars = list(self._bars_for(symbol))[-(window + self._spec.window) :]
        if len(bars) < window:
            return []
        spec = self._s.symbols[symbol]
        X = compute_features(
            self._spec,
            BarColumns.from_bars(bars),
            point=spec.point,
            default_spread_points=spec.default_spread_points,
        )[-window:]
        drifted = []
        for kind, predictor in self._predictors.snapshot(symbol).items():
            if kind == "baseline":
                continue
            cache_key = (symbol, kind, predictor.version)
            if cache_key not in self._references:
                info = self._store.version_info(symbol, kind, predictor.version)
                try:
                    self._references[cache_key] = load_reference(info.path)
                except (OSError, ValueError) as exc:
                    log.warning("drift_reference_missing", symbol=symbol, kind=kind, error=str(exc))
                    continue
            reference, names = self._references[cache_key]
            if (symbol, kind, predictor.version) in self._drift_retrained:
                continue  # this version already triggered its retrain: wait for a new one
            # Columns by name; calendar features cannot match a window under a week.
            cols = [i for i, n in enumerate(names) if n not in CALENDAR_FEATURES]
            try:
                current = X[:, [self._spec.index(names[i]) for i in cols]]
            except (KeyError, ValueError) as exc:
                log.warning("drift_spec_mismatch", symbol=symbol, kind=kind, error=str(exc))
                continue
            report = check_drift(
                reference[:, cols],
                current,
                [names[i] for i in cols],
                alpha=self._a.drift_alpha,
                psi_threshold=self._a.drift_psi_threshold,
                min_share=self._a.drift_min_share,
            )
            self._journal.record_model_event(
                "drift_alarm" if report.alarm else "drift_check",
                symbol=symbol,
                kind=kind,
                version=predictor.version,
                details=report.as_dict(),
            )
            if report.alarm:
                drifted.append(kind)
                self._drift_retrained.add((symbol, kind, predictor.version))
        if drifted:
            self._alert(
                "drift_alarm",
                f"{symbol}: features drifted from what {', '.join(drifted)} learnt on; retraining",
                {"symbol": symbol, "kinds": drifted},
            )
            self.request_training(
                symbol, drifted, None, reason="drift", rows=self._s.models.train_bars
            )
        return drifted

    def check_emergency(self, symbol: str) -> str | None:
        """Retrain every kind of ``symbol`` when recent trading went badly. Returns why."""
        a = self._a
        if not self._s.models.enabled_kinds:
            return None  # nothing to retrain: the baseline is a fixed rule
        # None: never triggered; else the last closed trade seen by the last trigger.
        after = self._emergency_after.get(symbol)

        def query(conn: Any) -> tuple[list[tuple[int, float]], list[float], int]:
            newest = conn.execute(
                "SELECT COALESCE(MAX(id), 0) FROM trades WHERE symbol = ? AND status = 'closed'",
                (symbol,),
            ).fetchone()[0]
            trades = conn.execute(
                "SELECT id, net_profit FROM trades WHERE symbol = ? AND status = 'closed' "
                "AND id > ? ORDER BY id DESC LIMIT ?",
                (symbol, after or 0, a.emergency_min_trades),
            ).fetchall()
            promoted = conn.execute(
                "SELECT MAX(time) FROM model_events WHERE symbol = ? AND event IN "
                "('promoted', 'auto_promoted', 'shadow_promoted', 'rolled_back')",
                (symbol,),
            ).fetchone()[0]
            equity = conn.execute(
                "SELECT equity FROM equity WHERE time >= ? ORDER BY id",
                (promoted or "",),
            ).fetchall()
            return (
                [(int(r[0]), float(r[1] or 0.0)) for r in trades],
                [float(r[0]) for r in equity],
                int(newest),
            )

        trades, equity, newest = self._journal.call(query)
        why = None
        if len(trades) >= a.emergency_min_trades:
            win_rate = sum(1 for _, pnl in trades if pnl > 0) / len(trades)
            if win_rate < a.emergency_min_win_rate:
                why = (
                    f"win rate {win_rate:.0%} over the last {len(trades)} closed trades "
                    f"< autotrain.emergency_min_win_rate {a.emergency_min_win_rate:.0%}"
                )
        # After a trigger, either rule waits for a full set of new closed trades.
        fresh = after is None or len(trades) >= a.emergency_min_trades
        if why is None and fresh and len(equity) >= 2:
            peak = np.maximum.accumulate(np.array(equity))
            drawdown = float(np.max(1.0 - np.array(equity) / peak)) * 100
            if drawdown > a.emergency_max_drawdown_pct:
                why = (
                    f"drawdown {drawdown:.1f}% since the last promotion "
                    f"> autotrain.emergency_max_drawdown_pct {a.emergency_max_drawdown_pct}%"
                )
        if why is None:
            return None
        # The same bad trades do not trigger again: wait for new ones.
        self._emergency_after[symbol] = newest
        self._alert("emergency_retrain", f"{symbol}: {why}; retraining", {"symbol": symbol})
        self.request_training(
            symbol,
            list(self._s.models.enabled_kinds),
            None,
            reason=f"emergency: {why}",
            rows=self._s.models.train_bars,
        )
        return why

    def _alert(self, kind: str, message: str, details: Mapping[str, Any]) -> None:
        symbol = details.get("symbol")
        if self.alert_sink is not None:
            # The daemon's alerter journals, logs and (rate-limited) posts the webhook.
            self.alert_sink(
                kind, message, dict(details), symbol if isinstance(symbol, str) else None
            )
            return
        self._journal.record_event("error", kind, message, dict(details))
        log.error(kind, message=message)

    # -- visibility ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        watching = self.tracker.watching()
        with self._lock:
            trials = {
                f"{s}/{k}": {
                    "mode": t.mode,
                    "version": t.version,
                    "compared_with": t.other,
                    "scored_bars": (watching.get((s, k)) or ("", "", 0))[2],
                    "started": iso_utc(t.started),
                }
                for (s, k), t in self.trials.items()
            }
        models: dict[str, dict[str, Any]] = {}
        shadows = {
            sym: dict(self._predictors.shadow_snapshot(sym)) for sym in self._s.trading.symbols
        }
        for symbol in self._s.trading.symbols:
            for kind, p in self._predictors.snapshot(symbol).items():
                slot = shadows[symbol].get(kind)
                models[f"{symbol}/{kind}"] = {
                    "production": p.version,
                    "stage": p.stage,
                    "trained": self._trained(symbol, kind, p.version),
                    "shadow": None if slot is None else f"{slot.version} ({slot.stage})",
                }
        return {
            "market_time": iso_utc(self._market_now) if self._market_now else None,
            "models": models,
            "enabled": self._a.enabled,
            "next_runs": {k.id: iso_utc(v) for k, v in self.schedule.next_runs().items()},
            "active_jobs": self.runner.active(),
            "trials": trials,
            "last_outcomes": {f"{s}/{k}": v for (s, k), v in sorted(self.outcomes.items())},
        }

    def _trained(self, symbol: str, kind: str, version: str) -> str | None:
        key = (symbol, kind, version)
        if key not in self._trained_at:
            try:
                info = self._store.version_info(symbol, kind, version)
                self._trained_at[key] = iso_utc(ModelStore.trained_at(info))
            except Exception:  # noqa: BLE001 - the baseline, or a version gone from the store
                self._trained_at[key] = None
        return self._trained_at[key]

    def _write_status(self, *, force: bool = False) -> None:
        now = self._clock.monotonic()
        if not force and now - self._status_written < 5.0:
            return
        self._status_written = now
        self._journal.set_state(AUTOTRAIN_STATE_KEY, self.status())
