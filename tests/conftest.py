"""Shared fixtures: deterministic clocks and small settings for fast tests."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import structlog

from utils.clock import FakeClock


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock(datetime(2024, 1, 2, 9, 0, tzinfo=UTC))


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """A test that configures logging (``main()``) must not leak it into the next."""
    yield
    structlog.reset_defaults()
