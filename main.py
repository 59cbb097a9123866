"""Command line and wiring: the only place that builds components and connects them.

``python main.py`` is ``python main.py run``: the trading daemon (paper mode by
default). ``python main.py status`` reads the journal, also while the daemon runs.
Exit codes: 0 clean stop, 1 runtime failure, 2 invalid input (settings, data,
a foreign or newer journal).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import signal
import sqlite3
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
import structlog

from config.settings import TIMEFRAME_SECONDS, Settings, SettingsError, load_settings
from execution.broker import Broker, Position, Side
from execution.mt5_client import BrokerSetupError, MT5Broker, reconcile_with_journal
from execution.paper import PaperBroker, specs_from_settings
from execution.risk import RiskManager
from market_data.bars import Bar
from market_data.feeds import FrameSource, ReplayFeed
from market_data.loaders import DataFileError, load_bars
from market_data.mt5_feed import LiveFeed, fetch_history_bars
from market_data.synthetic import paper_market
from ml import cli_models
from ml.auto_trainer import AUTOTRAIN_STATE_KEY, AutoTrainer, InlineRunner, Runner
from ml.model_manager import ModelManager
from ml.predictor_map import PredictorMap
from ml.store import ModelStore, journal_hook
from ml.training import LocalProcessBackend, TrainingBackend
from strategy.baseline import MomentumBaseline
from strategy.engine import RISK_STATE_KEY, TradingEngine
from strategy.features import BarColumns, FeatureSpec
from strategy.scalper import CRASH_ENV, ENTRIES_STATE_KEY, CrashPoint, ScalpingStrategy
from utils.alerts import Alerter, OutageTimer, disk_space_alert
from utils.clock import Clock, FakeClock, SystemClock, iso_utc, parse_iso_utc
from utils.commands import serve_commands
from utils.http_api import HttpServer, HttpServerError, ModelRow, ServiceMetrics, evaluate_health
from utils.logsetup import configure_logging
from utils.systemd import Notifier, loop_monitor
from utils.tasks import TaskSupervisor
from utils.trade_journal import (
    LAST_BAR_KEY,
    Journal,
    JournalError,
    JournalSummary,
    fetch_market_times,
    fetch_state,
    summary,
)

log = structlog.get_logger("main")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2

# systemd start-up budget per long step (EXTEND_TIMEOUT_USEC), seconds.
START_STEP_TIMEOUT_S = 300.0
# On a stop request, how long the bar in progress (and the final journal flush) may take.
SHUTDOWN_BAR_TIMEOUT_S = 30.0


class InvalidInput(Exception):
    """Bad settings, data files or journal: exit code 2, nothing started."""


# -- wiring -----------------------------------------------------------------------------


def _replay_sources(settings: Settings) -> dict[str, FrameSource]:
    """One frame source per symbol: the synthetic market, or CSV files."""
    timeframe_s = settings.trading.timeframe_s
    symbols = settings.trading.symbols
    data = settings.paper.data
    sources: dict[str, FrameSource] = {}
    if data == "synthetic":
        start = parse_iso_utc(settings.paper.synthetic_start)
        for index, symbol in enumerate(symbols):
            spec = settings.symbols[symbol]
            market = paper_market(
                symbol,
                index=index,
                seed=settings.paper.synthetic_seed,
                start=start,
                timeframe_s=timeframe_s,
                point=spec.point,
                default_spread_points=spec.default_spread_points,
            )
            sources[symbol] = market.iter_frames
        return sources
    if "{symbol}" not in data and len(symbols) > 1:
        raise InvalidInput(
            f"paper.data = {data!r} is one file but trading.symbols has {len(symbols)} symbols; "
            "use a pattern such as 'data/{symbol}_M1.csv'"
        )
    for symbol in symbols:
        path = Path(data.replace("{symbol}", symbol))
        try:
            loaded = load_bars(
                path,
                server_timezone=settings.broker.server_timezone,
                timeframe=settings.trading.timeframe,
            )
        except DataFileError as exc:
            raise InvalidInput(str(exc)) from None
        sources[symbol] = _whole_frame(loaded.frame)
    return sources


def _whole_frame(frame: pd.DataFrame) -> FrameSource:
    """A file is one frame."""
    return lambda: iter([frame])


def _restore_paper_broker(settings: Settings, journal: Journal) -> PaperBroker:
    specs = specs_from_settings({s: settings.symbols[s] for s in settings.trading.symbols})
    broker = PaperBroker(
        specs,
        account_currency=settings.paper.account_currency,
        initial_balance=settings.paper.initial_balance,
        leverage=settings.paper.leverage,
        slippage_points=settings.paper.slippage_points,
        commission_per_lot=settings.paper.commission_per_lot,
        timeframe_s=settings.trading.timeframe_s,
        default_spread_points={
            s: settings.symbols[s].default_spread_points for s in settings.trading.symbols
        },
    )
    open_trades = journal.open_trades()
    orphans = [t for t in open_trades if t.symbol not in settings.trading.symbols]
    if orphans:
        listed = ", ".join(f"{t.symbol} {t.client_order_id}" for t in orphans)
        raise InvalidInput(
            f"{settings.storage.journal_path}: open paper positions on symbols that "
            f"trading.symbols no longer lists ({listed}); add the symbols back until those "
            "positions are closed, or use another storage.journal_path"
        )
    realized = journal.realized_pnl()
    # The open commission was charged to the balance when the position opened.
    balance = settings.paper.initial_balance + realized + sum(t.commission for t in open_trades)
    unknown = [t.client_order_id for t in open_trades if t.broker_position_id is None]
    if unknown:
        raise InvalidInput(
            f"{settings.storage.journal_path}: open paper trades {unknown} have no position id; "
            "the journal was not written by the paper broker (close them in the journal first)"
        )
    positions = [
        Position(
            position_id=int(t.broker_position_id or 0),
            symbol=t.symbol,
            side=Side(t.side),
            volume=t.volume,
            open_price=t.open_price,
            open_time=t.open_time,
            sl=t.sl,
            tp=t.tp,
            client_order_id=t.client_order_id,
            commission=t.commission,
        )
        for t in open_trades
    ]
    next_id = int(journal.max_position_id() or 0) + 1
    broker.restore(balance, positions, next_position_id=next_id, next_deal_id=next_id)
    if open_trades or realized:
        log.info(
            "paper_state_restored",
            balance=round(balance, 2),
            open_positions=len(positions),
            realized_pnl=round(realized, 2),
        )
    return broker


async def _start_live(
    settings: Settings, journal: Journal, clock: Clock, feature_window: int
) -> tuple[MT5Broker, LiveFeed]:
    """The MT5 broker (connected, reconciled with the journal) and its live feed."""
    broker = MT5Broker.from_settings(
        settings.broker,
        settings.trading.symbols,
        clock=clock,
        timeframe_s=settings.trading.timeframe_s,
        on_event=lambda level, kind, message, details: journal.record_event(
            level, kind, message, details
        ),
    )

    async def reconcile() -> None:
        await reconcile_with_journal(broker, journal)

    broker.on_connected = reconcile
    try:
        await broker.connect()
        history_bars = max(
            settings.paper.history_bars,
            feature_window,
            settings.models.initial_train_bars if settings.models.enabled_kinds else 0,
        )
        history = await fetch_history_bars(
            broker,
            broker.tradable_symbols,
            history_bars,
            cache_dir=Path(settings.storage.journal_path).parent / "cache" / "bars",
        )
    except BrokerSetupError as exc:
        await broker.close()
        raise InvalidInput(str(exc)) from None
    feed = LiveFeed(
        broker,
        broker.tradable_symbols,
        clock=clock,
        timeframe_s=settings.trading.timeframe_s,
        history=history,
        poll_interval_s=settings.broker.poll_interval_s,
    )
    return broker, feed


# How often (market time) the running daemon looks for stale or missing models and
# applies the journal's prediction retention.
HOUSEKEEPING_S = 3600.0


class _Housekeeping:
    """Ticked by the bar loop once per market hour (a function of market time only)."""

    def __init__(self, settings: Settings, journal: Journal) -> None:
        self._s = settings
        self._journal = journal
        self._pruned_day: date | None = None

    def __call__(self, now: datetime) -> None:
        if now.date() != self._pruned_day:
            self._pruned_day = now.date()
            keep = timedelta(days=self._s.storage.predictions_keep_days)
            for symbol in self._s.trading.symbols:
                self._journal.prune_predictions(symbol, now - keep)


class Service:
    """The daemon's face to an operator: systemd, /health and /metrics, alerts.

    Everything here is optional and quiet: without ``NOTIFY_SOCKET`` the
    notifications are no-ops, the HTTP endpoint runs only when ``http.enabled``,
    and alerts reach a webhook only when ``SCALPER__ALERTS__WEBHOOK_URL`` is set
    (they always reach the journal and the log). The event loop publishes a
    health snapshot twice a second from the loop monitor; the HTTP thread only
    reads it, so no request ever waits for the loop or blocks it.
    """

    TICK_S = 0.5
    STATUS_EVERY_TICKS = 20  # STATUS=, model rows and account figures: every 10 s
    DISK_EVERY_TICKS = 120  # free disk space: every minute

    def __init__(self, settings: Settings, clock: Clock, notifier: Notifier) -> None:
        self._s = settings
        self._clock = clock
        self.notifier = notifier
        self.metrics = ServiceMetrics()
        self.alerter: Alerter | None = None
        self.http: HttpServer | None = None
        self.ready_sent = False
        self.last_bar_mono: float | None = None
        self.started_mono = clock.monotonic()
        self._ticks = 0
        self._broker_down = OutageTimer(settings.alerts.broker_down_s, clock)
        self._trained_at: dict[tuple[str, str, str], datetime] = {}
        self._account_task: asyncio.Task[None] | None = None
        self._equity: float | None = None
        self._strategy: ScalpingStrategy | None = None
        self._halts: dict[str, str] = {}  # source -> why new entries are stopped
        live = settings.broker.kind != "paper"
        speed = settings.paper.replay_bars_per_s
        # A bar is overdue after three bar intervals live; in replay after 30 s.
        self.stale_after_s = (
            max(3.0 * settings.trading.timeframe_s, 120.0)
            if live
            else max(30.0, 3.0 / speed if speed > 0 else 0.0)
        )

    def open(self, journal: Journal) -> None:
        """Alerts need the journal; the HTTP endpoint starts here (a busy port fails)."""
        self.alerter = Alerter(
            self._s.alerts,
            record_event=journal.record_event,
            clock=self._clock,
            on_alert=self.metrics.alert,
        )
        self.alerter.start()
        if self._s.http.enabled:
            self.http = HttpServer.from_settings(self._s.http, self.metrics)
            self.http.start()
            log.info("http_listening", host=self._s.http.host, port=self.http.port)

    def bind(self, strategy: ScalpingStrategy) -> None:
        self._strategy = strategy

    def halt(self, source: str, reason: str | None) -> None:
        """Stop (or, with None, allow again) new entries for one source's reason.

        Sources (the broker, the journal, shutdown) are kept apart, so the journal
        recovering does not clear a broker halt.
        """
        if reason:
            self._halts[source] = reason
        else:
            self._halts.pop(source, None)
        if self._strategy is not None:
            self._strategy.entries_halted = "; ".join(self._halts.values()) or None

    def journal_write_state(self, failure: str | None) -> None:
        """The journal's writer failing (disk full, I/O error) or recovering; on the loop."""
        # The strategy raises the `trading_halted` alert at its next bar, with the reason.
        self.halt("journal", failure)

    def alert(
        self, kind: str, message: str, details: Mapping[str, Any] | None, symbol: str | None
    ) -> None:
        if kind == "drift_alarm" and symbol:
            self.metrics.drift_alarm(symbol)
        if self.alerter is not None:
            self.alerter.alert(kind, message, details, symbol)

    def on_bar(self, bar: Bar) -> None:
        self.last_bar_mono = self._clock.monotonic()
        self.metrics.bar(bar.symbol)

    def tick(self, daemon: Daemon) -> None:
        """Each loop-monitor tick: health, READY, WATCHDOG; now and then status and alerts."""
        self._ticks += 1
        broker_up = bool(getattr(daemon.broker, "connected", True))
        now_mono = self._clock.monotonic()
        age = now_mono - (
            self.last_bar_mono if self.last_bar_mono is not None else self.started_mono
        )
        serving = daemon.predictors.versions()
        state = evaluate_health(
            journal_open=daemon.journal.is_open,
            broker_connected=broker_up,
            feed_connected=broker_up,
            feed_last_bar_age_s=age,
            feed_stale_after_s=self.stale_after_s,
            serving=serving,
            symbols=self._s.trading.symbols,
            now=self._clock.now(),
            details={
                "bars": daemon.engine.stats.bars,
                "entries_halted": daemon.strategy.entries_halted,
            },
        )
        failure = daemon.journal.write_failure
        if failure:
            state = dataclasses.replace(state, ok=False, reasons=(*state.reasons, failure))
        if self.http is not None:
            self.http.publish(state)
        else:
            self.metrics.set_health(state)
        if state.ok and not self.ready_sent:
            self.ready_sent = True
            self.notifier.ready(f"serving {state.serving_set}; {self._status_line(daemon)}")
        self.notifier.watchdog()
        down = self._broker_down.update(broker_up)
        if down is not None:
            self.alert(
                "broker_down",
                f"broker disconnected for {down / 60:.0f} min; not trading meanwhile",
                {"down_s": round(down)},
                None,
            )
        if self._ticks % self.STATUS_EVERY_TICKS == 1:
            self.notifier.status(self._status_line(daemon))
            self._publish_models(daemon, serving)
            if self._account_task is None or self._account_task.done():
                self._account_task = asyncio.ensure_future(self._refresh_account(daemon))
        if self._ticks % self.DISK_EVERY_TICKS == 1:
            paths = [
                Path(self._s.storage.journal_path).parent,
                Path(self._s.storage.models_dir),
            ]
            problem = disk_space_alert(
                [q for q in paths if q.exists()], self._s.alerts.disk_free_min_mb
            )
            if problem:
                self.alert("disk_nearly_full", problem, None, None)

    def _status_line(self, daemon: Daemon) -> str:
        equity = f", equity {self._equity:.2f}" if self._equity is not None else ""
        halted = daemon.strategy.entries_halted
        return (
            f"{daemon.engine.stats.bars} bars, {daemon.strategy.status.entries} entries"
            f"{equity}" + (f"; entries halted: {halted}" if halted else "")
        )

    def _publish_models(self, daemon: Daemon, serving: Mapping[str, Mapping[str, str]]) -> None:
        now = self._clock.now()
        rows = []
        for symbol, kinds in serving.items():
            for kind, version in kinds.items():
                age = None
                if kind != "baseline":
                    key = (symbol, kind, version)
                    if key not in self._trained_at:
                        try:
                            info = daemon.store.version_info(symbol, kind, version)
                            self._trained_at[key] = ModelStore.trained_at(info)
                        except Exception as exc:  # noqa: BLE001 - a metric is not worth a failure
                            log.debug("model_age_unavailable", kind=kind, error=str(exc))
                            continue
                    age = (now - self._trained_at[key]).total_seconds()
                rows.append(ModelRow(symbol, kind, version, "production", age))
        self.metrics.set_models(rows)

    async def _refresh_account(self, daemon: Daemon) -> None:
        try:
            account = await daemon.broker.account()
            positions = await daemon.broker.positions()
        except Exception as exc:  # noqa: BLE001 - the broker's own paths report errors
            log.debug("metrics_account_unavailable", error=str(exc))
            return
        self._equity = account.equity
        self.metrics.set_account(account.balance, account.equity, len(positions))

    def close(self, reason: str) -> None:
        self.notifier.stopping(f"stopping: {reason}")
        if self.http is not None:
            self.http.stop()
        if self.alerter is not None:
            self.alerter.close(self._s.alerts.timeout_s)
        if self._account_task is not None:
            self._account_task.cancel()


