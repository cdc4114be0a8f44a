"""Group commit: concurrent metric updates share statements, each caller keeps its own
result and its own error, and the totals stay exact."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, SessionStatus
from ctxengine.errors import SessionExpiredError, SessionNotActiveError, SessionNotFoundError
from ctxengine.storage.group import BATCH_LIMIT, SOLO, Combiner, Solo
from tests.fixtures import FakeClock, watch_deadlocks


async def stored(engine: ContextEngine, session_id: str) -> tuple[int, int, float]:
    async with engine._store.engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT request_count, error_count, total_processing_time "
                    "FROM ctx_sessions WHERE session_id = :sid"
                ),
                {"sid": session_id},
            )
        ).one()
    return row[0], row[1], row[2]


async def test_concurrent_updates_share_statements_and_stay_exact(engine: ContextEngine) -> None:
    """64 tasks: 32 on one session, 32 on sessions of their own. The calls share
    statements (several callers see one write's last_activity), each hot caller sees the
    count after its own update (1..32, each once), and the stored totals are exact."""
    await engine.create_session("hot", "u")
    for i in range(32):
        await engine.create_session(f"own-{i}", "u")

    hot = [
        engine.update_session("hot", increment_requests=True, add_processing_time=0.25)
        for _ in range(32)
    ]
    own = [
        engine.update_session(f"own-{i}", increment_requests=True, mark_error=True)
        for i in range(32)
    ]
    results = await asyncio.gather(*hot, *own)

    assert sorted(s.request_count for s in results[:32]) == list(range(1, 33))
    assert all(s.session_id == "hot" for s in results[:32])
    assert [(s.session_id, s.request_count, s.error_count) for s in results[32:]] == [
        (f"own-{i}", 1, 1) for i in range(32)
    ]
    assert await stored(engine, "hot") == (32, 0, 8.0)
    assert len({s.last_activity for s in results}) < len(results)


async def test_a_refused_caller_fails_alone(engine: ContextEngine) -> None:
    """In a batch, an ended session and a missing one get their own errors; the calls
    beside them are written, and nothing is written for the refused ones."""
    for name in ("a", "b", "ended"):
        await engine.create_session(name, "u")
    await engine.end_session("ended")

    outcomes = await asyncio.gather(
        *(engine.update_session("a", increment_requests=True) for _ in range(5)),
        engine.update_session("ended", increment_requests=True),
        engine.update_session("missing", increment_requests=True),
        *(engine.update_session("b", increment_requests=True) for _ in range(5)),
        return_exceptions=True,
    )

    assert isinstance(outcomes[5], SessionNotActiveError)
    assert isinstance(outcomes[6], SessionNotFoundError)
    assert not any(isinstance(o, BaseException) for o in outcomes[:5] + outcomes[7:])
    assert (await stored(engine, "a"))[0] == 5
    assert (await stored(engine, "b"))[0] == 5
    assert (await stored(engine, "ended"))[0] == 0


async def test_a_metadata_patch_runs_alone_beside_a_batch(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    results = await asyncio.gather(
        *(engine.update_session("s", increment_requests=True) for _ in range(10)),
        engine.update_session("s", increment_requests=True, metadata={"k": "v"}),
    )
    assert results[-1].metadata == {"k": "v"}
    assert (await stored(engine, "s"))[0] == 11


# -- the combiner itself ---------------------------------------------------------------


class Recorder:
    """A batch function that records its batches and waits for ``release``."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail = False

    async def __call__(self, items: Sequence[int]) -> list[int | Solo]:
        self.batches.append(list(items))
        await self.release.wait()
        if self.fail:
            raise RuntimeError("the batch failed")
        return [SOLO if item < 0 else item * 10 for item in items]


async def test_a_lone_call_runs_at_once_and_later_ones_wait_for_the_next_batch() -> None:
    run = Recorder()
    combine: Combiner[int, int] = Combiner(run, slots=1)
    first = asyncio.ensure_future(combine(1))
    await asyncio.sleep(0)
    assert run.batches == [[1]]  # at once, alone
    others = [asyncio.ensure_future(combine(n)) for n in (2, 3, -4)]
    await asyncio.sleep(0)
    assert run.batches == [[1]]  # waiting for the running batch
    run.release.set()
    assert await first == 10
    assert await asyncio.gather(*others) == [20, 30, SOLO]
    assert run.batches == [[1], [2, 3, -4]]


async def settle() -> None:
    """Let every ready task and callback run (a few turns of the event loop)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_calls_beside_a_running_batch_form_the_second_at_once() -> None:
    """The first call runs alone at once; the calls of the same turn, arriving while it
    runs, take the second slot together at once (one batch, not a slot each); calls
    after that wait for a slot."""
    run = Recorder()
    combine: Combiner[int, int] = Combiner(run)
    same_turn = [asyncio.ensure_future(combine(n)) for n in (1, 2, 3)]
    await settle()
    assert run.batches == [[1], [2, 3]]
    waiting = [asyncio.ensure_future(combine(n)) for n in (4, 5)]
    await settle()
    assert run.batches == [[1], [2, 3]]  # both slots busy
    run.release.set()
    assert await asyncio.gather(*same_turn, *waiting) == [10, 20, 30, 40, 50]
    assert run.batches == [[1], [2, 3], [4, 5]]


async def test_a_call_cancelled_while_waiting_is_left_out_of_its_batch() -> None:
    run = Recorder()
    combine: Combiner[int, int] = Combiner(run, slots=1)
    first = asyncio.ensure_future(combine(1))
    await asyncio.sleep(0)
    cancelled = asyncio.ensure_future(combine(2))
    kept = asyncio.ensure_future(combine(3))
    await asyncio.sleep(0)
    cancelled.cancel()
    run.release.set()
    assert await first == 10
    assert await kept == 30
    assert cancelled.cancelled()
    assert run.batches == [[1], [3]]


async def test_a_call_cancelled_while_its_batch_runs_leaves_it_to_the_others() -> None:
    """A combined call begins committing when its batch starts: cancelled then, it
    hands control back at once and the batch goes on for the others (its result is
    theirs); a batch whose callers are all cancelled is stopped."""
    run = Recorder()
    combine: Combiner[int, int] = Combiner(run, slots=1)
    first = asyncio.ensure_future(combine(1))
    await asyncio.sleep(0)
    cancelled = asyncio.ensure_future(combine(2))
    other = asyncio.ensure_future(combine(3))
    await asyncio.sleep(0)
    first.cancel()  # the lone call: its own batch stops; the waiting ones form the next
    for _ in range(10):
        await asyncio.sleep(0)
    assert run.batches == [[1], [2, 3]]
    cancelled.cancel()
    await asyncio.sleep(0)
    assert cancelled.cancelled() and first.cancelled()
    run.release.set()
    assert await other == 30  # the batch went on

    run.release.clear()
    lone = asyncio.ensure_future(combine(4))
    await asyncio.sleep(0)
    gone = [asyncio.ensure_future(combine(n)) for n in (5, 6)]
    await asyncio.sleep(0)
    lone.cancel()
    for _ in range(10):
        await asyncio.sleep(0)
    assert run.batches[-1] == [5, 6]
    for call in gone:
        call.cancel()
    for _ in range(10):
        await asyncio.sleep(0)
    run.release.set()
    assert await combine(7) == 70  # the stopped batch freed its slot


async def test_a_failed_batch_raises_its_error_in_every_caller() -> None:
    """Each caller meets the batch's error as it would have alone (a lost connection
    leaves each not knowing whether it was applied): none is run again."""
    run = Recorder()
    combine: Combiner[int, int] = Combiner(run, slots=1)
    first = asyncio.ensure_future(combine(1))
    await asyncio.sleep(0)
    waiting = [asyncio.ensure_future(combine(n)) for n in (2, 3)]
    await asyncio.sleep(0)
    run.fail = True
    run.release.set()
    outcomes = await asyncio.gather(first, *waiting, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert outcomes[1] is not outcomes[2]  # each caller its own
    assert run.batches == [[1], [2, 3]]  # nothing run again
    run.fail = False
    assert await combine(4) == 40  # nothing left running


async def test_a_batch_takes_at_most_the_limit() -> None:
    run = Recorder()
    combine: Combiner[int, int] = Combiner(run, slots=1)
    first = asyncio.ensure_future(combine(0))
    await asyncio.sleep(0)
    waiting = [asyncio.ensure_future(combine(n)) for n in range(1, BATCH_LIMIT + 6)]
    await asyncio.sleep(0)
    run.release.set()
    await asyncio.gather(first, *waiting)
    assert [len(batch) for batch in run.batches] == [1, BATCH_LIMIT, 5]


async def test_callers_racing_on_an_idle_session_all_see_it_expired(
    db_url: str, clock: FakeClock
) -> None:
    """16 concurrent updates of a session past its idle timeout: the batch writes
    none, each caller runs alone, one of them expires the session, and every one gets
    SessionExpiredError (not "active, not active" from reading the status before
    another caller's expiry committed)."""
    async with ContextEngine(
        db_url, settings=EngineSettings(auto_cleanup=False), clock=clock
    ) as engine:
        await engine.create_session("idle", "u", idle_timeout=10)
        clock.advance(11)
        outcomes = await asyncio.gather(
            *(engine.update_session("idle", increment_requests=True) for _ in range(16)),
            return_exceptions=True,
        )
        assert all(isinstance(o, SessionExpiredError) for o in outcomes), outcomes
        session = await engine.get_session("idle")
        assert session is not None and session.status is SessionStatus.EXPIRED
        assert session.request_count == 0


async def test_combined_callers_see_the_sessions_live_leases(engine: ContextEngine) -> None:
    """The batched statement counts each session's live leases as the one-row one does."""
    await engine.create_session("busy", "u")
    await engine.create_session("calm", "u")
    async with engine.concurrency_slot("busy"):
        results = await asyncio.gather(
            *(engine.update_session(name) for name in ["busy", "calm"] * 8)
        )
    assert [s.concurrent_operations for s in results] == [1, 0] * 8


async def test_tracked_requests_are_recorded_together_also_after_their_session_ended(
    engine: ContextEngine,
) -> None:
    """32 requests tracked at once on one session, which is ended while they run: their
    outcomes (a request each, an error for the 8 that raised) are recorded, whatever the
    session's status by then, by shared statements."""
    await engine.create_session("hot", "u", tier="enterprise")
    repo = engine._runtime().sessions.repo
    batches: list[tuple[int, bool]] = []
    record_many = repo.record_many

    async def counted(*args: Any) -> list[Any]:
        batches.append((len(args[1]), args[3]))
        return await record_many(*args)

    repo.record_many = counted  # type: ignore[method-assign]
    running = 0
    all_in, release = asyncio.Event(), asyncio.Event()

    async def request(i: int) -> None:
        nonlocal running
        async with engine.track_request("hot", "op"):
            running += 1
            if running == 32:
                all_in.set()
            await release.wait()
            if i % 4 == 0:
                raise RuntimeError("the agent failed")

    tasks = [asyncio.ensure_future(request(i)) for i in range(32)]
    await all_in.wait()
    await engine.end_session("hot")
    release.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)

    assert [type(o) for o in outcomes] == [
        RuntimeError if i % 4 == 0 else type(None) for i in range(32)
    ]
    requests, errors, _ = await stored(engine, "hot")
    assert (requests, errors) == (32, 8)
    assert any(size > 1 and not require for size, require in batches)


