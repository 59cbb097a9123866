"""sd_notify over a real AF_UNIX datagram socket, the loop monitor, and the shipped unit."""

from __future__ import annotations

import asyncio
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from config.settings import ENV_ONLY_KEYS, ENV_PREFIX
from utils.systemd import Notifier, loop_monitor

REPO = Path(__file__).resolve().parent.parent
posix_only = pytest.mark.skipif(
    sys.platform == "win32" or not hasattr(socket, "AF_UNIX"), reason="AF_UNIX notify is POSIX"
)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:  # sun_path holds 108 bytes
        pytest.skip("tmp path too long for an AF_UNIX socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def _received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode("utf-8").split("\n")


# -- Notifier -----------------------------------------------------------------------------


def test_without_notify_socket_everything_is_a_silent_no_op() -> None:
    notifier = Notifier({}, pid=123)
    with capture_logs() as logs:
        assert not notifier.enabled
        assert notifier.ready("up") is False
        assert notifier.status("x") is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
        assert notifier.extend_timeout(60) is False
        assert notifier.watchdog_interval_s() is None
    assert logs == []


@posix_only
def test_ready_status_and_stopping_arrive_as_datagrams(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path}, pid=123)
    assert notifier.enabled
    assert notifier.ready("serving baseline\non EURUSD")
    assert _received(sock) == ["READY=1", "STATUS=serving baseline on EURUSD"]
    assert notifier.status("2 positions")
    assert _received(sock) == ["STATUS=2 positions"]
    assert notifier.stopping("SIGTERM")
    assert _received(sock) == ["STOPPING=1", "STATUS=SIGTERM"]


@posix_only
def test_extend_timeout_is_sent_in_microseconds(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path}, pid=123)
    assert notifier.extend_timeout(90.5, status="downloading history")
    assert _received(sock) == ["EXTEND_TIMEOUT_USEC=90500000", "STATUS=downloading history"]


@posix_only
def test_watchdog_pings_and_interval_is_half_the_timeout(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "123"}
    notifier = Notifier(env, pid=123)
    assert notifier.watchdog_timeout_s() == 30.0
    assert notifier.watchdog_interval_s() == 15.0
    assert notifier.watchdog()
    assert _received(sock) == ["WATCHDOG=1"]


@posix_only
def test_watchdog_meant_for_another_pid_is_disabled(
    notify_socket: tuple[socket.socket, str],
) -> None:
    _, path = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "999"}
    notifier = Notifier(env, pid=123)
    assert notifier.watchdog_interval_s() is None
    assert notifier.watchdog() is False
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "junk"}).watchdog_interval_s() is None
    # Without WATCHDOG_PID the variables are ours.
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}).watchdog_timeout_s() == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract namespace is Linux")
def test_abstract_namespace_address() -> None:
    name = f"scalper-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert _received(sock) == ["READY=1"]


@posix_only
def test_send_failure_is_logged_once_and_never_raises(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}, pid=1)
    with capture_logs() as logs:
        assert notifier.status("a") is False
        assert notifier.status("b") is False
        assert notifier.ready() is False
    failures = [e for e in logs if e["event"] == "systemd_notify_failed"]
    assert len(failures) == 1 and failures[0]["log_level"] == "warning"


def test_unsupported_socket_kind_is_disabled() -> None:
    with capture_logs():
        notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert notifier.ready() is False


# -- loop monitor -------------------------------------------------------------------------


class _FakeLoopTime:
    """A monotonic clock the monitor's sleep moves, overshooting by scripted lags."""

    def __init__(self, lags: list[float]) -> None:
        self.now = 100.0
        self.lags = list(lags)

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds + (self.lags.pop(0) if self.lags else 0.0)
        await asyncio.sleep(0)


def test_loop_monitor_reports_lag_then_ticks() -> None:
    fake = _FakeLoopTime([0.0, 0.25, 3.0])
    calls: list[object] = []
    asyncio.run(
        loop_monitor(
            0.5,
            lambda lag: calls.append(round(lag, 6)),
            lambda: calls.append("tick"),
            monotonic=fake.monotonic,
            sleep=fake.sleep,
            max_ticks=3,
        )
    )
    assert calls == [0.0, "tick", 0.25, "tick", 3.0, "tick"]


