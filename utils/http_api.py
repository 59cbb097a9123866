"""The optional read-only HTTP endpoint: ``GET /health`` and ``GET /metrics``.

The event loop owns all state. It publishes a ``HealthState`` (an immutable
snapshot) by replacing one reference, and updates ``ServiceMetrics`` (thread-safe
prometheus_client metrics in a private registry) with cheap calls; the HTTP
threads only read the latest reference and render the registry, so a request
never touches the loop and a slow client never blocks it.

Off unless ``http.enabled``; binds ``http.host:http.port`` (127.0.0.1:8787); with
``SCALPER__HTTP__TOKEN`` set every request needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import json
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType
from typing import Any

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from config.settings import HttpSettings
from utils.clock import iso_utc

log = structlog.get_logger(__name__)

BASELINE_KIND = "baseline"

# Decision latency: the target is well under a millisecond; 50 ms is already a failure.
DECISION_BUCKETS_S = (
    50e-6,
    100e-6,
    200e-6,
    500e-6,
    1e-3,
    2e-3,
    5e-3,
    10e-3,
    20e-3,
    50e-3,
    math.inf,
)
# Event-loop lag: a healthy loop wakes within a few ms; seconds mean a stall.
LOOP_LAG_BUCKETS_S = (
    1e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    math.inf,
)


# -- metrics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRow:
    """One served model for ``ServiceMetrics.set_models``."""

    symbol: str
    kind: str
    version: str
    stage: str
    age_s: float | None = None


class ServiceMetrics:
    """Every metric the daemon exports, in a private registry (no global state).

    Each method is a few dictionary look-ups and an atomic add: safe to call on
    the event loop for every bar, and from any thread.
    """

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        if process_metrics:
            # process_* (memory, CPU, open fds; Linux only, empty elsewhere) and python_info.
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
        self.decision_latency = Histogram(
            "scalper_decision_latency_seconds",
            "Time from a closed bar to its order decision.",
            buckets=DECISION_BUCKETS_S,
            registry=reg,
        )
        self.bars = Counter(
            "scalper_bars_processed", "Closed bars processed.", ["symbol"], registry=reg
        )
        self.orders = Counter(
            "scalper_orders",
            "Orders sent, by result (MT5 retcode name such as DONE or REJECT).",
            ["result"],
            registry=reg,
        )
        self.open_positions = Gauge("scalper_open_positions", "Open positions.", registry=reg)
        self.balance = Gauge(
            "scalper_account_balance", "Account balance (account currency).", registry=reg
        )
        self.equity = Gauge(
            "scalper_account_equity", "Account equity (account currency).", registry=reg
        )
        self.model_info = Gauge(
            "scalper_model_info",
            "Models serving (value 1), by symbol, kind, version and stage.",
            ["symbol", "kind", "version", "stage"],
            registry=reg,
        )
        self.model_age = Gauge(
            "scalper_model_age_seconds",
            "Age of each serving model since it was trained.",
            ["symbol", "kind"],
            registry=reg,
        )
        self.training_runs = Counter(
            "scalper_training_runs",
            "Finished training runs, by outcome.",
            ["outcome"],
            registry=reg,
        )
        self.drift_alarms = Counter(
            "scalper_drift_alarms", "Drift checks that raised an alarm.", ["symbol"], registry=reg
        )
        self.alerts = Counter("scalper_alerts", "Alerts raised, by kind.", ["kind"], registry=reg)
        self.loop_lag_hist = Histogram(
            "scalper_event_loop_lag_seconds",
            "How late the event loop woke up for the loop monitor.",
            buckets=LOOP_LAG_BUCKETS_S,
            registry=reg,
        )
        self.loop_lag_last = Gauge(
            "scalper_event_loop_lag_last_seconds",
            "The loop monitor's latest lag measurement.",
            registry=reg,
        )
        self.ready = Gauge(
            "scalper_ready", "1 when the daemon is healthy (the /health rule).", registry=reg
        )
        self.broker_connected = Gauge(
            "scalper_broker_connected", "1 while the broker is connected.", registry=reg
        )
        self.feed_last_bar_age = Gauge(
            "scalper_feed_last_bar_age_seconds",
            "Seconds since the feed last delivered a bar (or since start-up).",
            registry=reg,
        )
        self._model_labels: set[tuple[str, str, str, str]] = set()
        self._age_labels: set[tuple[str, str]] = set()
        self._models_lock = threading.Lock()

    def observe_decision(self, seconds: float) -> None:
        self.decision_latency.observe(seconds)

    def bar(self, symbol: str) -> None:
        self.bars.labels(symbol).inc()

    def order(self, result: str) -> None:
        """``result``: ``execution.retcodes.name(retcode)``, or e.g. ``"NO_REPLY"``."""
        self.orders.labels(result).inc()

    def set_account(self, balance: float, equity: float, open_positions: int) -> None:
        self.balance.set(balance)
        self.equity.set(equity)
        self.open_positions.set(open_positions)

    def set_models(self, rows: Iterable[ModelRow]) -> None:
        """Replace the serving-model series with ``rows``.

        Series that disappear are removed one by one rather than cleared first, so
        a scrape in between never sees an empty set.
        """
        rows = list(rows)
        info = {(r.symbol, r.kind, r.version, r.stage) for r in rows}
        ages = {(r.symbol, r.kind): r.age_s for r in rows if r.age_s is not None}
        with self._models_lock:
            for labels in info:
                self.model_info.labels(*labels).set(1)
            for key, age_s in ages.items():
                self.model_age.labels(*key).set(age_s)
            for labels in self._model_labels - info:
                self.model_info.remove(*labels)
            for key in self._age_labels - ages.keys():
                self.model_age.remove(*key)
            self._model_labels = info
            self._age_labels = set(ages)

    def training_run(self, outcome: str) -> None:
        """``outcome``: e.g. ``"promoted"``, ``"shadow"``, ``"rejected"``, ``"failed"``."""
        self.training_runs.labels(outcome).inc()

    def drift_alarm(self, symbol: str) -> None:
        self.drift_alarms.labels(symbol).inc()

    def alert(self, kind: str) -> None:
        self.alerts.labels(kind).inc()

    def loop_lag(self, seconds: float) -> None:
        self.loop_lag_hist.observe(seconds)
        self.loop_lag_last.set(seconds)

    def set_health(self, state: HealthState) -> None:
        self.ready.set(1 if state.ok else 0)
        self.broker_connected.set(1 if state.broker_connected else 0)
        if state.feed_last_bar_age_s is not None:
            self.feed_last_bar_age.set(state.feed_last_bar_age_s)

    def render(self) -> bytes:
        """The Prometheus text format (``CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.registry)


