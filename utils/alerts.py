"""Operator alerts: always journaled and logged, optionally posted to a webhook.

``Alerter.alert`` writes an ``error`` event to the journal and the log at once,
and, when ``SCALPER__ALERTS__WEBHOOK_URL`` is set, queues a POST for one
background thread (Discord, Telegram, Slack or any JSON receiver, told apart by
the URL). Webhook posts are rate-limited per (kind, symbol) and the number held
back is reported in the next post; a failing webhook is logged at warning and
never reaches the caller. The URL carries its secret (bot token, webhook key) and
never appears in a log line, an exception or the journal: only its host does.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog

from config.settings import AlertsSettings
from utils.clock import Clock

log = structlog.get_logger(__name__)

WebhookStyle = Literal["discord", "telegram", "generic"]

DISCORD_HOSTS = frozenset(
    {"discord.com", "discordapp.com", "ptb.discord.com", "canary.discord.com"}
)
TELEGRAM_HOST = "api.telegram.org"
# Longest text each service takes in one message (characters).
TEXT_LIMITS: dict[WebhookStyle, int] = {"discord": 2000, "telegram": 4096, "generic": 30_000}
QUEUE_SIZE = 100


class RecordEvent(Protocol):
    """``Journal.record_event``'s shape: (level, kind, message, details)."""

    def __call__(
        self, level: str, kind: str, message: str, details: Mapping[str, object] | None = None, /
    ) -> object: ...


# -- webhook payloads -------------------------------------------------------------------


def webhook_style(url: str) -> WebhookStyle:
    """Which service a webhook URL points at, from its host and path."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if host in DISCORD_HOSTS and parts.path.startswith("/api/webhooks/"):
        return "discord"
    if (
        host == TELEGRAM_HOST
        and parts.path.startswith("/bot")
        and parts.path.endswith("/sendMessage")
    ):
        return "telegram"
    return "generic"


def check_webhook_url(url: str, style: WebhookStyle | None = None) -> str | None:
    """What is wrong with a webhook URL (the message never quotes it), or None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return (
            "alerts.webhook_url must be an http(s) URL with a host (SCALPER__ALERTS__WEBHOOK_URL)"
        )
    if (style or webhook_style(url)) == "telegram":
        query = urllib.parse.parse_qs(parts.query)
        if not query.get("chat_id", [""])[0]:
            return (
                "alerts.webhook_url: a Telegram sendMessage URL needs the chat as a query "
                "parameter, e.g. https://api.telegram.org/bot<token>/sendMessage?chat_id=<id>"
            )
    return None


def build_webhook_request(
    url: str,
    text: str,
    *,
    kind: str,
    symbol: str | None = None,
    details: Mapping[str, Any] | None = None,
    style: WebhookStyle | None = None,
) -> tuple[str, dict[str, Any]]:
    """The URL to POST to and the JSON body, in the shape the service expects.

    Discord takes ``{"content": text}``; Telegram ``{"chat_id", "text"}`` posted to
    the URL without its query (the chat id comes from ``?chat_id=``); Slack
    incoming webhooks read ``text`` and ignore the rest, which generic receivers
    get as structured fields.
    """
    style = style or webhook_style(url)
    limit = TEXT_LIMITS[style]
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    if style == "discord":
        return url, {"content": text}
    if style == "telegram":
        parts = urllib.parse.urlsplit(url)
        chat_id = urllib.parse.parse_qs(parts.query).get("chat_id", [""])[0]
        bare = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        return bare, {"chat_id": chat_id, "text": text}
    return url, {
        "text": text,
        "kind": kind,
        "symbol": symbol,
        "details": dict(details or {}),
    }