def test_loop_monitor_survives_a_failing_callback_and_still_ticks() -> None:
    fake = _FakeLoopTime([])
    ticks: list[int] = []

    def broken_lag(_lag: float) -> None:
        raise RuntimeError("metrics bug")

    with capture_logs() as logs:
        asyncio.run(
            loop_monitor(
                1.0,
                broken_lag,
                lambda: ticks.append(1),
                monotonic=fake.monotonic,
                sleep=fake.sleep,
                max_ticks=4,
            )
        )
    assert len(ticks) == 4  # the watchdog ping goes on
    failures = [e for e in logs if e["event"] == "loop_monitor_callback_failed"]
    assert len(failures) == 1  # logged once, not on every tick


def test_loop_monitor_on_the_real_loop_measures_non_negative_lag() -> None:
    lags: list[float] = []
    asyncio.run(loop_monitor(0.005, lags.append, lambda: None, max_ticks=3))
    assert len(lags) == 3 and all(lag >= 0 for lag in lags)


def test_loop_monitor_is_cancellable() -> None:
    async def run() -> int:
        ticks: list[int] = []
        two_ticks = asyncio.Event()

        def tick() -> None:
            ticks.append(1)
            if len(ticks) >= 2:
                two_ticks.set()

        task = asyncio.create_task(
            loop_monitor(0.001, lambda _lag: None, tick), name="loop-monitor"
        )
        await asyncio.wait_for(two_ticks.wait(), timeout=5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return len(ticks)

    assert asyncio.run(run()) >= 2


def test_loop_monitor_refuses_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="> 0"):
        asyncio.run(loop_monitor(0, lambda _lag: None, lambda: None, max_ticks=1))


# -- the shipped unit and env file -------------------------------------------------------


def _parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's INI dialect: repeated keys accumulate, # and ; start comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_service_unit_keeps_its_required_settings() -> None:
    unit = _parse_unit((REPO / "deploy" / "scalper.service").read_text(encoding="utf-8"))
    service = unit["Service"]

    def one(key: str) -> str:
        assert key in service, f"scalper.service lost {key}="
        return service[key][-1]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("WatchdogSec") == "30"
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus") == "2"
    assert one("User") == "scalper"
    assert one("Group") == "scalper"
    assert one("StateDirectory") == "scalper"
    assert one("StateDirectoryMode") == "0700"
    assert one("UMask") == "0077"
    assert one("ProtectSystem") == "strict"
    assert one("ProtectHome") == "true"
    assert one("PrivateTmp") == "true"
    assert one("NoNewPrivileges") == "true"
    assert one("CapabilityBoundingSet") == ""
    assert one("ReadWritePaths") == "/var/lib/scalper"
    assert one("EnvironmentFile") == "/etc/scalper/scalper.env"
    assert one("ExecStart").endswith("main.py run --config /etc/scalper/settings.toml")
    assert int(one("TimeoutStartSec")) >= 120
    assert int(one("TimeoutStopSec")) >= 30
    # W+X memory is needed by onnxruntime and the training libraries.
    assert "MemoryDenyWriteExecute" not in service
    environment = dict(v.split("=", 1) for v in service["Environment"])
    assert environment["SCALPER__STORAGE__JOURNAL_PATH"].startswith("/var/lib/scalper/")
    assert environment["SCALPER__STORAGE__MODELS_DIR"].startswith("/var/lib/scalper/")
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_env_example_names_exactly_the_environment_only_settings() -> None:
    text = (REPO / "deploy" / "scalper.env.example").read_text(encoding="utf-8")
    assert "install -m 0600 -o root" in text
    names = set()
    for raw in text.splitlines():
        line = raw.strip().lstrip("#").strip()
        if line.startswith(ENV_PREFIX) and "=" in line:
            names.add(line.split("=", 1)[0])
    expected = {f"{ENV_PREFIX}{section.upper()}__{key.upper()}" for section, key in ENV_ONLY_KEYS}
    assert names == expected
