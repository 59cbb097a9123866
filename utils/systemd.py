"""systemd integration without libsystemd: ``sd_notify`` datagrams and the loop monitor.

``Notifier`` speaks the notify protocol (``READY=1``, ``STATUS=``, ``WATCHDOG=1``,
``STOPPING=1``, ``EXTEND_TIMEOUT_USEC=``) to ``$NOTIFY_SOCKET``. Where that variable
is unset (run by hand, Windows, a Windows service wrapper) every call is a silent
no-op, and a failing send is logged once and never raised: the service manager is
an observer, and trading must not depend on it.

``loop_monitor`` runs inside the event loop and proves it is alive: each tick
measures how late the loop woke up (its lag) and calls back, and the daemon pings
the watchdog from that callback, so a stalled loop stops the pings and systemd
restarts the process.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping

import structlog

log = structlog.get_logger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def _one_line(text: str) -> str:
    # One field per line in the datagram: a newline inside a value would start a new field.
    return " ".join(text.splitlines()).strip()


class Notifier:
    """Sends state changes to the service manager; a no-op where there is none.

    ``environ`` and ``pid`` default to the process's own; tests pass their own.
    Every method returns True when a datagram was sent, False otherwise, and
    never raises.
    """

    def __init__(self, environ: Mapping[str, str] | None = None, *, pid: int | None = None) -> None:
        env = os.environ if environ is None else environ
        self._pid = os.getpid() if pid is None else pid
        self._address = self._parse_address(env.get(NOTIFY_SOCKET_ENV, ""))
        self._watchdog_timeout_s = self._parse_watchdog(env)
        self._failing = False

    # -- configuration --------------------------------------------------------------

    @staticmethod
    def _parse_address(raw: str) -> str | bytes | None:
        if not raw or sys.platform == "win32" or not hasattr(socket, "AF_UNIX"):
            return None
        if raw.startswith("@"):
            # Linux abstract namespace: a leading NUL byte instead of a path.
            return b"\0" + raw[1:].encode("utf-8")
        if raw.startswith("/"):
            return raw
        # e.g. "vsock:..." (systemd in a VM): not a socket this process can reach.
        log.warning("systemd_notify_unsupported", reason="NOTIFY_SOCKET is not an AF_UNIX path")
        return None

    def _parse_watchdog(self, env: Mapping[str, str]) -> float | None:
        raw_usec = env.get(WATCHDOG_USEC_ENV, "")
        if not raw_usec:
            return None
        watchdog_pid = env.get(WATCHDOG_PID_ENV, "")
        if watchdog_pid:
            # The variables were meant for another process (inherited by a child).
            try:
                if int(watchdog_pid) != self._pid:
                    return None
            except ValueError:
                return None
        try:
            usec = int(raw_usec)
        except ValueError:
            return None
        return usec / 1_000_000 if usec > 0 else None

    @property
    def enabled(self) -> bool:
        """True when a service manager listens (``$NOTIFY_SOCKET`` is usable)."""
        return self._address is not None

    def watchdog_timeout_s(self) -> float | None:
        """The service's ``WatchdogSec`` in seconds, or None when no watchdog applies."""
        return self._watchdog_timeout_s if self.enabled else None

    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half the timeout, or None without a watchdog."""
        timeout_s = self.watchdog_timeout_s()
        return None if timeout_s is None else timeout_s / 2

    # -- messages -------------------------------------------------------------------

    def ready(self, status: str = "") -> bool:
        """Start-up finished (CONVENTIONS: journal open, feed and broker up, a set loaded)."""
        fields = ["READY=1"]
        if status:
            fields.append(f"STATUS={_one_line(status)}")
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        """Free text shown by ``systemctl status``."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Proof of life; without one within ``WatchdogSec`` systemd restarts the service."""
        if self.watchdog_timeout_s() is None:
            return False
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        fields = ["STOPPING=1"]
        if status:
            fields.append(f"STATUS={_one_line(status)}")
        return self.notify(*fields)

    def extend_timeout(self, seconds: float, status: str = "") -> bool:
        """Ask for ``seconds`` more before the start (or stop) timeout fires.

        Sent before a long start-up step (history download, first reconcile): the
        timer restarts from now, so send it again before each further long step.
        """
        fields = [f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}"]
        if status:
            fields.append(f"STATUS={_one_line(status)}")
        return self.notify(*fields)

    def notify(self, *fields: str) -> bool:
        """Send raw ``KEY=VALUE`` fields in one datagram; False when not sent."""
        address = self._address
        if address is None or not fields:
            return False
        payload = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(payload, address)
        except OSError as exc:
            if not self._failing:
                # Once per run of failures: a gone socket must not flood the log.
                log.warning("systemd_notify_failed", error=f"{type(exc).__name__}: {exc}")
            self._failing = True
            return False
        if self._failing:
            log.info("systemd_notify_recovered")
        self._failing = False
        return True


async def loop_monitor(
    interval_s: float,
    on_lag: Callable[[float], None],
    on_tick: Callable[[], None],
    *,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    max_ticks: int | None = None,
) -> None:
    """Tick every ``interval_s`` in the event loop until cancelled (or ``max_ticks``).

    Each tick reports the lag (actual wake-up minus scheduled wake-up, seconds) to
    ``on_lag`` and then calls ``on_tick``. It measures the real loop, so it uses
    ``time.monotonic`` and ``asyncio.sleep`` rather than the daemon's clock (a fake
    clock in replay says nothing about how late the loop runs); tests inject both.
    A callback that raises is logged (once until it succeeds again) and the monitor
    goes on: monitoring must not stop trading.
    """
    if interval_s <= 0:
        raise ValueError(f"loop monitor interval must be > 0 seconds (got {interval_s})")
    failing: set[Callable[..., None]] = set()
    ticks = 0
    while max_ticks is None or ticks < max_ticks:
        # Scheduled from the actual wake-up: after a stall the monitor does not race
        # through the missed ticks.
        scheduled = monotonic() + interval_s
        await sleep(interval_s)
        lag_s = max(0.0, monotonic() - scheduled)
        ticks += 1
        for callback, arg in ((on_lag, (lag_s,)), (on_tick, ())):
            # Separately: a failing lag metric must not stop the watchdog ping.
            try:
                callback(*arg)
            except Exception as exc:
                if callback not in failing:
                    log.exception(
                        "loop_monitor_callback_failed",
                        callback=getattr(callback, "__qualname__", repr(callback)),
                        error=f"{type(exc).__name__}: {exc}",
                    )
                failing.add(callback)
            else:
                failing.discard(callback)
