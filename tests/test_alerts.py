"""Alerts: journal + log always, webhook posts rate-limited, failures contained, URL secret."""

from __future__ import annotations

import json
import queue
import shutil
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from config.settings import AlertsSettings
from utils.alerts import (
    Alerter,
    OutageTimer,
    build_webhook_request,
    check_webhook_url,
    disk_space_alert,
    webhook_style,
)
from utils.clock import FakeClock

SECRET = "Zk3q9VtY7secretPart"  # noqa: S105 (a fake secret the logs must not show)


@dataclass
class _Receiver:
    """A local webhook receiver: records every POST, answers ``status``."""

    server: ThreadingHTTPServer
    posts: queue.Queue[tuple[str, dict[str, Any]]] = field(default_factory=queue.Queue)
    status: int = 200
    received: threading.Event = field(default_factory=threading.Event)
    release: threading.Event | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def next_post(self) -> tuple[str, dict[str, Any]]:
        return self.posts.get(timeout=5)


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    state: dict[str, _Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            rec = state["r"]
            body = self.rfile.read(int(self.headers["Content-Length"]))
            rec.received.set()
            if rec.release is not None:
                rec.release.wait(5)
            rec.posts.put((self.path, json.loads(body)))
            self.send_response(rec.status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["r"] = _Receiver(server)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state["r"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class _Journal:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, dict[str, Any] | None]] = []

    def record_event(
        self, level: str, kind: str, message: str, details: Mapping[str, object] | None = None
    ) -> None:
        self.events.append((level, kind, message, None if details is None else dict(details)))


def _alerter(
    url: str | None,
    clock: FakeClock,
    journal: _Journal,
    *,
    min_interval_s: float = 300.0,
    **kwargs: Any,
) -> Alerter:
    settings = AlertsSettings(
        webhook_url=SecretStr(url) if url else None, min_interval_s=min_interval_s, timeout_s=2.0
    )
    return Alerter(
        settings, record_event=journal.record_event, clock=clock, source="vps1", **kwargs
    )


# -- payload shapes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "style"),
    [
        ("https://discord.com/api/webhooks/123/abcDEF", "discord"),
        ("https://discordapp.com/api/webhooks/123/abcDEF", "discord"),
        ("https://api.telegram.org/bot123:ABC/sendMessage?chat_id=-1001", "telegram"),
        ("https://hooks.slack.com/services/T0/B0/xyz", "generic"),
        ("https://discord.com/channels/1/2", "generic"),
        ("http://127.0.0.1:9000/hook", "generic"),
    ],
)
def test_webhook_style_is_told_by_host_and_path(url: str, style: str) -> None:
    assert webhook_style(url) == style


def test_payload_shapes_for_the_three_styles() -> None:
    details = {"down_s": 301}
    url, body = build_webhook_request(
        "https://discord.com/api/webhooks/1/t", "hello", kind="k", symbol="EURUSD", details=details
    )
    assert url == "https://discord.com/api/webhooks/1/t" and body == {"content": "hello"}
    url, body = build_webhook_request(
        "https://api.telegram.org/bot1:T/sendMessage?chat_id=-100", "hello", kind="k"
    )
    assert url == "https://api.telegram.org/bot1:T/sendMessage"
    assert body == {"chat_id": "-100", "text": "hello"}
    url, body = build_webhook_request(
        "https://hooks.slack.com/services/A/B/C",
        "hello",
        kind="k",
        symbol="EURUSD",
        details=details,
    )
    assert url == "https://hooks.slack.com/services/A/B/C"
    assert body == {"text": "hello", "kind": "k", "symbol": "EURUSD", "details": {"down_s": 301}}


def test_long_text_is_cut_to_the_service_limit() -> None:
    _, body = build_webhook_request("https://discord.com/api/webhooks/1/t", "x" * 5000, kind="k")
    assert len(body["content"]) == 2000 and body["content"].endswith("…")


def test_bad_urls_are_named_without_quoting_them() -> None:
    assert check_webhook_url("https://hooks.slack.com/services/A/B/C") is None
    problem = check_webhook_url(f"ftp://example.com/{SECRET}")
    assert problem is not None and "http(s)" in problem and SECRET not in problem
    problem = check_webhook_url(f"https://api.telegram.org/bot{SECRET}/sendMessage")
    assert problem is not None and "chat_id" in problem and SECRET not in problem


# -- real posts ---------------------------------------------------------------------------