async def test_slots_released_at_once_share_statements(engine: ContextEngine) -> None:
    """32 concurrency slots of two sessions left at once: their leases are deleted by
    shared statements, every one of them, and no other session's."""
    for name in ("a", "b", "other"):
        await engine.create_session(name, "u", tier="enterprise")
    repo = engine._runtime().leases.repo
    batches: list[int] = []
    release_leases = repo.release_leases

    async def counted(conn: Any, keys: Sequence[tuple[str, str]]) -> None:
        batches.append(len(keys))
        await release_leases(conn, keys)

    repo.release_leases = counted  # type: ignore[method-assign]
    all_in, release = asyncio.Event(), asyncio.Event()
    inside = 0

    async def hold(session_id: str) -> None:
        nonlocal inside
        async with engine.concurrency_slot(session_id, "op"):
            inside += 1
            if inside == 32:
                all_in.set()
            await release.wait()

    tasks = [asyncio.ensure_future(hold("a" if i % 2 else "b")) for i in range(32)]
    async with engine.concurrency_slot("other", "op"):
        await all_in.wait()
        assert (await engine.get_session("a")).concurrent_operations == 16  # type: ignore[union-attr]
        release.set()
        await asyncio.gather(*tasks)
        assert (await engine.get_session("a")).concurrent_operations == 0  # type: ignore[union-attr]
        assert (await engine.get_session("b")).concurrent_operations == 0  # type: ignore[union-attr]
        assert (await engine.get_session("other")).concurrent_operations == 1  # type: ignore[union-attr]
    assert sum(batches) == 33 and max(batches) > 1