# -- health -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthState:
    """One immutable health snapshot; the loop replaces it, readers never lock.

    ``serving`` maps symbol -> kind -> version of the serving predictor set;
    ``serving_set`` says which set that is: ``models``, ``baseline``, ``mixed``
    (some symbols on each) or ``none``.
    """

    ok: bool
    reasons: tuple[str, ...]
    serving_set: str
    serving: Mapping[str, Mapping[str, str]]
    journal_open: bool
    broker_connected: bool
    feed_connected: bool
    feed_last_bar_age_s: float | None
    models_loaded: int
    checked_at: datetime | None = None
    details: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "unhealthy",
            "ok": self.ok,
            "reasons": list(self.reasons),
            "serving_set": self.serving_set,
            "serving": {s: dict(kinds) for s, kinds in self.serving.items()},
            "journal_open": self.journal_open,
            "broker_connected": self.broker_connected,
            "feed_connected": self.feed_connected,
            "feed_last_bar_age_s": (
                None if self.feed_last_bar_age_s is None else round(self.feed_last_bar_age_s, 3)
            ),
            "models_loaded": self.models_loaded,
            "checked_at": None if self.checked_at is None else iso_utc(self.checked_at),
            "details": dict(self.details),
        }


STARTING = HealthState(
    ok=False,
    reasons=("starting",),
    serving_set="none",
    serving=MappingProxyType({}),
    journal_open=False,
    broker_connected=False,
    feed_connected=False,
    feed_last_bar_age_s=None,
    models_loaded=0,
)