def test_alert_is_journaled_logged_and_posted_generic(
    receiver: _Receiver, fake_clock: FakeClock
) -> None:
    journal = _Journal()
    alerter = _alerter(f"{receiver.base}/hooks/{SECRET}", fake_clock, journal)
    with capture_logs() as logs:
        alerter.alert("broker_down", "broker down for 301 s", {"down_s": 301}, symbol="EURUSD")
        path, body = receiver.next_post()
        alerter.close(5)
    assert journal.events == [
        ("error", "broker_down", "broker down for 301 s", {"down_s": 301, "symbol": "EURUSD"})
    ]
    assert path == f"/hooks/{SECRET}"
    assert body == {
        "text": "[scalper@vps1] broker_down EURUSD: broker down for 301 s",
        "kind": "broker_down",
        "symbol": "EURUSD",
        "details": {"down_s": 301},
    }
    assert [e["log_level"] for e in logs if e["event"] == "alert"] == ["error"]
    assert alerter.sent == 1 and alerter.failed == 0
    assert SECRET not in json.dumps(logs, default=str)


def test_telegram_posts_chat_id_and_text_without_the_query(
    receiver: _Receiver, fake_clock: FakeClock
) -> None:
    url = f"{receiver.base}/bot{SECRET}/sendMessage?chat_id=-1001234"
    alerter = _alerter(url, fake_clock, _Journal(), style="telegram")
    alerter.alert("training_failed", "rf failed", symbol="EURUSD")
    path, body = receiver.next_post()
    alerter.close(5)
    assert path == f"/bot{SECRET}/sendMessage"
    assert body == {
        "chat_id": "-1001234",
        "text": "[scalper@vps1] training_failed EURUSD: rf failed",
    }


def test_discord_posts_content(receiver: _Receiver, fake_clock: FakeClock) -> None:
    alerter = _alerter(
        f"{receiver.base}/api/webhooks/1/{SECRET}", fake_clock, _Journal(), style="discord"
    )
    alerter.alert("disk_low", "low disk space")
    path, body = receiver.next_post()
    alerter.close(5)
    assert path == f"/api/webhooks/1/{SECRET}"
    assert body == {"content": "[scalper@vps1] disk_low: low disk space"}


def test_webhook_is_rate_limited_per_kind_and_symbol_but_journal_gets_all(
    receiver: _Receiver, fake_clock: FakeClock
) -> None:
    journal = _Journal()
    alerter = _alerter(f"{receiver.base}/hook", fake_clock, journal, min_interval_s=300)
    alerter.alert("broker_down", "first", symbol="EURUSD")
    assert receiver.next_post()[1]["text"].endswith("first")
    fake_clock.advance(10)
    alerter.alert("broker_down", "second", symbol="EURUSD")
    fake_clock.advance(10)
    alerter.alert("broker_down", "third", symbol="EURUSD")
    # Another key is not held back by this one.
    alerter.alert("broker_down", "gold", symbol="XAUUSD")
    assert receiver.next_post()[1]["text"].endswith("gold")
    fake_clock.advance(300)
    alerter.alert("broker_down", "fourth", symbol="EURUSD")
    text = receiver.next_post()[1]["text"]
    assert alerter.flush(5)
    alerter.close(5)
    assert text.endswith("fourth (+2 similar alerts held back in the last 300 s)")
    assert receiver.posts.empty()
    assert [e[2] for e in journal.events] == ["first", "second", "third", "gold", "fourth"]


def test_a_failing_webhook_never_raises_and_hides_the_url(
    receiver: _Receiver, fake_clock: FakeClock
) -> None:
    receiver.status = 500
    journal = _Journal()
    alerter = _alerter(f"{receiver.base}/hooks/{SECRET}?key={SECRET}x", fake_clock, journal)
    with capture_logs() as logs:
        alerter.alert("halted", "trading halted")
        receiver.next_post()
        assert alerter.flush(5)
        alerter.close(5)
    assert journal.events[0][:2] == ("error", "halted")
    assert alerter.failed == 1
    failures = [e for e in logs if e["event"] == "alert_webhook_failed"]
    assert len(failures) == 1
    assert failures[0]["log_level"] == "warning" and failures[0]["status"] == 500
    assert failures[0]["webhook_host"] == "127.0.0.1"
    assert SECRET not in json.dumps(logs, default=str)
    assert SECRET not in repr(alerter)


def test_connection_refused_is_a_warning(fake_clock: FakeClock) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    journal = _Journal()
    alerter = _alerter(f"http://127.0.0.1:{port}/hooks/{SECRET}", fake_clock, journal)
    with capture_logs() as logs:
        alerter.alert("halted", "trading halted")
        assert alerter.flush(5)
        alerter.close(5)
    assert len(journal.events) == 1 and alerter.failed == 1
    failure = next(e for e in logs if e["event"] == "alert_webhook_failed")
    assert failure["log_level"] == "warning" and "URLError" in failure["error"]
    assert SECRET not in json.dumps(logs, default=str)