def _secret_fragments(url: str) -> list[str]:
    """Every part of the URL that may be (or contain) its secret, longest first."""
    parts = urllib.parse.urlsplit(url)
    pieces = {url, parts.path, parts.query, parts.netloc}
    pieces.update(p for p in parts.path.split("/") if len(p) >= 6)
    pieces.update(v for vs in urllib.parse.parse_qs(parts.query).values() for v in vs)
    if parts.password:
        pieces.add(parts.password)
    return sorted((p for p in pieces if p and p != parts.hostname), key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


# -- the alerter ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Post:
    url: str
    body: bytes
    kind: str


class Alerter:
    """Journal + log every alert; post to the webhook at most once per interval per key.

    ``record_event`` is ``Journal.record_event`` (or anything of that shape);
    ``clock`` decides the rate limit (``clock.monotonic``); ``style`` forces a
    payload style (tests point a "telegram" URL at a local server). ``on_alert``
    is called with the kind of every alert (e.g. ``ServiceMetrics.alert``).
    """

    def __init__(
        self,
        settings: AlertsSettings,
        *,
        record_event: RecordEvent,
        clock: Clock,
        on_alert: Callable[[str], None] | None = None,
        queue_size: int = QUEUE_SIZE,
        style: WebhookStyle | None = None,
        source: str | None = None,
    ) -> None:
        self._record_event = record_event
        self._clock = clock
        self._on_alert = on_alert
        self._min_interval_s = settings.min_interval_s
        self._timeout_s = settings.timeout_s
        self._source = source if source is not None else socket.gethostname()
        url = settings.webhook_url.get_secret_value() if settings.webhook_url else ""
        self._secrets = _secret_fragments(url) if url else []
        problem = check_webhook_url(url, style) if url else None
        if problem:
            log.warning("alerts_webhook_disabled", reason=problem)
            url = ""
        self._url = url
        self._style: WebhookStyle | None = (style or webhook_style(url)) if url else None
        self._host = urllib.parse.urlsplit(url).hostname if url else None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[_Post] = deque()
        self._queue_size = max(1, queue_size)
        self._last_post: dict[tuple[str, str | None], float] = {}
        self._held_back: dict[tuple[str, str | None], int] = {}
        self._thread: threading.Thread | None = None
        self._closing = False
        self._busy = False
        self.dropped = 0
        self.sent = 0
        self.failed = 0

    def __repr__(self) -> str:
        return f"Alerter(webhook={self._style or 'none'}, host={self._host!r})"

    @property
    def webhook_enabled(self) -> bool:
        return bool(self._url)

    # -- the caller's side --

    def alert(
        self,
        kind: str,
        message: str,
        details: Mapping[str, Any] | None = None,
        symbol: str | None = None,
    ) -> None:
        """Record, log and (rate-limited) post one alert; never raises."""
        event_details: dict[str, Any] = dict(details or {})
        if symbol is not None:
            event_details.setdefault("symbol", symbol)
        try:
            self._record_event("error", kind, message, event_details)
        except Exception as exc:
            # The journal is gone (disk full, closed at shutdown): the log still has it.
            log.exception("alert_not_journaled", kind=kind, error=f"{type(exc).__name__}: {exc}")
        log.error("alert", kind=kind, symbol=symbol, message=message, details=event_details)
        if self._on_alert is not None:
            try:
                self._on_alert(kind)
            except Exception:
                log.exception("alert_callback_failed", kind=kind)
        if self._url:
            self._maybe_post(kind, message, details, symbol)

    def _maybe_post(
        self, kind: str, message: str, details: Mapping[str, Any] | None, symbol: str | None
    ) -> None:
        key = (kind, symbol)
        now = self._clock.monotonic()
        with self._lock:
            if self._closing:
                log.debug("alert_webhook_closed", kind=kind)
                return
            last = self._last_post.get(key)
            if last is not None and now - last < self._min_interval_s:
                self._held_back[key] = self._held_back.get(key, 0) + 1
                return
            held_back = self._held_back.pop(key, 0)
            self._last_post[key] = now
        text = f"[scalper@{self._source}] {kind}{f' {symbol}' if symbol else ''}: {message}"
        if held_back:
            text += (
                f" (+{held_back} similar alert{'s' if held_back != 1 else ''} held back "
                f"in the last {self._min_interval_s:.0f} s)"
            )
        try:
            post_url, payload = build_webhook_request(
                self._url, text, kind=kind, symbol=symbol, details=details, style=self._style
            )
            body = json.dumps(payload, default=str).encode("utf-8")
        except (TypeError, ValueError) as exc:
            log.warning("alert_webhook_payload_failed", kind=kind, error=type(exc).__name__)
            return
        self._enqueue(_Post(post_url, body, kind))

    def _enqueue(self, post: _Post) -> None:
        with self._wake:
            if len(self._queue) >= self._queue_size:
                # The newest alert says most about now; the oldest goes.
                self._queue.popleft()
                self.dropped += 1
                log.warning("alert_webhook_dropped", dropped=self.dropped)
            self._queue.append(post)
            self._wake.notify()
            if self._thread is None and not self._closing:
                self._start_locked()

    # -- the sender thread --

    def start(self) -> None:
        """Start the sender thread now (``alert`` also starts it on first use)."""
        with self._lock:
            if self._url and self._thread is None and not self._closing:
                self._start_locked()

    def _start_locked(self) -> None:
        self._thread = threading.Thread(target=self._run, name="alerts-webhook", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                post = self._queue.popleft()
                self._busy = True
            try:
                self._send(post)
            except Exception as exc:  # noqa: BLE001 (logged below, scrubbed, no traceback)
                # A bug here must not kill the thread: later alerts still go out. No
                # traceback: its frames could quote the URL.
                self.failed += 1
                log.error(
                    "alert_webhook_crashed",
                    kind=post.kind,
                    webhook_host=self._host,
                    error=f"{type(exc).__name__}: {scrub(str(exc), self._secrets)}",
                )
            finally:
                with self._wake:
                    self._busy = False
                    self._wake.notify_all()

    def _send(self, post: _Post) -> None:
        request = urllib.request.Request(  # noqa: S310 (scheme checked: http or https)
            post.url,
            data=post.body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "scalper-alerts"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:  # noqa: S310
                response.read(1024)
        except urllib.error.HTTPError as exc:
            exc.close()
            self.failed += 1
            log.warning(
                "alert_webhook_failed",
                kind=post.kind,
                webhook_host=self._host,
                status=exc.code,
                error=scrub(str(exc.reason), self._secrets),
            )
        except (OSError, ValueError, http.client.HTTPException) as exc:
            # URLError (DNS, refused), timeouts, a malformed URL, a reset connection:
            # none of it may reach the caller.
            self.failed += 1
            log.warning(
                "alert_webhook_failed",
                kind=post.kind,
                webhook_host=self._host,
                error=f"{type(exc).__name__}: {scrub(str(exc), self._secrets)}",
            )
        else:
            self.sent += 1

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued post was attempted; False on timeout."""
        with self._wake:
            return self._wake.wait_for(
                lambda: not self._queue and not self._busy, timeout=timeout_s
            )

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (within ``timeout_s``), then stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                with self._lock:
                    left = len(self._queue)
                log.warning("alert_webhook_not_drained", queued=left, timeout_s=timeout_s)


# -- checks that raise alerts -----------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path


def disk_space_alert(paths: Iterable[Path | str], min_free_mb: float) -> str | None:
    """A message naming every path whose disk has less than ``min_free_mb`` free, or None.

    A path that does not exist yet is checked on its nearest existing parent;
    ``min_free_mb`` 0 disables the check.
    """
    if min_free_mb <= 0:
        return None
    low: list[str] = []
    seen: set[Path] = set()
    for raw in paths:
        target = _existing_ancestor(Path(raw))
        if target in seen:
            continue
        seen.add(target)
        try:
            free_mb = shutil.disk_usage(target).free / 1_048_576
        except OSError as exc:
            log.debug("disk_usage_failed", path=str(target), error=str(exc))
            continue
        if free_mb < min_free_mb:
            low.append(f"{raw} ({free_mb:.0f} MB free)")
    if not low:
        return None
    return (
        f"low disk space: {', '.join(low)}; below alerts.disk_free_min_mb = {min_free_mb:g}; "
        "free space (old backtests, prediction rows) or raise the disk"
    )


class OutageTimer:
    """Says once per outage when something has been down longer than ``threshold_s``.

    ``update(up)`` is called whenever the state is known (e.g. each loop tick
    with the broker's connection flag) and returns the outage's length in
    seconds the first time it crosses the threshold, else None.
    """

    def __init__(self, threshold_s: float, clock: Clock) -> None:
        self._threshold_s = threshold_s
        self._clock = clock
        self._down_since: float | None = None
        self._reported = False

    def update(self, up: bool) -> float | None:
        now = self._clock.monotonic()
        if up:
            self._down_since = None
            self._reported = False
            return None
        if self._down_since is None:
            self._down_since = now
        down_s = now - self._down_since
        if not self._reported and down_s >= self._threshold_s:
            self._reported = True
            return down_s
        return None

    @property
    def down_for_s(self) -> float | None:
        return None if self._down_since is None else self._clock.monotonic() - self._down_since