def evaluate_health(
    *,
    journal_open: bool,
    broker_connected: bool,
    feed_connected: bool,
    feed_last_bar_age_s: float | None,
    feed_stale_after_s: float | None,
    serving: Mapping[str, Mapping[str, str]],
    symbols: Iterable[str],
    now: datetime | None = None,
    details: Mapping[str, Any] | None = None,
) -> HealthState:
    """The readiness rule of CONVENTIONS.md, shared by ``READY=1`` and ``/health``.

    Healthy means: the journal is open, the broker is connected, the feed is
    connected and fresh, and every traded symbol has a predictor set loaded (the
    baseline counts). ``serving`` is ``PredictorMap.versions()``;
    ``feed_last_bar_age_s`` is the time since the feed last delivered a bar, or
    since start-up before the first one; ``feed_stale_after_s`` None skips the
    freshness test (e.g. while the market is closed). Pure: no I/O, no clock.
    """
    reasons: list[str] = []
    if not journal_open:
        reasons.append("journal is not open")
    if not broker_connected:
        reasons.append("broker is not connected")
    if not feed_connected:
        reasons.append("feed is not connected")
    elif (
        feed_stale_after_s is not None
        and feed_last_bar_age_s is not None
        and feed_last_bar_age_s > feed_stale_after_s
    ):
        reasons.append(
            f"feed is stale: last bar {feed_last_bar_age_s:.0f} s ago "
            f"(limit {feed_stale_after_s:.0f} s)"
        )
    frozen = MappingProxyType(
        {symbol: MappingProxyType(dict(kinds)) for symbol, kinds in serving.items() if kinds}
    )
    missing = [s for s in symbols if s not in frozen]
    if missing:
        reasons.append(f"no predictor set loaded for {', '.join(missing)}")
    sets = {
        "models" if any(kind != BASELINE_KIND for kind in kinds) else "baseline"
        for kinds in frozen.values()
    }
    serving_set = "none" if not sets else sets.pop() if len(sets) == 1 else "mixed"
    models_loaded = sum(1 for kinds in frozen.values() for kind in kinds if kind != BASELINE_KIND)
    return HealthState(
        ok=not reasons,
        reasons=tuple(reasons),
        serving_set=serving_set,
        serving=frozen,
        journal_open=journal_open,
        broker_connected=broker_connected,
        feed_connected=feed_connected,
        feed_last_bar_age_s=feed_last_bar_age_s,
        models_loaded=models_loaded,
        checked_at=now,
        details=MappingProxyType(dict(details or {})),
    )


# -- server -----------------------------------------------------------------------------


class HttpServerError(RuntimeError):
    """The endpoint could not start; the message names the setting to change."""


@dataclass(frozen=True)
class _Published:
    state: HealthState
    at_monotonic: float