@dataclass
class Daemon:
    """Everything one running daemon is made of, wired once."""

    settings: Settings
    clock: Clock
    journal: Journal
    broker: Broker
    feed: ReplayFeed | LiveFeed
    risk: RiskManager
    predictors: PredictorMap
    strategy: ScalpingStrategy
    engine: TradingEngine
    resumed_after: dict[str, datetime]
    store: ModelStore
    models: ModelManager
    auto: AutoTrainer
    service: Service


async def start_daemon(
    settings: Settings,
    *,
    clock: Clock | None = None,
    max_bars: int | None = None,
    duration_s: float | None = None,
    backend: TrainingBackend | None = None,
    runner: Runner | None = None,
    sources: Mapping[str, FrameSource] | None = None,
    replay_after: Mapping[str, datetime] | None = None,
    train: bool = True,
    on_bar: Callable[[Bar], None] | None = None,
) -> Daemon:
    """Crash-only start-up: the same path after a clean stop and after a crash.

    Opens (and checks) the journal, rebuilds the paper account and open positions
    from it, resumes the replay after the last processed bar, loads the predictor
    set and warms the features. Raises ``InvalidInput`` for bad data or journals.

    Backtests pass their own replay ``sources`` (and ``replay_after``: where trading
    starts when the journal has no resume point), ``train=False`` to serve only the
    models already in the store, and ``on_bar`` to follow each processed bar.
    """
    clock = clock or SystemClock()
    live_broker = settings.broker.kind != "paper"
    notifier = Notifier()
    # Connecting, reconciling and loading models may take a while under systemd.
    notifier.extend_timeout(START_STEP_TIMEOUT_S, "starting: journal, broker, models")
    service = Service(settings, clock, notifier)
    # Bad data is refused before the journal is touched.
    if sources is None:
        sources = {} if live_broker else _replay_sources(settings)
    journal = Journal(
        settings.storage.journal_path, clock=clock, batch_max=settings.storage.journal_batch_max
    )
    try:
        journal.open()
    except JournalError as exc:
        raise InvalidInput(str(exc)) from None
    try:
        service.open(journal)
        mt5_live: tuple[MT5Broker, LiveFeed] | None = None
        if live_broker:
            mt5_live = await _start_live(settings, journal, clock, FeatureSpec().window)
        broker: Broker = mt5_live[0] if mt5_live else _restore_paper_broker(settings, journal)
        spec = FeatureSpec()
        resume: dict[str, datetime] = {}
        for symbol in settings.trading.symbols:
            last = journal.get_state(LAST_BAR_KEY + symbol)
            if last:
                resume[symbol] = parse_iso_utc(str(last))
        if not resume and replay_after:
            resume = dict(replay_after)
        if resume:
            # A symbol added to an existing journal joins at the current market time
            # instead of replaying from its beginning (market time never goes back).
            now = max(resume.values())
            for symbol in settings.trading.symbols:
                resume.setdefault(symbol, now)
        feed: ReplayFeed | LiveFeed
        try:
            feed = ReplayFeed(
                sources,
                clock=clock,
                bars_per_s=settings.paper.replay_bars_per_s,
                # Enough history to warm the features and to train first models on.
                history_bars=max(
                    settings.paper.history_bars,
                    spec.window,
                    settings.models.initial_train_bars
                    if settings.models.enabled_kinds and train
                    else 0,
                ),
                resume_after=resume,
            )
        except ValueError as exc:
            raise InvalidInput(f"paper.data = {settings.paper.data!r}: {exc}") from None
        if mt5_live is not None:
            feed = mt5_live[1]
        risk = RiskManager(settings.risk, account_currency=settings.paper.account_currency)
        risk_state = journal.get_state(RISK_STATE_KEY)
        if isinstance(risk_state, dict):
            risk.restore(risk_state)
        predictors = PredictorMap()
        for symbol in settings.trading.symbols:
            predictors.swap(symbol, "baseline", MomentumBaseline(spec))
        store = ModelStore(
            Path(settings.storage.models_dir),
            clock=clock,
            retention=settings.models.retention,
            on_event=journal_hook(journal),
        )
        store.cleanup_leftovers()
        weights: dict[str, float] = {}
        crash = CrashPoint(os.environ.get(CRASH_ENV))
        strategy = ScalpingStrategy(
            settings=settings,
            broker=broker,
            risk=risk,
            journal=journal,
            predictors=predictors,
            specs={
                s: await broker.symbol_spec(s)
                for s in (mt5_live[0].tradable_symbols if mt5_live else settings.trading.symbols)
            },
            clock=clock,
            feature_spec=spec,
            mode="live" if mt5_live else "paper",
            weights=weights,
            crash=crash,
        )
        loop = asyncio.get_running_loop()

        def call_in_loop(fn: Callable[[], None]) -> None:
            loop.call_soon_threadsafe(fn)

        models = ModelManager(
            settings=settings,
            store=store,
            backend=backend or LocalProcessBackend(),
            predictors=predictors,
            journal=journal,
            clock=clock,
            feature_spec=spec,
            cache_dir=Path(settings.storage.journal_path).parent / "cache",
            recent_rows=strategy.recent_rows,
            call_in_loop=call_in_loop,
            baseline=lambda: MomentumBaseline(spec),
        )
        models.weights = weights
        strategy.on_decision = service.metrics.observe_decision
        strategy.on_order = service.metrics.order
        strategy.on_alert = service.alert
        service.bind(strategy)

        def on_write_state(failure: str | None) -> None:  # on the journal's writer thread
            loop.call_soon_threadsafe(service.journal_write_state, failure)

        journal.on_write_state = on_write_state
        housekeeping = _Housekeeping(settings, journal)
        recent: dict[str, Any] = {}
        auto = AutoTrainer(
            settings=settings,
            manager=models,
            store=store,
            journal=journal,
            predictors=predictors,
            clock=clock,
            feature_spec=spec,
            # A C-level copy of the deque: atomic under the GIL, safe from the scheduler.
            bars_for=lambda symbol: list(recent.get(symbol, ())),
            runner=runner,
        )
        strategy.on_scored = auto.tracker.on_bar
        auto.alert_sink = service.alert
        auto.on_training = service.metrics.training_run
        live = settings.broker.kind != "paper"
        engine = TradingEngine(
            feed=feed,
            strategy=strategy,
            broker=broker,
            journal=journal,
            clock=clock,
            risk=risk,
            equity_every_bars=settings.storage.equity_snapshot_every_bars,
            max_bars=max_bars,
            duration_s=duration_s,
            crash=crash,
            keep_bars=max(settings.models.train_bars, settings.models.initial_train_bars),
            every_market_s=HOUSEKEEPING_S,
            periodic=housekeeping,
            # Paper replay: schedules run on market time, ticked by every bar.
            # A backtest without training (train=False) has no schedule or trial to tick.
            after_bar=_after_bar(None if live or not train else auto, service.on_bar, on_bar),
        )
        recent = engine.recent_bars
        for pos in await broker.positions():
            engine.remember_position(pos)
        await broker.connect()
        if mt5_live is not None:
            # Broker halts (autotrading off, server clock mismatch) stop new entries.
            mt5_live[0].on_halt = lambda reason: service.halt("broker", reason)
            service.halt("broker", mt5_live[0].halt_reason)
        for symbol in settings.trading.symbols:
            models.load_production(symbol)
            for kind in settings.models.enabled_kinds:
                auto.resume_shadow(symbol, kind)
        history = feed.history()
        engine.warm_up(history, feature_bars=max(settings.paper.history_bars, spec.window))
        market_now = max((b.time for b in history), default=clock.now())
        for symbol in settings.trading.symbols if train else ():
            missing, stale = models.missing_or_stale(symbol, market_now)
            bars = [b for b in history if b.symbol == symbol]
            for kinds, reason, rows in (
                (missing, "no usable model", settings.models.initial_train_bars),
                (stale, "stale", settings.models.train_bars),
            ):
                if kinds:
                    auto.request_training(
                        symbol,
                        kinds,
                        BarColumns.from_bars(bars[-rows:]),
                        reason=reason,
                        rows=rows,
                    )
        if settings.autotrain.enabled and settings.models.enabled_kinds:
            # The first drift check would import scipy (about 1 s) on the checks thread
            # and stall the loop; pay it now, before the first bar.
            import ml.drift  # noqa: F401
        auto.start(live=live)
        if settings.models.retrain_first_when_stale:
            notifier.extend_timeout(
                settings.autotrain.job_timeout_s * max(1, len(settings.models.enabled_kinds)),
                "starting: retraining stale models first",
            )
            await asyncio.to_thread(auto.wait_idle)
    except BaseException:
        service.close("start-up failed")
        journal.close()
        raise
    return Daemon(
        settings,
        clock,
        journal,
        broker,
        feed,
        risk,
        predictors,
        strategy,
        engine,
        resume,
        store,
        models,
        auto,
        service,
    )


