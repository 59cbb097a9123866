"""Keeps the predictor map served by verified models from the store.

At start-up ``load_production`` loads each enabled kind's production version
(verified by hash; the store falls back to the previous version and says why)
into ONNX Runtime predictors, warms them and installs them. Kinds without a
model (or with a stale one) are queued for training by the auto-trainer
(``ml.auto_trainer``), which decides what happens to each candidate;
``train_one`` hands a job to the ``TrainingBackend`` (a spawned worker that also
runs the validation gates) and commits the draft to the store. Whatever is
served next is loaded and warmed off the event loop, and only then the loop
(``_install_now``) primes it with recent feature rows and swaps it in, so no bar
ever sees a half-ready model. While no model serves a symbol, the baseline does.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from config.settings import TIMEFRAME_SECONDS, Settings
from ml.predictor_map import PredictorMap
from ml.serving import OnnxPredictor
from ml.store import ModelStore, VersionInfo
from ml.training import (
    TrainingBackend,
    TrainJob,
    TrainOutcome,
    ensemble_weight,
    save_bar_cache,
)
from strategy.baseline import Predictor
from strategy.features import BarColumns, FeatureSpec
from utils.clock import Clock
from utils.trade_journal import Journal

log = structlog.get_logger(__name__)

# Fastest kinds first: the first model-driven decision comes as early as possible.
# Kinds not listed train after these, in the order asked.
TRAINING_ORDER = ("xgb", "mlp", "rf", "lstm")


@dataclass(frozen=True)
class TrainingRequest:
    symbol: str
    kinds: tuple[str, ...]
    cols: BarColumns | None  # None: the auto-trainer fetches the latest bars when it runs
    reason: str
    rows: int
    # Run the validation gates in the worker (the daemon always does; a CLI run
    # without a daemon measures only).
    validate: bool = True


@dataclass(frozen=True)
class TrainResult:
    """A committed candidate and the worker's verdict on it."""

    info: VersionInfo
    outcome: TrainOutcome
    run_id: int