class _Server(ThreadingHTTPServer):
    # Request threads are joined on close; the handler's socket timeout bounds them.
    daemon_threads = False
    block_on_close = True
    api: HttpServer

    def server_bind(self) -> None:
        if sys.platform == "win32":
            # SO_REUSEADDR on Windows lets another process take over the port.
            self.allow_reuse_address = False
            exclusive = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)
            if exclusive is not None:
                self.socket.setsockopt(socket.SOL_SOCKET, exclusive, 1)
        # TCPServer's bind, not HTTPServer's: that one resolves getfqdn(host), a
        # reverse DNS look-up that can take seconds on a VPS without DNS.
        super(ThreadingHTTPServer, self).server_bind()
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr here (a client that hung up mid-reply).
        error = sys.exc_info()[1]
        log.debug("http_connection_error", client=str(client_address[0]), error=repr(error))


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "scalper"
    sys_version = ""
    # HTTP/1.0: one request per connection, so no idle keep-alive thread delays stop().
    protocol_version = "HTTP/1.0"
    # Seconds a client may take to send its request: bounds every request thread.
    timeout = 5.0

    # -- routing --

    def do_GET(self) -> None:
        self._route(with_body=True)

    def do_HEAD(self) -> None:
        self._route(with_body=False)

    def _not_allowed(self) -> None:
        self._send_json(
            HTTPStatus.METHOD_NOT_ALLOWED,
            {"error": f"method {self.command} not allowed; this endpoint is read-only"},
            extra_headers={"Allow": "GET, HEAD"},
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _route(self, *, with_body: bool) -> None:
        api = self.server.api
        if not api.authorized(self.headers.get("Authorization")):
            self._send_json(
                HTTPStatus.UNAUTHORIZED,
                {"error": "missing or wrong bearer token"},
                extra_headers={"WWW-Authenticate": 'Bearer realm="scalper"'},
                with_body=with_body,
            )
            return
        path = self.path.split("?", 1)[0]
        if path == "/health":
            state, reasons = api.current_health()
            body = state.to_json()
            body["reasons"] = list(reasons)
            body["ok"] = not reasons
            body["status"] = "ok" if not reasons else "unhealthy"
            status = HTTPStatus.OK if not reasons else HTTPStatus.SERVICE_UNAVAILABLE
            self._send_json(status, body, with_body=with_body)
        elif path == "/metrics":
            self._send(HTTPStatus.OK, api.metrics.render(), CONTENT_TYPE_LATEST, with_body)
        else:
            self._send_json(
                HTTPStatus.NOT_FOUND,
                {"error": "not found; try /health or /metrics"},
                with_body=with_body,
            )

    # -- responses --

    def _send_json(
        self,
        status: HTTPStatus,
        body: Mapping[str, Any],
        *,
        extra_headers: Mapping[str, str] | None = None,
        with_body: bool = True,
    ) -> None:
        data = json.dumps(body, sort_keys=True).encode("utf-8")
        self._send(status, data, "application/json; charset=utf-8", with_body, extra_headers)

    def _send(
        self,
        status: HTTPStatus,
        data: bytes,
        content_type: str,
        with_body: bool,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    # -- logging: structlog at debug, never stderr, never headers --

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        status = code.value if isinstance(code, HTTPStatus) else code
        log.debug(
            "http_request",
            method=self.command,
            path=self.path.split("?", 1)[0][:200],
            status=status,
            client=self.client_address[0],
        )

    def log_error(self, format: str, *args: Any) -> None:
        log.debug("http_error", error=(format % args)[:200], client=self.client_address[0])

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http_message", message=(format % args)[:200])


class HttpServer:
    """``/health`` and ``/metrics`` on a background thread; ``start()``/``stop()``.

    ``publish(state)`` is the event loop's only call; a snapshot older than
    ``health_stale_after_s`` makes ``/health`` answer 503 by itself, so a stalled
    loop shows up even though it can no longer publish.
    """

    def __init__(
        self,
        *,
        metrics: ServiceMetrics,
        host: str = "127.0.0.1",
        port: int = 8787,
        token: str | None = None,
        health_stale_after_s: float | None = 15.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if token is not None and not token.strip():
            # An empty SCALPER__HTTP__TOKEN= line must not silently mean "no auth".
            raise HttpServerError(
                "SCALPER__HTTP__TOKEN is set but empty; set a long random token or remove it"
            )
        self.metrics = metrics
        self.host = host
        self._requested_port = port
        self._token = token.encode("utf-8") if token else None
        self._stale_after_s = health_stale_after_s
        self._monotonic = monotonic
        self._published = _Published(STARTING, monotonic())
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(
        cls,
        settings: HttpSettings,
        metrics: ServiceMetrics,
        *,
        port: int | None = None,
        **kwargs: Any,
    ) -> HttpServer:
        """``http.host``/``http.port`` and the token; ``port`` overrides (0: any free port)."""
        token = settings.token.get_secret_value() if settings.token is not None else None
        return cls(
            metrics=metrics,
            host=settings.host,
            port=settings.port if port is None else port,
            token=token,
            **kwargs,
        )

    def __repr__(self) -> str:
        # The token stays out of reprs, tracebacks and logs.
        token = "'***'" if self._token else "None"
        return f"HttpServer(host={self.host!r}, port={self.port}, token={token})"

    # -- state the handler reads --

    def publish(self, state: HealthState) -> None:
        """Replace the health snapshot (one reference assignment: atomic, lock-free)."""
        self._published = _Published(state, self._monotonic())
        self.metrics.set_health(state)

    @property
    def health(self) -> HealthState:
        return self._published.state

    def current_health(self) -> tuple[HealthState, tuple[str, ...]]:
        """The latest snapshot and its reasons, plus one if the loop stopped publishing."""
        published = self._published
        reasons = published.state.reasons
        age_s = self._monotonic() - published.at_monotonic
        if self._stale_after_s is not None and age_s > self._stale_after_s:
            reasons = (*reasons, f"health not refreshed for {age_s:.0f} s (event loop stalled?)")
        return published.state, reasons

    def authorized(self, header: str | None) -> bool:
        if self._token is None:
            return True
        if not header:
            return False
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode("utf-8"), self._token)

    # -- lifecycle --

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for); the setting before start."""
        server = self._server
        return server.server_port if server is not None else self._requested_port

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._server is not None:
            return
        server_cls = _Server6 if ":" in self.host else _Server
        try:
            server = server_cls((self.host, self._requested_port), _Handler)
        except OSError as exc:
            raise HttpServerError(
                f"http.host/http.port: cannot listen on {self.host}:{self._requested_port} "
                f"({exc.strerror or exc}); choose a free port or set http.enabled = false"
            ) from None
        server.api = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="http-api",
            daemon=True,
        )
        self._thread.start()
        log.info("http_listening", host=self.host, port=self.port, auth=self._token is not None)

    def stop(self, timeout_s: float = 5.0) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout_s)
        self._server = None
        self._thread = None
        log.info("http_stopped")
