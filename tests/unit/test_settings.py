"""EngineSettings: types, validation and environment variables."""

from __future__ import annotations

import pytest

from ctxengine import EngineSettings


def test_session_timeout_none_means_never() -> None:
    assert EngineSettings(session_timeout=None).session_timeout is None
    assert EngineSettings(session_timeout=5).session_timeout == 5.0