class ModelManager:
    def __init__(
        self,
        *,
        settings: Settings,
        store: ModelStore,
        backend: TrainingBackend,
        predictors: PredictorMap,
        journal: Journal,
        clock: Clock,
        feature_spec: FeatureSpec,
        cache_dir: Path,
        recent_rows: Callable[[str], Sequence[np.ndarray]],
        call_in_loop: Callable[[Callable[[], None]], None],
        baseline: Callable[[], Predictor],
    ) -> None:
        self._s = settings
        self._store = store
        self._backend = backend
        self._predictors = predictors
        self._journal = journal
        self._clock = clock
        self._spec = feature_spec
        self._cache_dir = cache_dir
        self._recent_rows = recent_rows
        self.call_in_loop = call_in_loop
        self._baseline = baseline
        self.weights: dict[str, float] = {}
        self.stopping = threading.Event()
        self._reaper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model-reaper")
        self.trained = 0
        self.failed = 0

    # -- serving ------------------------------------------------------------------------

    def weight_of(self, kind: str, info: VersionInfo) -> float:
        how = self._s.models.weight_by
        if how == "settings":
            return self._s.models.kind(kind).weight
        if how == "validation":
            return ensemble_weight(info.manifest)
        return 1.0

    def load(self, symbol: str, kind: str, info: VersionInfo) -> OnnxPredictor:
        """Load and warm up off the loop (raises when the artifact cannot serve)."""
        predictor = OnnxPredictor.load(
            info.path, feature_hash=self._spec.hash, kind=kind, version=info.version
        )
        predictor.stage = info.stage
        predictor.warmup()
        return predictor

    def load_production(self, symbol: str) -> list[str]:
        """Load every enabled kind's production model (call before the loop trades).

        A production version that verifies but cannot be served (another feature
        spec, an unreadable graph) is refused with a journaled reason and the
        ``previous`` version serves instead, if there is one; otherwise the kind
        is missing and gets trained.
        """
        loaded = []
        for kind in self._s.models.enabled_kinds:
            for alias in ("production", "previous"):
                info = self._store.resolve(symbol, kind, alias)
                if info is None:
                    continue
                try:
                    predictor = self.load(symbol, kind, info)
                except Exception as exc:  # noqa: BLE001 - a bad artifact must not stop the daemon
                    self._journal.record_event(
                        "error",
                        "model_load_failed",
                        f"{symbol} {kind} {info.version} ({alias}) refused: {exc}",
                        {"symbol": symbol, "kind": kind, "version": info.version},
                    )
                    log.error(
                        "model_load_failed", symbol=symbol, kind=kind, alias=alias, error=str(exc)
                    )
                    continue
                self._install_now(symbol, kind, predictor, info)
                loaded.append(kind)
                break
            self._load_shadow(symbol, kind)
        return loaded

    def _load_shadow(self, symbol: str, kind: str) -> None:
        """A candidate still on trial when the daemon stopped predicts beside it again."""
        info = self._store.resolve(symbol, kind, "shadow")
        serving = self._predictors.snapshot(symbol).get(kind)
        if info is None or serving is None or info.version == serving.version:
            return
        try:
            predictor = self.load_for_shadow(symbol, kind, info)
        except Exception as exc:  # noqa: BLE001 - the trial is dropped, production serves
            log.error("shadow_load_failed", symbol=symbol, kind=kind, error=str(exc))
            return
        self.prime(symbol, predictor)
        self._predictors.swap_shadow(symbol, kind, predictor)

    def missing_or_stale(self, symbol: str, market_now: datetime) -> tuple[list[str], list[str]]:
        missing, stale = [], []
        serving = self._predictors.snapshot(symbol)
        for kind in self._s.models.enabled_kinds:
            if kind not in serving:
                missing.append(kind)
            elif serving[kind].version != self._store.aliases(symbol, kind).get("production"):
                stale.append(kind)  # a fallback serves: production could not be loaded
            elif self._store.is_stale(symbol, kind, market_now, self._s.models.max_model_age_s):
                stale.append(kind)
        return missing, stale

    def _install_now(
        self, symbol: str, kind: str, predictor: OnnxPredictor, info: VersionInfo
    ) -> None:
        """On the loop thread: prime the window with recent rows, then swap."""
        # The stage it serves at: a candidate is loaded and warmed before its promotion.
        predictor.stage = info.stage
        self.prime(symbol, predictor)
        self.weights[kind] = self.weight_of(kind, info)
        self.retire(self._predictors.swap(symbol, kind, predictor))
        # The baseline stays the benchmark, but once a model serves it stops voting.
        self._predictors.swap(symbol, "baseline", None)
        self._journal.record_model_event(
            "swapped",
            symbol=symbol,
            kind=kind,
            version=info.version,
            details={"weight": self.weights[kind]},
        )
        log.info("model_serving", symbol=symbol, kind=kind, version=info.version)

    # -- training -----------------------------------------------------------------------

    def train_one(
        self, request: TrainingRequest, kind: str, *, timeout_s: float | None = None
    ) -> TrainResult | None:
        """Train and register one kind; the worker's gates decide its stage.

        A candidate that passed every gate is ``validated`` (what is served next is
        the auto-trainer's decision); one that failed any is ``rejected``, with each
        failed gate and its number in ``model_events``. Never raises: whatever fails
        (an exception, a worker killed, a job past ``timeout_s``) is a failed
        ``training_runs`` row and an event, and production stays as it was.
        """
        symbol = request.symbol
        run_id: int | None = None
        draft: Path | None = None
        finished = False
        try:
            run_id = self._journal.record_training_run(
                started=self._clock.now(), symbol=symbol, kind=kind, status="running"
            ).result()
            if request.cols is None:
                raise ValueError("no bars given to train on")
            cache = save_bar_cache(self._cache_dir / f"{symbol}.npz", request.cols)
            draft = self._store.new_draft_dir(symbol, kind)
            log.info("training_started", symbol=symbol, kind=kind, reason=request.reason)
            future = self._backend.submit(self._job(symbol, kind, cache, draft, request))
            try:
                outcome = future.result(timeout=timeout_s)
            except concurrent.futures.TimeoutError:
                # A hung worker is killed; the next job gets a fresh one.
                self._backend.reset()
                raise TimeoutError(
                    f"training took longer than autotrain.job_timeout_s = {timeout_s:g} s; "
                    "the worker was killed"
                ) from None
            info = self._store.commit_draft(
                draft, symbol=symbol, kind=kind, manifest=outcome.manifest
            )
            draft = None  # it is a version now
            self.trained += 1
            gated = outcome.validation is not None
            passed = outcome.passed
            self._store.set_stage(
                symbol, kind, info.version, "rejected" if gated and not passed else "validated"
            )
            metrics: dict[str, object] = {
                **outcome.metrics,
                "seconds": round(outcome.seconds, 2),
                "window": outcome.manifest.get("training_window"),
                "samples": outcome.manifest.get("samples"),
                "reason": request.reason,
            }
            if outcome.validation is not None:
                metrics["validation"] = outcome.validation
            self._journal.finish_training_run(
                run_id,
                finished=self._clock.now(),
                status="done" if not gated else ("passed" if passed else "rejected"),
                version=info.version,
                metrics=metrics,
                error=None
                if passed or outcome.validation is None
                else str(outcome.validation.get("reasons")),
            )
            finished = True
            if gated:
                self._journal.record_model_event(
                    "validated" if passed else "rejected",
                    symbol=symbol,
                    kind=kind,
                    version=info.version,
                    details={"reason": request.reason, **(outcome.validation or {})},
                )
            log.info(
                "training_done",
                symbol=symbol,
                kind=kind,
                version=info.version,
                seconds=round(outcome.seconds, 1),
                gates="passed" if passed else ("failed" if gated else "not run"),
                failed=None
                if passed or outcome.validation is None
                else outcome.validation.get("reasons"),
                **{k: round(v, 4) for k, v in outcome.metrics.items()},
            )
            # Keep the newest versions plus every aliased one (models.retention).
            self._store.apply_retention(symbol, kind)
            return TrainResult(info, outcome, run_id)
        except Exception as exc:  # noqa: BLE001 - a failed run is journaled; production stays
            if draft is not None:
                self._store.discard_draft(draft)
            stopping = self.stopping.is_set()
            error = "daemon stopped" if stopping else f"{type(exc).__name__}: {exc}"
            if run_id is not None and not finished:
                self._journal.finish_training_run(
                    run_id,
                    finished=self._clock.now(),
                    status="cancelled" if stopping else "failed",
                    error=error,
                )
            if not stopping:
                self.failed += 1
                self._journal.record_event(
                    "error",
                    "training_failed",
                    f"{symbol} {kind}: {error}",
                    {"reason": request.reason},
                )
                log.error("training_failed", symbol=symbol, kind=kind, error=error)
            return None

    def serve_version(self, symbol: str, kind: str, info: VersionInfo) -> None:
        """Load and warm ``info`` here (off the loop), then swap it in on the loop."""
        self.install(symbol, kind, self.load(symbol, kind, info), info)

    def install(self, symbol: str, kind: str, predictor: OnnxPredictor, info: VersionInfo) -> None:
        """Swap a loaded, warm predictor in on the loop (primed with recent rows first)."""
        self.call_in_loop(lambda: self._install_now(symbol, kind, predictor, info))

    def load_for_shadow(self, symbol: str, kind: str, info: VersionInfo) -> OnnxPredictor:
        """Load and warm a candidate to predict beside production (not traded)."""
        predictor = self.load(symbol, kind, info)
        predictor.stage = "shadow"
        return predictor

    def install_shadow(self, symbol: str, kind: str, predictor: Predictor | None) -> None:
        """On the loop: prime ``predictor`` with recent rows and put it in the shadow slot."""

        def install() -> None:
            if predictor is not None:
                self.prime(symbol, predictor)
            self.retire(self._predictors.swap_shadow(symbol, kind, predictor))

        self.call_in_loop(install)

    def prime(self, symbol: str, predictor: Predictor) -> None:
        """Fill a sequence model's window with the latest rows (row models need none)."""
        seq = int(getattr(predictor, "sequence_length", 0) or 0)
        if seq:
            for row in self._recent_rows(symbol)[-seq:]:
                predictor.observe(row)

    def retire(self, predictor: object) -> None:
        """Free a replaced model off the loop: releasing an ONNX session costs ~5 ms."""
        if predictor is not None:
            self._reaper.submit(_drop, predictor)

    def stop(self) -> None:
        """Abandon training in progress (the daemon is stopping)."""
        self.stopping.set()
        self._backend.shutdown()
        self._reaper.shutdown(wait=False)

    def _job(
        self, symbol: str, kind: str, cache: Path, draft: Path, request: TrainingRequest
    ) -> TrainJob:
        spec = self._s.symbols[symbol]
        return TrainJob(
            symbol=symbol,
            kind=kind,
            hyperparams={
                **self._s.models.kind(kind).hyperparams(),
                **seed_param(kind, self._s.models.seed),
            },
            bars_path=str(cache),
            draft_dir=str(draft),
            point=spec.point,
            default_spread_points=spec.default_spread_points,
            horizon=self._s.models.horizon_bars,
            threshold_atr=self._s.models.label_threshold_atr,
            feature_params=dict(self._spec.params),
            max_rows=request.rows,
            **self._validation_args(symbol, kind, request),
        )

    def _validation_args(self, symbol: str, kind: str, request: TrainingRequest) -> dict[str, Any]:
        if not request.validate:
            return {}
        spec = self._s.symbols[symbol]
        tf_s = TIMEFRAME_SECONDS[self._s.trading.timeframe]
        production = self._store.resolve(symbol, kind)
        return {
            "validation": self._s.validation.model_dump(),
            "sim_costs": {
                "point": spec.point,
                "contract_size": spec.contract_size,
                "commission_per_lot": self._s.paper.commission_per_lot,
                "default_spread_points": spec.default_spread_points,
                "min_confidence": self._s.strategy.min_confidence,
                "horizon": self._s.models.horizon_bars,
                # FX trades around the clock five days a week.
                "periods_per_year": 260 * 86_400 / tf_s,
            },
            "production_dir": None if production is None else str(production.path),
            "production_version": None if production is None else production.version,
        }

    def reload(self, symbol: str, kind: str) -> None:
        """After promote/rollback: serve the (new) production version, or the baseline."""
        info = self._store.resolve(symbol, kind)
        if info is None:
            self.call_in_loop(lambda: self._remove(symbol, kind))
            return
        self.serve_version(symbol, kind, info)

    def _remove(self, symbol: str, kind: str) -> None:
        self.retire(self._predictors.swap(symbol, kind, None))
        if not self._predictors.snapshot(symbol):
            self._predictors.swap(symbol, "baseline", self._baseline())


def _drop(predictor: object) -> None:
    """The reaper's job: the last reference goes when this call's arguments do."""


def seed_param(kind: str, seed: int) -> Mapping[str, int]:
    return {"random_state": seed} if kind in ("rf", "xgb") else {"seed": seed}
