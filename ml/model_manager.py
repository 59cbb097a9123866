"""Keeps the predictor map served by verified models from the store.

At start-up ``load_production`` loads each enabled kind's production version
(verified by hash; the store falls back to the previous version and says why)
into ONNX Runtime predictors, warms them and installs them. Kinds without a
model (or with a stale one) are queued for training: one background thread
hands jobs to the ``TrainingBackend`` (a spawned worker), commits the draft to
the store, promotes the first version of a kind, loads and warms the new
predictor off the event loop, and only then asks the loop (``install``) to
prime it with recent feature rows and swap it in, so no bar ever sees a
half-ready model. While no model serves a symbol, the baseline does.

Until the validation gates land (auto-trainer), a retrained version of a kind
that already has a production model stays ``validated``; an operator promotes
it with ``python main.py models promote``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import structlog

from config.settings import Settings
from ml.predictor_map import PredictorMap
from ml.serving import OnnxPredictor
from ml.store import ModelStore, VersionInfo
from ml.training import TrainingBackend, TrainJob, ensemble_weight, save_bar_cache
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
    cols: BarColumns
    reason: str
    rows: int
    # Serve the result at once: a missing, unloadable or stale production model is
    # replaced. A manual retrain waits for an operator's promote (no gates yet).
    promote: bool = False


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
        self._call_in_loop = call_in_loop
        self._baseline = baseline
        self.weights: dict[str, float] = {}
        self._queue: queue.Queue[TrainingRequest | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.busy = threading.Event()
        self._stopping = threading.Event()
        # (symbol, kind) queued or training: a second request for them is dropped.
        self._pending: set[tuple[str, str]] = set()
        self._pending_lock = threading.Lock()
        self.trained = 0
        self.failed = 0

    # -- serving ------------------------------------------------------------------------

    def _weight(self, kind: str, info: VersionInfo) -> float:
        how = self._s.models.weight_by
        if how == "settings":
            return self._s.models.kind(kind).weight
        if how == "validation":
            return ensemble_weight(info.manifest)
        return 1.0

    def _load(self, symbol: str, kind: str, info: VersionInfo) -> OnnxPredictor:
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
                    predictor = self._load(symbol, kind, info)
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
        return loaded

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
        for row in self._recent_rows(symbol):
            predictor.observe(row)
        self.weights[kind] = self._weight(kind, info)
        self._predictors.swap(symbol, kind, predictor)
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

    def request_training(
        self,
        symbol: str,
        kinds: Sequence[str],
        cols: BarColumns,
        *,
        reason: str,
        rows: int,
        promote: bool = False,
    ) -> None:
        # Known-fast kinds first; any other kind (a new registry entry) after them.
        rank = {k: i for i, k in enumerate(TRAINING_ORDER)}
        with self._pending_lock:
            fresh = [k for k in kinds if (symbol, k) not in self._pending]
            self._pending.update((symbol, k) for k in fresh)
        ordered = tuple(sorted(fresh, key=lambda k: rank.get(k, len(rank))))
        if ordered:
            self._queue.put(TrainingRequest(symbol, ordered, cols, reason, rows, promote))

    def check_staleness(
        self, symbol: str, market_now: datetime, bars: Callable[[int], BarColumns]
    ) -> list[str]:
        """While running: queue a replacement for kinds that went stale or are missing.

        Called from the bar loop every so often (market time); ``bars(n)`` gives
        the latest n bars the daemon has seen. Returns the kinds queued.
        """
        missing, stale = self.missing_or_stale(symbol, market_now)
        with self._pending_lock:
            wanted = [k for k in missing + stale if (symbol, k) not in self._pending]
        if not wanted:
            return []
        rows = self._s.models.train_bars
        self.request_training(
            symbol, wanted, bars(rows), reason="stale or missing", rows=rows, promote=True
        )
        log.info("retrain_queued", symbol=symbol, kinds=wanted, market_time=market_now.isoformat())
        return wanted

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="model-trainer", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Abandon training in progress (the daemon is stopping) and end the thread."""
        self._stopping.set()
        self._queue.put(None)
        self._backend.shutdown()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def wait_idle(self) -> None:
        """Block until every queued request is done (tests, CLI)."""
        self._queue.join()

    def _serve(self) -> None:
        while True:
            request = self._queue.get()
            try:
                if request is None or self._stopping.is_set():
                    return
                self.busy.set()
                for i, kind in enumerate(request.kinds, start=1):
                    log.info(
                        "training_progress",
                        symbol=request.symbol,
                        kind=kind,
                        step=f"{i}/{len(request.kinds)}",
                        reason=request.reason,
                    )
                    try:
                        self.train_one(request, kind)
                    finally:
                        with self._pending_lock:
                            self._pending.discard((request.symbol, kind))
            finally:
                self.busy.clear()
                self._queue.task_done()

    def train_one(self, request: TrainingRequest, kind: str) -> VersionInfo | None:
        """Train, register, and (when asked, or for a kind's first version) serve one kind.

        Never raises: whatever fails is a ``training_runs`` row and an event, and
        production stays as it was.
        """
        symbol = request.symbol
        run_id: int | None = None
        draft: Path | None = None
        finished = False
        try:
            run_id = self._journal.record_training_run(
                started=self._clock.now(), symbol=symbol, kind=kind, status="running"
            ).result()
            cache = save_bar_cache(self._cache_dir / f"{symbol}.npz", request.cols)
            draft = self._store.new_draft_dir(symbol, kind)
            log.info("training_started", symbol=symbol, kind=kind, reason=request.reason)
            outcome = self._backend.submit(self._job(symbol, kind, cache, draft, request)).result()
            info = self._store.commit_draft(
                draft, symbol=symbol, kind=kind, manifest=outcome.manifest
            )
            draft = None  # it is a version now
            self.trained += 1
            self._store.set_stage(symbol, kind, info.version, "validated")
            self._journal.finish_training_run(
                run_id,
                finished=self._clock.now(),
                status="done",
                version=info.version,
                metrics={**outcome.metrics, "seconds": round(outcome.seconds, 2)},
            )
            finished = True
            log.info(
                "training_done",
                symbol=symbol,
                kind=kind,
                version=info.version,
                seconds=round(outcome.seconds, 1),
                **{k: round(v, 4) for k, v in outcome.metrics.items()},
            )
            first = self._store.resolve(symbol, kind) is None
            if (request.promote or first) and not self._stopping.is_set():
                info = self._store.promote(symbol, kind, info.version)
                predictor = self._load(symbol, kind, info)
                self._call_in_loop(lambda: self._install_now(symbol, kind, predictor, info))
            # Keep the newest versions plus every aliased one (models.retention).
            self._store.apply_retention(symbol, kind)
            return info
        except Exception as exc:  # noqa: BLE001 - a failed run is journaled; production stays
            if draft is not None:
                self._store.discard_draft(draft)
            stopping = self._stopping.is_set()
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
        )

    def reload(self, symbol: str, kind: str) -> None:
        """After promote/rollback: serve the (new) production version, or the baseline."""
        info = self._store.resolve(symbol, kind)
        if info is None:
            self._call_in_loop(lambda: self._remove(symbol, kind))
            return
        predictor = self._load(symbol, kind, info)
        self._call_in_loop(lambda: self._install_now(symbol, kind, predictor, info))

    def _remove(self, symbol: str, kind: str) -> None:
        self._predictors.swap(symbol, kind, None)
        if not self._predictors.snapshot(symbol):
            self._predictors.swap(symbol, "baseline", self._baseline())


def seed_param(kind: str, seed: int) -> Mapping[str, int]:
    return {"random_state": seed} if kind in ("rf", "xgb") else {"seed": seed}
