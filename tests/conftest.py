"""Shared fixtures: deterministic clocks and small settings for fast tests."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from utils.clock import FakeClock


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock(datetime(2024, 1, 2, 9, 0, tzinfo=UTC))
