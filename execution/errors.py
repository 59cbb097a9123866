"""Exception taxonomy: the class of an error is the daemon's policy for it.

``TemporaryBrokerError`` is retried with backoff; ``OperationalError`` halts new
entries and alerts; anything else is a bug and crashes (start-up reconciles).
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error raised across the Broker seam."""


class TemporaryBrokerError(BrokerError):
    """Connection lost, timeout, too many requests: retry with backoff."""


class OperationalError(BrokerError):
    """Trading disabled, no money, account problems: stop opening positions, alert."""
