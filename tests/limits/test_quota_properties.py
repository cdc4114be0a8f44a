"""Property tests of quota arithmetic against a real SQLite file."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxengine import ContextEngine, EngineSettings, QuotaStatus, QuotaType
from ctxengine.errors import QuotaExceededError

amounts = st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=25)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(limit=st.integers(min_value=0, max_value=200), offered=amounts)
def test_accepted_usage_matches_the_model(tmp_path: Path, limit: int, offered: list[int]) -> None:
    async def run() -> tuple[list[bool], QuotaStatus]:
        url = f"sqlite+aiosqlite:///{tmp_path / f'q{limit}_{len(offered)}_{sum(offered)}.db'}"
        async with ContextEngine(url, settings=EngineSettings(auto_cleanup=False)) as engine:
            sid = (await engine.create_session(user_id="u")).session_id
            await engine.set_quota(sid, QuotaType.TOKENS, limit)
            outcomes = []
            for amount in offered:
                try:
                    await engine.track_usage(sid, "op", QuotaType.TOKENS, amount)
                    outcomes.append(True)
                except QuotaExceededError as exc:
                    assert exc.used + exc.requested > exc.limit
                    outcomes.append(False)
            status = await engine.get_quota(sid, QuotaType.TOKENS)
            history = await engine.get_usage_history(session_id=sid, limit=1000)
            assert sum(r.amount for r in history) == status.used
            await engine.delete_session(sid)
            return outcomes, status

    outcomes, status = asyncio.run(run())
    used = 0
    expected = []
    for amount in offered:
        ok = used + amount <= limit
        expected.append(ok)
        used += amount if ok else 0
    assert outcomes == expected
    assert status == QuotaStatus.of(used, limit)
    assert status.remaining == limit - used
    if limit:
        assert status.usage_percentage == 100 * used / limit