def _after_bar(
    auto: AutoTrainer | None, *hooks: Callable[[Bar], None] | None
) -> Callable[[Bar], None]:
    """What runs after each processed bar: the hooks in order, then the schedules' tick."""
    follow = [h for h in hooks if h is not None]

    def after(bar: Bar) -> None:
        for hook in follow:
            hook(bar)
        if auto is not None:
            auto.tick(bar.time)

    return after


async def serve(
    daemon: Daemon,
    *,
    stop: asyncio.Event | None = None,
    install_signals: bool = True,
    command_poll_s: float | None = 1.0,
) -> int:
    """Trade until the feed ends, a limit is reached or a stop is requested; then stop cleanly.

    ``command_poll_s``: how often the CLI's requests in the journal's ``commands``
    table are answered (None: not at all, for runs on a fake clock).
    """
    settings, journal, strategy, engine = (
        daemon.settings,
        daemon.journal,
        daemon.strategy,
        daemon.engine,
    )
    stop = stop or asyncio.Event()
    failure: list[str] = []

    def on_failure(name: str, exc: BaseException) -> None:
        failure.append(f"task {name}: {type(exc).__name__}: {exc}")
        stop.set()

    tasks = TaskSupervisor(on_failure=on_failure)
    # Handlers first: a signal that arrives once "ready" is announced must stop cleanly.
    restore_signals = _install_signal_handlers(stop) if install_signals else (lambda: None)
    journal.record_event(
        "info",
        "daemon_started",
        f"{settings.broker.kind} daemon started on {', '.join(settings.trading.symbols)}",
        {
            "settings": settings.public_dict(),
            "resumed_after": {k: iso_utc(v) for k, v in daemon.resumed_after.items()},
        },
    )
    log.info(
        "daemon_ready",
        broker=settings.broker.kind,
        symbols=list(settings.trading.symbols),
        journal=str(settings.storage.journal_path),
        resumed=bool(daemon.resumed_after),
        predictors=daemon.predictors.versions(),
        replay_bars_per_s=settings.paper.replay_bars_per_s,
    )
    reason = "failure"
    try:
        run_task = tasks.create(engine.run(stop), name="engine")
        if command_poll_s is not None:
            handler = cli_models.make_command_handler(
                store=daemon.store,
                manager=daemon.auto,
                settings=settings,
                bars_for=lambda symbol: BarColumns.from_bars(list(engine.recent_bars[symbol])),
            )
            tasks.create(
                serve_commands(journal, handler, clock=daemon.clock, interval_s=command_poll_s),
                name="commands",
            )
        service = daemon.service
        tasks.create(
            loop_monitor(Service.TICK_S, service.metrics.loop_lag, lambda: service.tick(daemon)),
            name="loop-monitor",
        )
        stop_task = tasks.create(stop.wait(), name="stop-wait")
        await asyncio.wait({run_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if not run_task.done():
            # A signal: the bar in progress finishes; no new entries from here on.
            daemon.service.halt("shutdown", "shutting down")
            _, pending = await asyncio.wait({run_task}, timeout=SHUTDOWN_BAR_TIMEOUT_S)
            if pending:
                # A bar stuck on a journal that cannot write (disk full): give up on it.
                log.error("shutdown_bar_abandoned", timeout_s=SHUTDOWN_BAR_TIMEOUT_S)
                run_task.cancel()
                await asyncio.wait({run_task})
        if not failure and not run_task.cancelled() and run_task.exception() is None:
            reason = run_task.result()
    finally:
        restore_signals()
        daemon.service.notifier.stopping(f"stopping: {reason}")
        await tasks.cancel_all()
        # Training and checks stop before the last journal lines are written.
        await asyncio.to_thread(daemon.auto.stop)
        try:
            if engine.stats.last_bar_time is not None:
                await engine.snapshot_equity(engine.stats.last_bar_time)
            account = await daemon.broker.account()
            journal.record_event(
                "info" if not failure else "error",
                "daemon_stopped",
                f"stopped: {reason}" + (f" ({'; '.join(failure)})" if failure else ""),
                {"bars": engine.stats.bars, "equity": account.equity, "failures": failure},
            )
            log.info(
                "daemon_stopped",
                reason=reason,
                bars=engine.stats.bars,
                entries=strategy.status.entries,
                exits=strategy.status.exits,
                balance=round(account.balance, 2),
                equity=round(account.equity, 2),
            )
            await daemon.broker.close()
        finally:
            daemon.service.close(reason)
            try:
                await asyncio.wait_for(journal.flush(), SHUTDOWN_BAR_TIMEOUT_S)
            except TimeoutError:
                # Writes stay queued; Journal.close retries them, then reports what failed.
                log.error("journal_flush_timed_out", timeout_s=SHUTDOWN_BAR_TIMEOUT_S)
    return EXIT_FAILURE if failure else EXIT_OK


async def run_daemon(
    settings: Settings,
    *,
    clock: Clock | None = None,
    max_bars: int | None = None,
    duration_s: float | None = None,
    install_signals: bool = True,
    stop: asyncio.Event | None = None,
    command_poll_s: float | None = 1.0,
) -> int:
    daemon = await start_daemon(settings, clock=clock, max_bars=max_bars, duration_s=duration_s)
    try:
        return await serve(
            daemon, stop=stop, install_signals=install_signals, command_poll_s=command_poll_s
        )
    finally:
        daemon.journal.close()


def _install_signal_handlers(stop: asyncio.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM (and Ctrl-Break on Windows) all mean: stop cleanly."""
    loop = asyncio.get_running_loop()
    names = ["SIGINT", "SIGTERM", "SIGBREAK"]
    sigs = [getattr(signal, n) for n in names if hasattr(signal, n)]
    installed: list[tuple[signal.Signals, object]] = []
    for sig in sigs:
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append((sig, None))
        except (NotImplementedError, RuntimeError):
            # Windows has no add_signal_handler: a plain handler wakes the loop thread-safely.
            previous = signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
            installed.append((sig, previous))

    def restore() -> None:
        for sig, previous in installed:
            if previous is None:
                loop.remove_signal_handler(sig)
            else:
                signal.signal(sig, previous)  # type: ignore[arg-type]

    return restore


# -- backtest ---------------------------------------------------------------------------

# A synthetic backtest without --to covers this many days of market time.
SYNTHETIC_BACKTEST_DAYS = 20
BACKTEST_KINDS = ("rf", "xgb", "lstm", "mlp")


@dataclass
class BacktestPlan:
    """What one backtest replays, and where it writes; built (and refused) before any work."""

    symbol: str
    source: str  # "synthetic" or the data file
    timeframe: str
    frame: pd.DataFrame  # warm-up history and the bars to trade
    trade_from: datetime  # open time of the first traded bar
    trade_to: datetime  # open time of the last bar
    bars: int  # bars to trade
    warmup_bars: int
    replay_after: dict[str, datetime] | None
    walk_forward: bool
    journal: Path
    models_dir: Path
    notes: list[str]


def _parse_when(text: str | None, flag: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = pd.Timestamp(text)
    except ValueError:
        value = pd.NaT
    if value is pd.NaT or pd.isna(value):
        raise InvalidInput(
            f"{flag} {text!r}: not a date; use YYYY-MM-DD or an ISO time such as 2019-03-01T08:00Z"
        )
    if value.tzinfo is None:
        value = value.tz_localize("UTC")
    moment: datetime = value.tz_convert("UTC").to_pydatetime()
    return moment


def _backtest_frame(
    settings: Settings, symbol: str, data: str, timeframe: str | None, end: datetime | None
) -> tuple[pd.DataFrame, str, list[str]]:
    """The bars of ``data`` before ``end``, their timeframe, and notes on cleaning."""
    if data == "synthetic":
        tf = timeframe or settings.trading.timeframe
        if tf not in TIMEFRAME_SECONDS:
            raise InvalidInput(
                f"--timeframe {tf!r}: use one of {', '.join(TIMEFRAME_SECONDS)} for synthetic data"
            )
        origin = parse_iso_utc(settings.paper.synthetic_start)
        last = end or origin + timedelta(days=SYNTHETIC_BACKTEST_DAYS)
        spec = settings.symbols[symbol]
        market = paper_market(
            symbol,
            index=0,  # a paper run's first symbol
            seed=settings.paper.synthetic_seed,
            start=origin,
            timeframe_s=TIMEFRAME_SECONDS[tf],
            point=spec.point,
            default_spread_points=spec.default_spread_points,
        )
        parts = []
        for chunk in market.iter_frames():
            parts.append(chunk[chunk["time"] < pd.Timestamp(last)])
            if chunk["time"].iloc[-1] >= pd.Timestamp(last):
                break
        frame = pd.concat(parts, ignore_index=True)
        return frame, tf, [f"synthetic {symbol} market from {iso_utc(origin)} (seed {market.seed})"]
    path = Path(data)
    try:
        loaded = load_bars(
            path, server_timezone=settings.broker.server_timezone, timeframe=timeframe
        )
    except DataFileError as exc:
        raise InvalidInput(str(exc)) from None
    if loaded.timeframe not in TIMEFRAME_SECONDS:
        raise InvalidInput(
            f"{path}: the bars are {loaded.timeframe} apart; the strategy trades "
            f"{', '.join(TIMEFRAME_SECONDS)} bars: resample the export to one of them"
        )
    report = loaded.report
    notes = [
        f"{path}: {report.rows_out:,} {loaded.timeframe} bars ({loaded.fmt}) after cleaning "
        f"{report.rows_in:,} rows: {report.rejected_total} rejected, {report.gaps} gaps "
        f"({report.missing_bars:,} missing bars, {report.weekend_gaps} weekends)"
    ]
    frame = loaded.frame
    if end is not None:
        frame = frame[frame["time"] < pd.Timestamp(end)].reset_index(drop=True)
    return frame, loaded.timeframe, notes


def _backtest_name(root: Path, symbol: str, data: str, walk_forward: bool, now: datetime) -> Path:
    label = "synthetic" if data == "synthetic" else Path(data).name.split(".")[0]
    base = f"{symbol}_{label}_{now:%Y%m%d-%H%M%S}{'_wf' if walk_forward else ''}"
    for n in range(1, 1000):
        name = base if n == 1 else f"{base}-{n}"
        if not (root / f"{name}.sqlite3").exists() and not (root / f"{name}_models").exists():
            return root / f"{name}.sqlite3"
    raise InvalidInput(f"{root}: too many backtests named {base}; clean the directory up")


def plan_backtest(
    settings: Settings,
    *,
    symbol: str,
    data: str,
    timeframe: str | None = None,
    start: str | None = None,
    end: str | None = None,
    walk_forward: bool = False,
    now: datetime | None = None,
) -> BacktestPlan:
    """Load and check the data, decide the windows and paths; ``InvalidInput`` if unusable."""
    if symbol not in settings.symbols:
        raise InvalidInput(
            f"--symbol {symbol}: no [symbols.{symbol}] contract table in the settings; "
            f"known: {', '.join(sorted(settings.symbols))}"
        )
    first = _parse_when(start, "--from")
    last = _parse_when(end, "--to")
    if first is not None and last is not None and first >= last:
        raise InvalidInput(f"--from {start} is not before --to {end}")
    frame, tf, notes = _backtest_frame(settings, symbol, data, timeframe, last)
    if frame.empty:
        raise InvalidInput(f"{data}: no bars before --to {end}" if end else f"{data}: no bars")
    times = frame["time"]
    warmup = max(settings.paper.history_bars, FeatureSpec().window)
    kinds = settings.models.enabled_kinds
    if walk_forward and not kinds:
        raise InvalidInput("--walk-forward trains models, but every models.<kind>.enabled is false")
    if walk_forward:
        warmup = max(warmup, settings.models.initial_train_bars)
    replay_after = None
    if first is not None and first > times.iloc[0]:
        before = int((times < pd.Timestamp(first)).sum())
        if walk_forward and before < settings.models.initial_train_bars:
            raise InvalidInput(
                f"{data}: a walk-forward trains its first models on the "
                f"models.initial_train_bars = {settings.models.initial_train_bars:,} bars before "
                f"--from, and there are only {before:,} before {start}; pick a later --from, "
                "more data, or a smaller models.initial_train_bars"
            )
        if before < warmup:
            notes.append(
                f"only {before:,} bars before --from {start} to warm the features up "
                f"({warmup:,} wanted): the first bars may not trade"
            )
        replay_after = {symbol: times.iloc[before - 1].to_pydatetime()}
        warmup = min(before, warmup)
        # Only the warm-up (or first training window) before --from is ever read.
        frame = frame.iloc[before - warmup :].reset_index(drop=True)
        traded = frame.iloc[warmup:]
    else:
        if first is not None:
            notes.append(f"--from {start} is before the data starts ({times.iloc[0]})")
        if len(frame) <= warmup:
            raise InvalidInput(
                f"{data}: {len(frame):,} {tf} bars in the chosen period, but the backtest needs "
                f"{warmup:,} bars first ("
                + (
                    "models.initial_train_bars for the first training"
                    if walk_forward
                    else "paper.history_bars and the feature window"
                )
                + ") and then bars to trade; give more data or a longer --from/--to range"
            )
        traded = frame.iloc[warmup:]
    root = Path(settings.storage.journal_path).parent / "backtests"
    journal = _backtest_name(root, symbol, data, walk_forward, now or datetime.now(UTC))
    return BacktestPlan(
        symbol=symbol,
        source=data,
        timeframe=tf,
        frame=frame,
        trade_from=traded["time"].iloc[0].to_pydatetime(),
        trade_to=traded["time"].iloc[-1].to_pydatetime(),
        bars=len(traded),
        warmup_bars=warmup,
        replay_after=replay_after,
        walk_forward=walk_forward,
        journal=journal,
        models_dir=journal.with_name(journal.stem + "_models"),
        notes=notes,
    )


def _copy_production_models(
    settings: Settings, plan: BacktestPlan
) -> tuple[dict[str, str], list[str]]:
    """Copy the live store's models of the symbol into the backtest's own directory.

    The live store is only read (only the daemon writes it); the backtest's copy is
    what its daemon loads. Returns the production versions and lookahead warnings.
    """
    live_root = Path(settings.storage.models_dir)
    live = ModelStore(live_root, clock=SystemClock(), retention=settings.models.retention)
    versions: dict[str, str] = {}
    warnings: list[str] = []
    for kind in settings.models.enabled_kinds:
        src = live.kind_dir(plan.symbol, kind)
        try:
            info = live.resolve(plan.symbol, kind)
        except Exception as exc:  # noqa: BLE001 - an unusable live model is skipped, said why
            warnings.append(f"{kind}: production in {src} not usable ({exc}); left out")
            continue
        if info is None:
            continue
        shutil.copytree(
            src,
            plan.models_dir / plan.symbol / kind,
            ignore=shutil.ignore_patterns("*.lock", ".tmp-*"),
        )
        versions[kind] = info.version
        window = live.manifest(plan.symbol, kind, info.version).get("training_window") or {}
        if isinstance(window, dict) and window.get("first") and window.get("last"):
            first = parse_iso_utc(str(window["first"]))
            last = parse_iso_utc(str(window["last"]))
            if first <= plan.trade_to and last >= plan.trade_from:
                warnings.append(
                    f"{kind} {info.version} was trained on bars from {window['first']} to "
                    f"{window['last']}, overlapping the backtest period: its results there "
                    "are in-sample (use --walk-forward)"
                )
            elif first > plan.trade_to:
                warnings.append(
                    f"{kind} {info.version} was trained on later bars ({window['first']} "
                    f"to {window['last']}): it knows the future of this period"
                )
    return versions, warnings


def backtest_settings(settings: Settings, plan: BacktestPlan, kinds: Sequence[str]) -> Settings:
    """The settings a backtest's daemon runs with: the same strategy and risk, its own files."""
    models = settings.models.model_copy(
        update={
            k: settings.models.kind(k).model_copy(update={"enabled": k in kinds})
            for k in BACKTEST_KINDS
        }
    )
    return settings.model_copy(
        update={
            "broker": settings.broker.model_copy(update={"kind": "paper"}),
            "trading": settings.trading.model_copy(
                update={"symbols": (plan.symbol,), "timeframe": plan.timeframe}
            ),
            "paper": settings.paper.model_copy(
                update={"data": plan.source, "replay_bars_per_s": 0.0}
            ),
            "models": models,
            "autotrain": settings.autotrain.model_copy(update={"enabled": plan.walk_forward}),
            # A backtest serves no /health and posts no alerts: the live daemon may be
            # running beside it on the same port, and simulated stops are not news.
            "http": settings.http.model_copy(update={"enabled": False}),
            "alerts": settings.alerts.model_copy(update={"webhook_url": None}),
            "storage": settings.storage.model_copy(
                update={"journal_path": str(plan.journal), "models_dir": str(plan.models_dir)}
            ),
        }
    )


async def run_backtest(
    settings: Settings,
    plan: BacktestPlan,
    *,
    on_bar: Callable[[Bar], None] | None = None,
    stop: asyncio.Event | None = None,
    install_signals: bool = True,
    backend: TrainingBackend | None = None,
) -> int:
    """Replay the plan through the daemon's own kernel on a clock that follows the bars.

    The replay waits for every training job (``InlineRunner``), so a walk-forward is
    deterministic: the same data and settings give the same journal.
    """
    tf = timedelta(seconds=TIMEFRAME_SECONDS[plan.timeframe])
    clock = FakeClock(plan.trade_from)
    follow = on_bar

    def each_bar(bar: Bar) -> None:
        clock.advance_to(bar.time + tf)
        if follow is not None:
            follow(bar)

    daemon = await start_daemon(
        settings,
        clock=clock,
        backend=backend,
        runner=InlineRunner(),
        sources={plan.symbol: _whole_frame(plan.frame)},
        replay_after=plan.replay_after,
        train=plan.walk_forward,
        on_bar=each_bar,
    )
    try:
        return await serve(daemon, stop=stop, install_signals=install_signals, command_poll_s=None)
    finally:
        daemon.journal.close()


class _BacktestProgress:
    """A rich progress bar over the bars on a terminal; nothing otherwise (logs say enough)."""

    def __init__(self, total: int, label: str) -> None:
        self._rich: Any = None
        self._count = 0
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._rich = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("bars"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._rich.start()
            self._task = self._rich.add_task(label, total=total)

    def __call__(self, bar: Bar) -> None:
        self._count += 1
        if self._rich is not None and self._count % 200 == 0:
            self._rich.update(self._task, completed=self._count, description=f"{bar.time:%Y-%m-%d}")

    def close(self) -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=self._count)
            self._rich.stop()


def cmd_backtest(settings: Settings, args: argparse.Namespace, *, out: TextIO) -> int:
    if settings.logging.level != "DEBUG":
        # Loading, simulated halts and stops are in the plan lines and the journal (the
        # report lists them); on the terminal they would bury the progress bar.
        configure_logging("CRITICAL", settings.logging.format)
    plan = plan_backtest(
        settings,
        symbol=args.symbol,
        data=args.data,
        timeframe=args.timeframe,
        start=getattr(args, "from"),
        end=args.to,
        walk_forward=args.walk_forward,
    )
    plan.journal.parent.mkdir(parents=True, exist_ok=True)
    if plan.walk_forward:
        kinds: Sequence[str] = settings.models.enabled_kinds
        models_line = (
            f"walk-forward: trains {', '.join(kinds)} into {plan.models_dir} (first on "
            f"{settings.models.initial_train_bars:,} bars, then as models.<kind>.retrain_every_s "
            "says), every candidate through the validation gates"
        )
    else:
        versions, warnings = _copy_production_models(settings, plan)
        kinds = list(versions)
        plan.notes.extend(warnings)
        models_line = (
            "models: " + ", ".join(f"{k} {v}" for k, v in versions.items())
            if versions
            else f"models: none in production in {settings.storage.models_dir} for "
            f"{plan.symbol}; the baseline predictor trades (--walk-forward trains models)"
        )
    print(
        f"backtest {plan.symbol} {plan.timeframe} on {plan.source}: {plan.bars:,} bars to trade "
        f"from {iso_utc(plan.trade_from)} to {iso_utc(plan.trade_to)} "
        f"(after {plan.warmup_bars:,} warm-up bars)",
        file=out,
    )
    for line in [models_line, *plan.notes]:
        print(f"  {line}", file=out)
    run_settings = backtest_settings(settings, plan, kinds)
    progress = _BacktestProgress(plan.bars, "backtest")
    try:
        code = asyncio.run(run_backtest(run_settings, plan, on_bar=progress))
    finally:
        progress.close()
    print(f"journal: {plan.journal}", file=out)
    from ml.report import ReportError, build_report  # lazy: matplotlib stays out of `run`

    try:
        result = build_report(plan.journal, bars={plan.symbol: plan.frame})
    except ReportError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return code or EXIT_FAILURE
    print(result.summary, file=out)
    return code


def cmd_report(journal: Path, out_path: Path | None, *, out: TextIO) -> int:
    """An HTML report (charts embedded, no network needed) and a one-screen summary."""
    from ml.report import ReportError, build_report  # lazy: matplotlib stays out of `run`

    try:
        result = build_report(journal, out_path, auto_bars=True)
    except ReportError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_INVALID
    print(result.summary, file=out)
    return EXIT_OK


# -- status -----------------------------------------------------------------------------


def cmd_status(journal_path: Path, *, check: bool, clock: Clock, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    if not journal_path.exists():
        print(
            f"{journal_path}: no journal here yet; run the daemon first or pass --journal PATH",
            file=sys.stderr,
        )
        return EXIT_INVALID
    try:
        conn = Journal.open_reader(journal_path)
    except JournalError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_INVALID
    try:
        if check:
            result = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
            ok = result == ["ok"]
            print(f"integrity_check: {'ok' if ok else '; '.join(result)}", file=stream)
            if not ok:
                return EXIT_FAILURE
        market_now = _market_now(conn) or clock.now()
        text = format_summary(summary(conn, market_now), wall_now=clock.now())
        entries = fetch_state(conn, ENTRIES_STATE_KEY)
        if isinstance(entries, dict) and entries.get("blocked"):
            text += f"\nnew entries blocked since {entries.get('since')}: {entries['blocked']}"
        text += "\n" + format_broker(conn) + "\n" + format_models(conn, market_now)
    finally:
        conn.close()
    print(text, file=stream)
    return EXIT_OK


def _market_now(conn: sqlite3.Connection) -> datetime | None:
    """The open time of the latest processed bar: "today" in a replay is the market's day."""
    return max(fetch_market_times(conn).values(), default=None)


def format_summary(s: JournalSummary, *, wall_now: datetime) -> str:
    """Plain text so it reads the same in a terminal, a log and an e-mail."""
    lines = [f"journal schema v{s.schema_version}, market time {iso_utc(s.now)}"]
    eq = s.last_equity
    if eq is not None:
        lines.append(
            f"equity {eq.equity:,.2f}  balance {eq.balance:,.2f}  margin {eq.margin:,.2f}  "
            f"free margin {eq.free_margin:,.2f}  (snapshot at {iso_utc(eq.time)})"
        )
    else:
        lines.append("equity: no snapshot yet")
    if s.heartbeat is not None:
        age = (wall_now - parse_iso_utc(s.heartbeat)).total_seconds()
        lines.append(f"daemon heartbeat: {s.heartbeat} ({age:,.0f} s ago)")
    else:
        lines.append("daemon heartbeat: never")
    lines.append(f"open positions: {len(s.open_trades)}")
    for t in s.open_trades:
        lines.append(
            f"  {t.symbol} {t.side} {t.volume:g} @ {t.open_price} sl {t.sl} tp {t.tp} "
            f"since {iso_utc(t.open_time)} id {t.client_order_id}"
        )
    rate = "-" if s.win_rate_today is None else f"{s.win_rate_today:.0%}"
    lines.append(
        f"today: {s.trades_today} closed trades, {s.wins_today} won, win rate {rate}, "
        f"net P&L {s.pnl_today:,.2f}"
    )
    lines.append(f"all time: {s.trades_total} closed trades, net P&L {s.pnl_total:,.2f}")
    if not s.last_errors:
        lines.append("last errors: none")
    else:
        lines.append("last errors:")
        for e in s.last_errors:
            lines.append(f"  {iso_utc(e.time)} {e.level} {e.kind}: {e.message}")
    return "\n".join(lines)


BROKER_EVENTS = (
    "broker_connected",
    "broker_connect_failed",
    "broker_disconnected",
    "broker_offline",
    "broker_online",
)


def format_broker(conn: sqlite3.Connection) -> str:
    """The broker link as the daemon last journaled it (live brokers; paper is always up)."""
    started = conn.execute(
        "SELECT message FROM events WHERE kind = 'daemon_started' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    last = conn.execute(
        "SELECT time, kind, message FROM events WHERE kind IN (?, ?, ?, ?, ?) "
        "ORDER BY id DESC LIMIT 1",
        BROKER_EVENTS,
    ).fetchone()
    if last is None:
        kind = str(started[0]).split(" ", 1)[0] if started else "paper"
        return f"broker: {kind}" + (" (simulated, always connected)" if kind == "paper" else "")
    time_, event, message = last
    up = event in ("broker_connected", "broker_online")
    state = "connected" if up else "NOT CONNECTED, not trading"
    return f"broker: {state} since {time_}: {message}"


def format_models(conn: sqlite3.Connection, market_now: datetime) -> str:
    """Per symbol and kind: what serves, what is on trial, the next retrain, the last run."""
    state = fetch_state(conn, AUTOTRAIN_STATE_KEY)
    auto: dict[str, Any] = state if isinstance(state, dict) else {}
    last_runs: dict[str, tuple[Any, ...]] = {}
    for row in conn.execute(
        "SELECT symbol, kind, status, version, error, COALESCE(finished, started) FROM "
        "training_runs WHERE id IN (SELECT max(id) FROM training_runs GROUP BY symbol, kind)"
    ):
        last_runs[f"{row[0]}/{row[1]}"] = tuple(row[2:])
    models: dict[str, Any] = auto.get("models", {})
    trials: dict[str, Any] = auto.get("trials", {})
    next_runs: dict[str, str] = auto.get("next_runs", {})
    keys = sorted(set(models) | set(last_runs))
    if not keys:
        return "models: none yet (the baseline serves)"
    lines = [f"models (auto-trainer {'on' if auto.get('enabled', True) else 'off'}):"]
    for key in keys:
        m = models.get(key, {})
        parts = [f"  {key}"]
        if m:
            trained = m.get("trained")
            age = ""
            if trained:
                hours = (market_now - parse_iso_utc(trained)).total_seconds() / 3600
                age = f", age {hours:,.1f} h"
            parts.append(f"{m.get('stage', 'production')} {m.get('production')}{age}")
        else:
            parts.append("no model serving")
        trial = trials.get(key)
        if trial:
            what = "shadow" if trial["mode"] == "shadow" else "rollback watch of"
            parts.append(
                f"{what} {trial['version']} vs {trial['compared_with']}: "
                f"{trial['scored_bars']} bars scored"
            )
        elif m.get("shadow"):
            parts.append(f"shadow {m['shadow']}")
        nxt = next_runs.get(f"retrain:{key.replace('/', ':')}")
        if nxt:
            parts.append(f"next retrain {nxt}")
        run = last_runs.get(key)
        if run:
            status, version, error, when = run
            why = f" ({error})" if error else ""
            parts.append(f"last run {status} {version or ''}{why} at {when}".replace("  ", " "))
        lines.append("; ".join(parts))
    checks: dict[str, list[str]] = {}
    for job, when in sorted(next_runs.items()):
        action, _, rest = job.partition(":")
        if action != "retrain":
            checks.setdefault(rest, []).append(f"{action} {when}")
    for symbol, items in checks.items():
        lines.append(f"  {symbol} next checks: {', '.join(items)}")
    active = auto.get("active_jobs") or []
    if active:
        lines.append(f"  jobs: {', '.join(active)}")
    return "\n".join(lines)


# -- CLI --------------------------------------------------------------------------------


def _add_run_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--max-bars", type=int, default=default, help="stop after N bars")
    parser.add_argument("--duration", type=float, default=default, help="stop after S seconds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="settings file (TOML)")
    _add_run_options(parser, None)  # `python main.py --max-bars N` is `run --max-bars N`
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the trading daemon (the default command)")
    run.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="settings file")
    _add_run_options(run, argparse.SUPPRESS)
    status = sub.add_parser("status", help="equity, positions, today's trades, last errors")
    status.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="settings file")
    status.add_argument("--journal", type=Path, default=None, help="journal file to read")
    status.add_argument("--check", action="store_true", help="run PRAGMA integrity_check")
    cli_models.add_parsers(sub)
    report = sub.add_parser("report", help="HTML report and summary of a journal")
    report.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="settings file")
    report.add_argument("--journal", type=Path, default=None, help="journal file to report on")
    report.add_argument("--out", type=Path, default=None, help="HTML file to write")
    backtest = sub.add_parser(
        "backtest", help="replay history through the daemon's kernel (own journal and report)"
    )
    backtest.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="settings file")
    backtest.add_argument("--symbol", required=True, help="symbol to trade, e.g. EURUSD")
    backtest.add_argument(
        "--data", required=True, help="a bar file (.csv, .csv.gz, MT5 export) or 'synthetic'"
    )
    backtest.add_argument(
        "--timeframe", default=None, help="bar timeframe (default: the data's own spacing)"
    )
    backtest.add_argument("--from", default=None, help="first traded bar time (UTC), YYYY-MM-DD")
    backtest.add_argument("--to", default=None, help="end of the data used (UTC, exclusive)")
    backtest.add_argument(
        "--walk-forward",
        action="store_true",
        help="train, validate and promote as the auto-trainer would, into the backtest's own store",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "run"
    for name in ("max_bars", "duration"):
        value = getattr(args, name, None)
        if value is not None and not (0 < value < float("inf")):
            print(f"--{name.replace('_', '-')} must be a number > 0 (got {value})", file=sys.stderr)
            return EXIT_INVALID
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_INVALID
    configure_logging(settings.logging.level, settings.logging.format)
    try:
        if command == "status":
            path = args.journal or Path(settings.storage.journal_path)
            return cmd_status(path, check=args.check, clock=SystemClock())
        if command in ("train", "models"):
            return cli_models.run(settings, args, out=sys.stdout, clock=SystemClock())
        if command == "backtest":
            return cmd_backtest(settings, args, out=sys.stdout)
        if command == "report":
            path = args.journal or Path(settings.storage.journal_path)
            return cmd_report(path, args.out, out=sys.stdout)
    except InvalidInput as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_INVALID
    except BrokenPipeError:
        # `python main.py status | head`: the reader left; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    # Until the loop's own handlers are installed, a stop request during start-up
    # still means a clean exit 0 (Ctrl-C raises KeyboardInterrupt, SIGTERM this).
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        return asyncio.run(
            run_daemon(
                settings,
                max_bars=getattr(args, "max_bars", None),
                duration_s=getattr(args, "duration", None),
            )
        )
    except InvalidInput as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_INVALID
    except HttpServerError as exc:
        print(f"cannot serve /health and /metrics: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (KeyboardInterrupt, _StopRequested):
        log.info("daemon_stopped", reason="stop requested during start-up")
        return EXIT_OK
    finally:
        signal.signal(signal.SIGTERM, previous)


class _StopRequested(BaseException):
    """SIGTERM before the event loop took over signal handling."""


def _raise_stop(_signum: int, _frame: object) -> None:
    raise _StopRequested


if __name__ == "__main__":
    sys.exit(main())
