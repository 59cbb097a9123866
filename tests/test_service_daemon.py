"""The running daemon as a service: READY/WATCHDOG/STATUS/STOPPING, /health, /metrics, alerts.

A real paper daemon replays at a modest speed on the wall clock (the loop
monitor measures the real loop, so it ticks on real time) with a fake systemd
notify socket, the HTTP endpoint on a free local port and a webhook receiver.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from main import run_daemon
from tests.test_daemon import settings_for
from utils.clock import SystemClock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="AF_UNIX notify socket")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """A webhook receiver on a local port that records the JSON bodies posted to it."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.got = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts.append(json.loads(body))
                outer.got.set()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/SECRETPART"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def get(url: str, token: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def test_daemon_notifies_systemd_serves_health_and_metrics_and_alerts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    sock_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    port = free_port()
    token = "t0k3n-for-the-test"  # noqa: S105
    # The kill switch is on from the start: entries stop and an operator must hear it.
    (tmp_path / "KILL").write_text("", encoding="utf-8")
    settings = settings_for(
        tmp_path,
        SCALPER__HTTP__ENABLED="true",
        SCALPER__HTTP__PORT=str(port),
        SCALPER__HTTP__TOKEN=token,
        SCALPER__ALERTS__WEBHOOK_URL=receiver.url,
        SCALPER__PAPER__REPLAY_BARS_PER_S="200",
    )
    messages: list[str] = []
    seen: dict[str, Any] = {}

    async def scenario() -> int:
        stop = asyncio.Event()

        async def operator() -> None:
            # Wait for READY=1 (sent only once the daemon is healthy), then look.
            while not any("READY=1" in m for m in messages):
                messages.append((await asyncio.to_thread(notify.recv, 4096)).decode())
            seen["health"] = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/health", token)
            seen["unauthorized"] = await asyncio.to_thread(
                get, f"http://127.0.0.1:{port}/health", "wrong"
            )
            # A few more ticks: watchdog pings and a bar count in the metrics.
            while sum("WATCHDOG=1" in m for m in messages) < 3:
                messages.append((await asyncio.to_thread(notify.recv, 4096)).decode())
            seen["metrics"] = await asyncio.to_thread(
                get, f"http://127.0.0.1:{port}/metrics", token
            )
            await asyncio.to_thread(receiver.got.wait, 10)
            stop.set()

        task = asyncio.create_task(operator())
        code = await run_daemon(
            settings, clock=SystemClock(), install_signals=False, stop=stop, command_poll_s=None
        )
        await task
        return code

    assert asyncio.run(scenario()) == 0
    while True:  # the rest of the datagrams, up to STOPPING=1
        try:
            notify.settimeout(0.5)
            messages.append(notify.recv(4096).decode())
        except TimeoutError:
            break
    notify.close()

    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages)
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=serving baseline" in ready
    assert any("STOPPING=1" in m for m in messages)
    assert messages.index(ready) < max(i for i, m in enumerate(messages) if "WATCHDOG=1" in m)

    status, body = seen["health"]
    health = json.loads(body)
    assert status == 200 and health["ok"] is True
    assert health["serving"] == {"EURUSD": {"baseline": "1.0.0"}}
    assert seen["unauthorized"][0] == 401

    status, body = seen["metrics"]
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    bars = [s.value for f in families.values() for s in f.samples if "bars" in s.name]
    assert bars and max(bars) > 0
    assert any("loop_lag" in name for name in families)
    assert any("decision" in name for name in families)

    kinds = [p.get("kind") for p in receiver.posts]
    assert "trading_halted" in kinds
    text = json.dumps(receiver.posts)
    assert "kill switch" in text
    assert "SECRETPART" not in text and token not in text