async def test_batches_of_every_kind_from_two_engines_never_deadlock(db_url: str) -> None:
    """Two engines (two processes' worth of batches) update, track usage on and append
    to 16 sessions at random: every batch locks its sessions in key order, whatever
    its kind, so no two wait on each other in a cycle (a deadlock, found after a
    second and retried), and the totals are exact."""
    settings = EngineSettings(auto_cleanup=False, max_messages_per_chat=None)
    async with (
        ContextEngine(db_url, settings=settings) as one,
        ContextEngine(db_url, settings=settings) as two,
    ):
        deadlocks = watch_deadlocks(one, two)
        for i in range(16):
            await one.create_session(f"s{i}", "u", tier="enterprise")

        async def writer(engine: ContextEngine, w: int) -> None:
            for j in range(12):
                sid = f"s{(w * 7 + j * 5) % 16}"
                if j % 3 == 0:
                    await engine.update_session(sid, increment_requests=True)
                elif j % 3 == 1:
                    await engine.track_usage(sid, "op", "tokens", 1)
                else:
                    await engine.add_message(sid, "user", f"{w}/{j}")

        await asyncio.gather(*(writer(e, w) for w in range(64) for e in (one, two)))
        requests = sum([(await stored(one, f"s{i}"))[0] for i in range(16)])
        usage = await one.get_usage_history(limit=10_000)
        messages = sum([await one.count_messages(f"s{i}") for i in range(16)])
    assert (requests, len(usage), messages) == (2 * 64 * 4,) * 3
    assert deadlocks == []