def test_a_full_queue_drops_the_oldest_and_counts(
    receiver: _Receiver, fake_clock: FakeClock
) -> None:
    receiver.release = threading.Event()
    alerter = _alerter(f"{receiver.base}/hook", fake_clock, _Journal(), queue_size=2)
    with capture_logs():
        alerter.alert("k0", "zero")
        assert receiver.received.wait(5)  # the sender is now stuck on k0
        for i in range(1, 5):
            alerter.alert(f"k{i}", str(i))
        receiver.release.set()
        texts = [receiver.next_post()[1]["text"] for _ in range(3)]
        alerter.close(5)
    assert alerter.dropped == 2
    assert [t.split(": ")[-1] for t in texts] == ["zero", "3", "4"]


def test_close_drains_what_is_queued(receiver: _Receiver, fake_clock: FakeClock) -> None:
    alerter = _alerter(f"{receiver.base}/hook", fake_clock, _Journal())
    for i in range(5):
        alerter.alert(f"k{i}", "x")
    alerter.close(5)
    assert receiver.posts.qsize() == 5 and alerter.sent == 5
    # After close the journal still gets alerts; nothing is posted.
    alerter.alert("late", "x")
    assert receiver.posts.qsize() == 5


def test_without_a_url_alerts_only_journal_and_log(fake_clock: FakeClock) -> None:
    journal = _Journal()
    kinds: list[str] = []
    alerter = _alerter(None, fake_clock, journal, on_alert=kinds.append)
    alerter.alert("halted", "x")
    alerter.close(1)
    assert not alerter.webhook_enabled
    assert len(journal.events) == 1 and kinds == ["halted"]
    assert not [t for t in threading.enumerate() if t.name == "alerts-webhook"]


def test_an_invalid_url_disables_the_webhook_with_a_warning(fake_clock: FakeClock) -> None:
    with capture_logs() as logs:
        alerter = _alerter(f"ftp://files.example.com/{SECRET}", fake_clock, _Journal())
        alerter.alert("halted", "x")
        alerter.close(1)
    assert not alerter.webhook_enabled
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["alerts_webhook_disabled"]
    assert SECRET not in json.dumps(logs, default=str)


def test_a_broken_journal_does_not_stop_the_alert(fake_clock: FakeClock) -> None:
    def record_event(*_args: object) -> None:
        raise RuntimeError("journal closed")

    settings = AlertsSettings()
    alerter = Alerter(settings, record_event=record_event, clock=fake_clock)
    with capture_logs() as logs:
        alerter.alert("halted", "x")
    events = [e["event"] for e in logs]
    assert events == ["alert_not_journaled", "alert"]


# -- helpers ------------------------------------------------------------------------------


def test_disk_space_alert_names_low_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = shutil.disk_usage(tmp_path)
    free_mb = usage.free / 1_048_576
    assert disk_space_alert([tmp_path], min_free_mb=0) is None
    assert disk_space_alert([tmp_path / "not" / "yet"], min_free_mb=free_mb / 4) is None
    message = disk_space_alert([tmp_path / "data", tmp_path / "models"], min_free_mb=free_mb * 4)
    assert message is not None
    assert str(tmp_path / "data") in message and "alerts.disk_free_min_mb" in message

    def fake_usage(path: object) -> Any:
        return type(usage)(total=10 * 1_048_576, used=9 * 1_048_576, free=1_048_576)

    monkeypatch.setattr(shutil, "disk_usage", fake_usage)
    message = disk_space_alert([tmp_path], min_free_mb=500)
    assert message is not None and "1 MB free" in message and "500" in message


def test_outage_timer_reports_once_per_outage(fake_clock: FakeClock) -> None:
    timer = OutageTimer(300, fake_clock)
    assert timer.update(up=True) is None and timer.down_for_s is None
    assert timer.update(up=False) is None
    fake_clock.advance(299)
    assert timer.update(up=False) is None
    fake_clock.advance(2)
    assert timer.update(up=False) == 301
    fake_clock.advance(600)
    assert timer.update(up=False) is None and timer.down_for_s == 901
    assert timer.update(up=True) is None
    assert timer.update(up=False) is None
    fake_clock.advance(300)
    assert timer.update(up=False) == 300


def test_a_url_the_http_client_refuses_is_not_quoted_in_the_log(fake_clock: FakeClock) -> None:
    # http.client's InvalidURL message quotes the path, which holds the secret.
    alerter = _alerter(f"http://127.0.0.1:9/ho ok/{SECRET}", fake_clock, _Journal())
    with capture_logs() as logs:
        alerter.alert("halted", "x")
        assert alerter.flush(5)
        alerter.close(5)
    failure = next(e for e in logs if e["event"] == "alert_webhook_failed")
    assert "InvalidURL" in failure["error"]
    assert SECRET not in json.dumps(logs, default=str)
