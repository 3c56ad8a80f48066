"""Fixtures of the unit tests."""

from __future__ import annotations

import pytest

from islands.runtime.coordinator import Coordinator


@pytest.fixture
def coord():
    """A coordinator on a free loopback port (token ``tok``), stopped afterwards."""
    c = Coordinator("127.0.0.1", 0, token=b"tok", heartbeat_timeout_s=1.0,
                    handshake_timeout_s=0.5).start()
    yield c
    c.stop()
