"""The scalping strategy: one decision per closed bar per symbol.

On each bar: update the symbol's features, take one snapshot of the predictor
map, combine the class probabilities, manage exits (maximum holding time,
opposite signal; SL/TP are the broker's), then filter, size and send an entry.
Every request and result goes to the journal; a trade is journaled (and the
write awaited, so it is durable) before the next bar is looked at.

Client order ids are derived from (mode, symbol, action, bar time): the same
decision made again after a crash gets the same id, and the journal's unique
key turns the repeat into a no-op instead of a second trade.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import structlog

from config.settings import Settings
from execution.broker import Broker, Deal, OrderRequest, OrderResult, Position, Side, SymbolSpec
from execution.retcodes import DONE, DONE_PARTIAL
from execution.retcodes import name as retcode_name
from execution.risk import RiskManager
from market_data.bars import Bar
from ml.predictor_map import PredictorMap
from strategy.ensemble import EnsembleResult, combine, predict_all
from strategy.features import FeatureEngine, FeatureSpec
from utils.clock import Clock
from utils.trade_journal import Journal, PredictionRow, TradeClose, TradeOpen

log = structlog.get_logger(__name__)

CRASH_ENV = "SCALPER_CRASH_AT"
ENTRIES_STATE_KEY = "strategy.entries"
# Entry blocks an operator must hear about (alerts), beyond the journal's warning.
ALERT_BLOCK_CODES = frozenset({"halted", "daily_loss", "kill_switch"})
RECENT_ROWS = 512  # longer than any sequence model's window


def client_order_id(mode: str, symbol: str, action: str, when: datetime) -> str:
    """16 upper-case letters/digits, deterministic for one decision (CONVENTIONS: Orders)."""
    digest = hashlib.sha256(f"{mode}|{symbol}|{action}|{when.isoformat()}".encode()).digest()
    return base64.b32encode(digest).decode("ascii")[:16]


class CrashPoint:
    """Deterministic self-kill for crash tests: ``SCALPER_CRASH_AT=<point>:<count>``.

    ``point`` is ``bar`` (after a bar is fully processed), ``order`` (after the
    broker filled an order, before the journal has it) or ``trade`` (after the
    trade is committed, before the bar is recorded as processed).
    """

    def __init__(self, spec: str | None) -> None:
        self.point: str | None = None
        self.count = 0
        if spec:
            point, _, count = spec.partition(":")
            self.point, self.count = point, int(count)

    def hit(self, point: str) -> None:
        if self.point != point:
            return
        self.count -= 1
        if self.count <= 0:
            log.warning("crash_point_reached", point=point)
            if hasattr(signal, "SIGKILL"):
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(137)


@dataclass
class StrategyStatus:
    bars: int = 0
    entries: int = 0
    exits: int = 0
    last_skip: str | None = None
    flat_reason: str | None = None
    # Recent timings (bounded): features + predictors + ensemble, and the whole bar
    # including exits, risk checks and order sending.
    decision_us: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    bar_us: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))


class ScalpingStrategy:
    def __init__(
        self,
        *,
        settings: Settings,
        broker: Broker,
        risk: RiskManager,
        journal: Journal,
        predictors: PredictorMap,
        specs: Mapping[str, SymbolSpec],
        clock: Clock,
        feature_spec: FeatureSpec,
        mode: str,
        weights: dict[str, float] | None = None,
        timer: Callable[[], int] = time.perf_counter_ns,
        crash: CrashPoint | None = None,
    ) -> None:
        # Called on the loop after each decided bar with the serving and the shadow
        # answers (the auto-trainer scores shadow candidates and rollback watches).
        self.on_scored: Callable[[Bar, np.ndarray, EnsembleResult, EnsembleResult], None] | None
        self.on_scored = None
        self._s = settings
        self._broker = broker
        self._risk = risk
        self._journal = journal
        self._predictors = predictors
        self._specs = dict(specs)
        self._clock = clock
        self._spec = feature_spec
        self._mode = mode
        # Shared with the model manager, which updates it on the loop thread.
        self._weights = weights if weights is not None else {}
        self._timer = timer
        self._crash = crash or CrashPoint(None)
        self._atr_idx = feature_spec.index("atr")
        self._canary_fraction = settings.autotrain.canary_fraction
        self._timeframe_s = settings.trading.timeframe_s
        self._engines = {
            sym: FeatureEngine(
                feature_spec,
                point=spec.point,
                default_spread_points=settings.symbols[sym].default_spread_points
                if sym in settings.symbols
                else 0,
            )
            for sym, spec in self._specs.items()
        }
        self._failing: set[tuple[str, str]] = set()
        self._rows: dict[str, deque[np.ndarray]] = {
            sym: deque(maxlen=RECENT_ROWS) for sym in self._specs
        }
        self._last_block: tuple[str | None, str | None] = (None, None)
        self._last_warned = False
        self.entries_halted: str | None = None  # set by operational errors / shutdown
        self.status = StrategyStatus()
        # Service hooks (metrics and alerts), set by the daemon; each must be cheap.
        self.on_decision: Callable[[float], None] | None = None  # seconds
        self.on_order: Callable[[str], None] | None = None  # retcode name
        self.on_alert: Callable[[str, str, dict[str, object], str | None], None] | None = None

    # -- bars -------------------------------------------------------------------------

    def warm(self, bar: Bar) -> None:
        """Feed a history bar to the features and sequence windows (no predictions, no orders)."""
        row = self._engines[bar.symbol].update(bar)
        if row is not None:
            self._rows[bar.symbol].append(row)
            for predictor in self._predictors.snapshot(bar.symbol).values():
                predictor.observe(row)
            for predictor in self._predictors.shadow_snapshot(bar.symbol).values():
                predictor.observe(row)

    def recent_rows(self, symbol: str) -> list[np.ndarray]:
        """The latest feature rows (oldest first): primes a model swapped in mid-run."""
        return list(self._rows[symbol])

    async def on_bar(self, bar: Bar) -> None:
        t0 = self._timer()
        self.status.bars += 1
        row = self._engines[bar.symbol].update(bar)
        if row is None:
            return
        self._rows[bar.symbol].append(row)
        predictors = self._predictors.snapshot(bar.symbol)
        shadow = self._predictors.shadow_snapshot(bar.symbol)
        canary = self._canary_fraction > 0 and any(p.stage == "shadow" for p in shadow.values())
        result = predict_all(predictors, row, self._weights, self._timer, self._spec.hash)
        shadow_result = None
        if canary:
            # A canary's candidate must answer before the decision it takes part in.
            shadow_result = predict_all(shadow, row, {}, self._timer, self._spec.hash)
        decision_us = (self._timer() - t0) / 1000.0
        self.status.decision_us.append(decision_us)
        if self.on_decision is not None:
            self.on_decision(decision_us / 1e6)
        self._report_failures(bar, result)
        positions = await self._broker.positions()
        await self._manage_exits(bar, result, [p for p in positions if p.symbol == bar.symbol])
        await self._maybe_enter(
            bar,
            row,
            result,
            positions,
            only_baseline=_only_baseline(predictors),
            canary=self._canary_set(result, shadow_result) if shadow_result else None,
        )
        self.status.bar_us.append((self._timer() - t0) / 1000.0)
        self._record_predictions(bar, result)
        # Shadow candidates answer after the decision was sent: outside its latency.
        if shadow_result is None and shadow:
            shadow_result = predict_all(shadow, row, {}, self._timer, self._spec.hash)
        if shadow_result is not None:
            self._record_predictions(bar, shadow_result)
            if self.on_scored is not None:
                self.on_scored(bar, row, result, shadow_result)

    def _canary_set(self, result: EnsembleResult, shadow: EnsembleResult) -> np.ndarray | None:
        """The ensemble with each candidate in shadow standing in for its kind."""
        candidates = {o.kind: o for o in shadow.outputs if o.stage == "shadow"}
        if not candidates:
            return None
        outputs = tuple(candidates.get(o.kind, o) for o in result.outputs)
        outputs += tuple(o for k, o in candidates.items() if k not in {x.kind for x in outputs})
        return combine(outputs, self._weights)

    # -- exits ------------------------------------------------------------------------

    async def _manage_exits(
        self, bar: Bar, result: EnsembleResult, positions: list[Position]
    ) -> None:
        for pos in positions:
            held = self.bars_held(pos, bar)
            reason = None
            if held >= self._s.strategy.max_holding_bars:
                reason = "max_holding"
            elif self._s.strategy.close_on_opposite_signal and result.proba is not None:
                side = self._signal(result.proba)
                if side is not None and side is pos.side.opposite():
                    reason = "opposite_signal"
            if reason is not None:
                await self.close(pos, reason, bar)

    def bars_held(self, pos: Position, bar: Bar) -> int:
        return int((bar.time - pos.open_time).total_seconds() // self._timeframe_s)

    async def close(self, pos: Position, reason: str, bar: Bar) -> OrderResult:
        coid = client_order_id(self._mode, pos.symbol, f"close{pos.position_id}", bar.time)
        result = await self._broker.close_position(pos, coid)
        # The close order and the trade's close commit together: a crash keeps both or
        # neither (reconciliation then finds the position closed at the broker).
        with self._journal.atomic():
            self._record_order(
                "close", pos.side.opposite(), pos.volume, None, None, pos.position_id, result
            )
            closed = (
                self._journal.close_trade(
                    TradeClose(
                        client_order_id=pos.client_order_id,
                        close_time=result.time or bar.time,
                        close_price=float(result.price or 0.0),
                        close_reason=reason,
                        profit=result.profit,
                        commission=result.commission,
                        swap=result.swap,
                        bars_held=self.bars_held(pos, bar),
                    )
                )
                if result.ok
                else None
            )
        if result.ok and closed is not None:
            self.status.exits += 1
            await closed
            log.info(
                "position_closed",
                symbol=pos.symbol,
                position_id=pos.position_id,
                reason=reason,
                price=result.price,
                profit=round(result.profit + result.commission, 2),
            )
        else:
            log.warning(
                "close_rejected",
                symbol=pos.symbol,
                position_id=pos.position_id,
                retcode=result.retcode,
                retcode_name=retcode_name(result.retcode),
            )
        return result

    async def record_closed_deals(
        self, deals: Iterable[Deal], open_positions: Mapping[int, Position]
    ) -> None:
        """Journal positions the broker closed by itself (SL/TP, external)."""
        for deal in deals:
            pos = open_positions.get(deal.position_id)
            coid = deal.client_order_id or (pos.client_order_id if pos else "")
            if not coid:
                log.error("closed_deal_unknown_position", position_id=deal.position_id)
                self._journal.record_event(
                    "error",
                    "unknown_position_closed",
                    f"the broker closed position {deal.position_id}, unknown to the journal",
                    {"deal_id": deal.deal_id, "symbol": deal.symbol},
                )
                continue
            self.status.exits += 1
            await self._journal.close_trade(
                TradeClose(
                    client_order_id=coid,
                    close_time=deal.time,
                    close_price=deal.price,
                    close_reason=deal.reason.value,
                    profit=deal.profit,
                    commission=deal.commission,
                    swap=deal.swap,
                    bars_held=(
                        int((deal.time - pos.open_time).total_seconds() // self._timeframe_s)
                        if pos is not None
                        else None
                    ),
                )
            )
            log.info(
                "position_closed",
                symbol=deal.symbol,
                position_id=deal.position_id,
                reason=deal.reason.value,
                price=deal.price,
                profit=round(deal.profit + deal.commission + deal.swap, 2),
            )

    # -- entries ----------------------------------------------------------------------

    def _signal(self, proba: np.ndarray) -> Side | None:
        p_down, _p_flat, p_up = (float(x) for x in proba)
        min_conf = self._s.strategy.min_confidence
        if p_up >= min_conf and p_up > p_down:
            return Side.BUY
        if p_down >= min_conf and p_down > p_up:
            return Side.SELL
        return None

    async def _maybe_enter(
        self,
        bar: Bar,
        row: np.ndarray,
        result: EnsembleResult,
        positions: list[Position],
        *,
        only_baseline: bool,
        canary: np.ndarray | None = None,
    ) -> None:
        if self.entries_halted:
            self._block(self.entries_halted, code="halted", bar=bar, warn=True)
            return
        if result.proba is None:
            self._block("no predictor answered", code="no_predictor", bar=bar, warn=True)
            return
        if only_baseline and not self._s.trade_without_models:
            reason = "no validated model yet and strategy.trade_without_models is false"
            self._block(reason, code="no_model", bar=bar, warn=True)
            return
        side = self._signal(result.proba)
        fraction = 1.0
        if canary is not None:
            # Canary: autotrain.canary_fraction of the size follows the candidate set,
            # the rest production; an entry only the candidate wants is that share.
            f = self._canary_fraction
            canary_side = self._signal(canary)
            side = side or canary_side
            fraction = (1 - f) * (self._signal(result.proba) is side) + f * (canary_side is side)
        if side is None or fraction <= 0:
            return
        spec = self._specs[bar.symbol]
        account = await self._broker.account()
        spread_points = bar.spread or self._s.symbols[bar.symbol].default_spread_points
        decision = self._risk.check_entry(
            symbol=bar.symbol,
            bar_time=bar.time,
            spread_points=spread_points,
            open_positions_symbol=sum(1 for p in positions if p.symbol == bar.symbol),
            open_positions_total=len(positions),
            equity=account.equity,
        )
        if not decision.allowed:
            sticky = decision.code in ("kill_switch", "daily_loss")
            self._block(decision.reason, code=decision.code, bar=bar, warn=sticky)
            return
        self._block(None, code=None, bar=bar, warn=False)
        entry = bar.close + (spread_points * spec.point if side is Side.BUY else 0.0)
        stop = self._risk.stop_distance(float(row[self._atr_idx]), spec)
        size = self._risk.size(account.equity, spec, entry, stop, fraction=fraction)
        if size.volume <= 0:
            self._block(size.reason or "position size is zero", code="size", bar=bar, warn=True)
            return
        sl, tp = self._risk.sl_tp(side, entry, stop, spec)
        coid = client_order_id(self._mode, bar.symbol, "open", bar.time)
        if await self._already_sent(coid, positions):
            # The same decision replayed after a crash: it was filled before; never resend.
            log.warning("entry_already_sent", symbol=bar.symbol, client_order_id=coid)
            return
        request = OrderRequest(coid, bar.symbol, side, size.volume, sl, tp, None, "entry")
        result_order = await self._broker.market_order(request)
        self._crash.hit("order")
        if result_order.ok:
            confidence = float(result.proba[2] if side is Side.BUY else result.proba[0])
            model_set = ",".join(f"{o.kind}:{o.version}" for o in result.outputs)
            if fraction < 1.0:
                model_set += f";canary {fraction:.2f}"
            with self._journal.atomic():
                self._record_order("open", side, size.volume, sl, tp, None, result_order)
                trade = self._journal.open_trade(
                    TradeOpen(
                        client_order_id=coid,
                        symbol=bar.symbol,
                        side=side.value,
                        volume=result_order.volume or size.volume,
                        open_time=result_order.time or bar.time,
                        open_price=float(result_order.price or entry),
                        sl=sl,
                        tp=tp,
                        broker_position_id=result_order.position_id,
                        commission=result_order.commission,
                        confidence=confidence,
                        model_set=model_set,
                        mode=self._mode,
                    )
                )
        else:
            self._record_order("open", side, size.volume, sl, tp, None, result_order)
        if not result_order.ok:
            self.status.last_skip = f"order rejected: {retcode_name(result_order.retcode)}"
            self._journal.record_event(
                "warning",
                "order_rejected",
                f"{bar.symbol} {side.value} {size.volume}: {retcode_name(result_order.retcode)}",
                {"retcode": result_order.retcode, "client_order_id": coid},
            )
            log.warning(
                "order_rejected",
                symbol=bar.symbol,
                side=side.value,
                volume=size.volume,
                retcode=result_order.retcode,
                retcode_name=retcode_name(result_order.retcode),
            )
            return
        await trade
        self._crash.hit("trade")
        self.status.entries += 1
        log.info(
            "position_opened",
            symbol=bar.symbol,
            side=side.value,
            volume=result_order.volume,
            price=result_order.price,
            sl=sl,
            tp=tp,
            confidence=round(confidence, 3),
            models=model_set,
        )

    async def _already_sent(self, coid: str, positions: list[Position]) -> bool:
        if any(p.client_order_id == coid for p in positions):
            return True

        def lookup(conn: sqlite3.Connection) -> bool:
            sql = "SELECT 1 FROM orders WHERE client_order_id = ? AND retcode IN (?, ?) LIMIT 1"
            return conn.execute(sql, (coid, DONE, DONE_PARTIAL)).fetchone() is not None

        return await self._journal.run(lookup)

    def _block(self, reason: str | None, *, code: str | None, bar: Bar, warn: bool) -> None:
        """Entries are blocked (or free again): journal each change, not each bar."""
        self.status.flat_reason = reason
        key = (code, reason) if warn else (code, None)
        if key == self._last_block:
            return
        self._last_block = key
        state = {"blocked": reason, "code": code, "since": bar.time.isoformat()}
        self._journal.set_state(ENTRIES_STATE_KEY, state if reason else {"blocked": None})
        if warn and reason:
            log.warning("entries_blocked", symbol=bar.symbol, code=code, reason=reason)
            self._journal.record_event(
                "warning", "entries_blocked", f"{bar.symbol}: {reason}", {"code": code}
            )
            if code in ALERT_BLOCK_CODES and self.on_alert is not None:
                kind = "daily_loss_stop" if code == "daily_loss" else "trading_halted"
                self.on_alert(kind, f"{bar.symbol}: {reason}", {"code": code}, bar.symbol)
        elif self._last_warned and not reason:
            log.info("entries_resumed", symbol=bar.symbol)
            self._journal.record_event("info", "entries_resumed", f"{bar.symbol}: entries allowed")
        self._last_warned = warn and bool(reason)

    # -- journal helpers --------------------------------------------------------------

    def _record_order(
        self,
        action: str,
        side: Side,
        volume: float,
        sl: float | None,
        tp: float | None,
        position_id: int | None,
        result: OrderResult,
    ) -> None:
        req = result.request
        if self.on_order is not None:
            self.on_order(retcode_name(result.retcode))
        self._journal.record_order(
            time=self._clock.now(),
            client_order_id=result.client_order_id,
            symbol=req.symbol,
            action=action,
            side=side.value,
            volume=volume,
            price=None,
            sl=sl,
            tp=tp,
            position_id=position_id,
            retcode=result.retcode,
            retcode_name=retcode_name(result.retcode),
            result_price=result.price,
            result_volume=result.volume,
            comment=result.comment,
            request={
                "symbol": req.symbol,
                "side": req.side.value,
                "volume": req.volume,
                "sl": req.sl,
                "tp": req.tp,
                "position_id": req.position_id,
                "comment": req.comment,
            },
            result={
                "retcode": result.retcode,
                "position_id": result.position_id,
                "deal_id": result.deal_id,
                "price": result.price,
                "volume": result.volume,
                "commission": result.commission,
                "profit": result.profit,
            },
        )

    def _record_predictions(self, bar: Bar, result: EnsembleResult) -> None:
        if not result.outputs:
            return
        now = self._clock.now()
        rows = [
            PredictionRow(
                time=now,
                bar_time=bar.time,
                symbol=bar.symbol,
                model=o.kind,
                version=o.version,
                stage=o.stage,
                p_down=float(o.proba[0]),
                p_flat=float(o.proba[1]),
                p_up=float(o.proba[2]),
                latency_us=o.latency_us,
            )
            for o in result.outputs
        ]
        self._journal.record_predictions(rows)

    def _report_failures(self, bar: Bar, result: EnsembleResult) -> None:
        failed_now = {(bar.symbol, kind) for kind, _ in result.failures}
        for kind, error in result.failures:
            if (bar.symbol, kind) not in self._failing:
                log.error("model_dropped", symbol=bar.symbol, kind=kind, error=error)
                self._journal.record_event(
                    "error",
                    "model_dropped",
                    f"{bar.symbol} {kind}: predict failed, dropped from the ensemble ({error})",
                    {"symbol": bar.symbol, "kind": kind, "bar_time": bar.time.isoformat()},
                )
        answered = {(bar.symbol, o.kind) for o in result.outputs}
        for key in sorted((self._failing & answered) - failed_now):
            log.info("model_recovered", symbol=key[0], kind=key[1])
            self._journal.record_event(
                "info", "model_recovered", f"{key[0]} {key[1]}: predicting again", None
            )
        self._failing = (self._failing - answered) | failed_now


def _only_baseline(predictors: Mapping[str, object]) -> bool:
    return all(kind == "baseline" for kind in predictors)
