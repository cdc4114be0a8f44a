"""ContextEngineSaver against the real LangGraph: compiled graphs of plain Python nodes
(no model), LangGraph's own conformance suite, and LangGraph's InMemorySaver as the
oracle of what a run must produce."""

from __future__ import annotations

import asyncio
import itertools
import operator
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import timedelta
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, SessionStatus
from ctxengine.errors import SessionExpiredError, SessionNotActiveError, ValidationError
from ctxengine.integrations.langgraph import ContextEngineSaver
from tests.fixtures import FakeClock
from tests.integrations._langgraph_workers import Items, chain

Scenario = Callable[[BaseCheckpointSaver[Any]], Awaitable[Any]]


def cfg(thread_id: str, **more: Any) -> Any:
    return {"configurable": {"thread_id": thread_id, **more}}


async def rows(engine: ContextEngine, table: str, tenant: str = "default") -> int:
    async with engine._store.engine.connect() as conn:
        query = text(f"SELECT count(*) FROM {table} WHERE tenant_id = :t")
        return int((await conn.execute(query, {"t": tenant})).scalar_one())


async def all_rows(engine: ContextEngine) -> int:
    return sum(
        [
            await rows(engine, table, tenant)
            for table in ("ctx_graph_checkpoints", "ctx_graph_blobs", "ctx_graph_writes")
            for tenant in ("default", "a", "b")
        ]
    )


async def same_as_memory(engine: ContextEngine, scenario: Scenario) -> Any:
    """Run ``scenario`` with LangGraph's InMemorySaver and with ours: the same outcome."""
    expected = await scenario(InMemorySaver())
    got = await scenario(ContextEngineSaver(engine))
    assert got == expected
    return got


def history(snapshots: list[Any]) -> list[tuple[Any, ...]]:
    """What a state history shows, without ids and times."""
    return [
        (s.values, s.next, s.metadata.get("source"), s.metadata.get("step"), len(s.tasks))
        for s in snapshots
    ]


# -- LangGraph's own conformance suite ----------------------------------------------------


async def test_langgraphs_conformance_suite_passes_for_every_capability(
    engine: ContextEngine,
) -> None:
    @checkpointer_test(name="ContextEngineSaver")
    async def factory() -> AsyncGenerator[ContextEngineSaver, None]:
        async with ContextEngineSaver(engine) as saver:
            yield saver

    report = await validate(factory)
    results = report.results
    assert set(results) == {
        "put",
        "put_writes",
        "get_tuple",
        "list",
        "delete_thread",
        "delete_for_runs",
        "copy_thread",
        "prune",
    }
    failures = {name: r.failures for name, r in results.items() if not r.passed}
    assert not failures
    assert all(r.detected and r.tests_passed > 0 for r in results.values())


# -- real graphs ----------------------------------------------------------------------------


async def test_interrupt_and_resume(engine: ContextEngine) -> None:
    def ask(state: Items) -> dict[str, list[str]]:
        name = interrupt("name?")
        return {"items": [f"hi {name}"]}

    builder = StateGraph(Items)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)

    async def scenario(saver: BaseCheckpointSaver[Any]) -> Any:
        graph = builder.compile(checkpointer=saver)
        first = await graph.ainvoke({"items": ["x"]}, cfg("t"))
        paused = await graph.aget_state(cfg("t"))
        # a graph compiled anew (another worker) resumes from what was stored
        again = builder.compile(checkpointer=saver)
        done = await again.ainvoke(Command(resume="Ada"), cfg("t"))
        states = [s async for s in again.aget_state_history(cfg("t"))]
        return (
            [i.value for i in first["__interrupt__"]],
            paused.next,
            [i.value for i in paused.interrupts],
            done,
            history(states),
        )

    got = await same_as_memory(engine, scenario)
    assert got[0] == ["name?"] and got[3] == {"items": ["x", "hi Ada"]}


async def test_a_new_engine_resumes_an_interrupted_thread(db_url: str) -> None:
    def ask(state: Items) -> dict[str, list[str]]:
        return {"items": [f"hi {interrupt('name?')}"]}

    builder = StateGraph(Items)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    settings = EngineSettings(auto_cleanup=False)
    async with ContextEngine(db_url, settings=settings) as first:
        graph = builder.compile(checkpointer=ContextEngineSaver(first))
        await graph.ainvoke({"items": []}, cfg("t"))
    async with ContextEngine(db_url, settings=settings) as second:
        graph = builder.compile(checkpointer=ContextEngineSaver(second))
        assert await graph.ainvoke(Command(resume="Bo"), cfg("t")) == {"items": ["hi Bo"]}


async def test_time_travel_from_an_earlier_checkpoint(engine: ContextEngine) -> None:
    builder = chain(3)

    async def scenario(saver: BaseCheckpointSaver[Any]) -> Any:
        graph = builder.compile(checkpointer=saver)
        await graph.ainvoke({"items": ["in"]}, cfg("t"))
        states = [s async for s in graph.aget_state_history(cfg("t"))]
        # the checkpoint after n0 ran: replay n1 and n2 from there (a fork)
        earlier = next(s for s in states if s.next == ("n1",))
        replayed = await graph.ainvoke(None, earlier.config)
        forked = await graph.aupdate_state(earlier.config, {"items": ["edited"]})
        edited = await graph.ainvoke(None, forked)
        latest = await graph.aget_state(cfg("t"))
        parent = latest.parent_config
        return (
            replayed,
            edited,
            latest.values,
            len([s async for s in graph.aget_state_history(cfg("t"))]),
            parent is not None,
        )

    got = await same_as_memory(engine, scenario)
    assert got[0] == {"items": ["in", "0", "1", "2"]}
    assert got[1] == {"items": ["in", "0", "edited", "1", "2"]}


async def test_a_failed_node_keeps_its_siblings_writes_and_they_do_not_run_again(
    engine: ContextEngine,
) -> None:
    async def scenario(saver: BaseCheckpointSaver[Any]) -> Any:
        calls = {"ok": 0, "flaky": 0}
        failing = [True]
        ok_done = asyncio.Event()

        async def ok(state: Items) -> dict[str, list[str]]:
            calls["ok"] += 1
            ok_done.set()
            return {"items": ["ok"]}

        async def flaky(state: Items) -> dict[str, list[str]]:
            calls["flaky"] += 1
            if failing[0]:
                await ok_done.wait()  # fails after its sibling succeeded
                raise RuntimeError("boom")
            return {"items": ["flaky"]}

        builder = StateGraph(Items)
        builder.add_node("ok", ok)
        builder.add_node("flaky", flaky)
        builder.add_node("join", lambda state: {"items": ["join"]})
        builder.add_edge(START, "ok")
        builder.add_edge(START, "flaky")
        builder.add_edge(["ok", "flaky"], "join")
        builder.add_edge("join", END)
        graph = builder.compile(checkpointer=saver)
        with pytest.raises(RuntimeError, match="boom"):
            await graph.ainvoke({"items": []}, cfg("t"))
        failed = await graph.aget_state(cfg("t"))
        stored = await saver.aget_tuple(cfg("t"))
        assert stored is not None and stored.pending_writes is not None
        channels = sorted(channel for _, channel, _ in stored.pending_writes)
        failing[0] = False
        done = await graph.ainvoke(None, cfg("t"))
        return (
            failed.next,
            sorted((t.name, t.error is not None) for t in failed.tasks),
            [c for c in channels if c in ("items", "__error__")],
            done,
            dict(calls),
        )

    got = await same_as_memory(engine, scenario)
    assert got[2] == ["__error__", "items"]  # the error, and ok's write, kept
    assert got[4] == {"ok": 1, "flaky": 2}  # ok did not run again
    assert sorted(got[3]["items"]) == ["flaky", "join", "ok"]


async def test_subgraphs_are_stored_under_their_namespace(engine: ContextEngine) -> None:
    def ask(state: Items) -> dict[str, list[str]]:
        return {"items": [f"hi {interrupt('name?')}"]}

    inner = StateGraph(Items)
    inner.add_node("ask", ask)
    inner.add_edge(START, "ask")
    inner.add_edge("ask", END)
    outer = StateGraph(Items)
    outer.add_node("pre", lambda state: {"items": ["pre"]})
    outer.add_node("sub", inner.compile())
    outer.add_edge(START, "pre")
    outer.add_edge("pre", "sub")
    outer.add_edge("sub", END)

    async def scenario(saver: BaseCheckpointSaver[Any]) -> Any:
        graph = outer.compile(checkpointer=saver)
        await graph.ainvoke({"items": []}, cfg("t"))
        paused = await graph.aget_state(cfg("t"), subgraphs=True)
        sub_state = paused.tasks[0].state
        assert sub_state is not None and not isinstance(sub_state, dict)
        namespace = sub_state.config["configurable"]["checkpoint_ns"]
        done = await graph.ainvoke(Command(resume="Ada"), cfg("t"))
        namespaces = {
            t.config["configurable"]["checkpoint_ns"] async for t in saver.alist(cfg("t"))
        }
        return namespace.split(":")[0], sub_state.next, done, sorted(namespaces) == ["", namespace]

    got = await same_as_memory(engine, scenario)
    assert got[0] == "sub" and got[1] == ("ask",) and got[3]
    assert await rows(engine, "ctx_graph_checkpoints") > 0
    async with engine._store.engine.connect() as conn:
        query = "SELECT count(*) FROM ctx_graph_checkpoints WHERE checkpoint_ns <> ''"
        assert (await conn.execute(text(query))).scalar_one() > 0


async def test_sixteen_threads_run_at_once_through_one_saver(engine: ContextEngine) -> None:
    saver = ContextEngineSaver(engine)
    graph = chain(5).compile(checkpointer=saver)
    threads = [f"thread-{i}" for i in range(16)]
    results = await asyncio.gather(
        *(graph.ainvoke({"items": [name]}, cfg(name)) for name in threads)
    )
    assert results == [{"items": [name, "0", "1", "2", "3", "4"]} for name in threads]
    for name in threads:
        listed = [t async for t in saver.alist(cfg(name))]
        assert len(listed) == 7  # the input, the start, then one per node
        assert {t.config["configurable"]["thread_id"] for t in listed} == {name}
    assert len([s async for s in engine.iter_sessions(tags=["langgraph"])]) == 16


async def test_processes_writing_one_thread_never_corrupt_its_history(db_url: str) -> None:
    import multiprocessing
    import time

    from tests.integrations import _langgraph_workers

    settings = EngineSettings(auto_cleanup=False)
    processes, rounds = 3, 4
    start_at = time.time() + 4  # after the spawned workers have started
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        done = pool.starmap(
            _langgraph_workers.run_on_one_thread,
            [(db_url, "shared", f"w{i}", rounds, start_at) for i in range(processes)],
        )
    assert done == [rounds] * processes
    async with ContextEngine(db_url, settings=settings) as engine:
        saver = ContextEngineSaver(engine)
        listed = [t async for t in saver.alist(cfg("shared"))]
        # each run stores its input, its start and one checkpoint per node: none lost
        assert len(listed) == processes * rounds * 5
        by_id = {t.config["configurable"]["checkpoint_id"]: t for t in listed}
        async with engine._store.engine.connect() as conn:
            query = text("SELECT channel, version FROM ctx_graph_blobs WHERE session_id = 'shared'")
            blobs = {(r[0], r[1]) for r in await conn.execute(query)}
        for t in listed:
            versions = t.checkpoint["channel_versions"]
            assert {(c, str(v)) for c, v in versions.items()} <= blobs
            if t.parent_config is not None:
                parent = by_id[t.parent_config["configurable"]["checkpoint_id"]]
                items = t.checkpoint["channel_values"].get("items", [])
                before = parent.checkpoint["channel_values"].get("items", [])
                assert items[: len(before)] == before  # a child extends its parent
        latest = await saver.aget_tuple(cfg("shared"))
        assert latest is not None and latest.checkpoint["channel_values"]["items"]


# -- sessions, retention, tenants ---------------------------------------------------------


async def test_a_thread_is_a_session_created_on_first_write(engine: ContextEngine) -> None:
    saver = ContextEngineSaver(engine)
    graph = chain(1).compile(checkpointer=saver)
    await graph.ainvoke({"items": []}, cfg("mine", user_id="ada"))
    await graph.ainvoke({"items": []}, cfg("theirs"))
    mine = await engine.get_session("mine")
    theirs = await engine.get_session("theirs")
    assert mine is not None and theirs is not None
    assert (mine.user_id, mine.tier, mine.tags) == ("ada", "enterprise", ["langgraph"])
    assert theirs.user_id == "theirs"
    assert mine.idle_timeout is None and mine.status is SessionStatus.ACTIVE
    # a session created elsewhere is used as it is
    await engine.create_session("made", "bob", tier="free", tags=["mine"])
    await graph.ainvoke({"items": []}, cfg("made", user_id="ada"))
    made = await engine.get_session("made")
    assert made is not None and (made.user_id, made.tier, made.tags) == ("bob", "free", ["mine"])
    assert made.last_activity > made.created_at  # every write touches the session


async def test_writing_to_an_ended_or_expired_thread_raises_the_engines_error(
    db_url: str, clock: FakeClock
) -> None:
    settings = EngineSettings(auto_cleanup=False)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        idle = chain(1).compile(checkpointer=ContextEngineSaver(engine, idle_timeout=60))
        graph = chain(1).compile(checkpointer=ContextEngineSaver(engine))  # never idle
        await idle.ainvoke({"items": []}, cfg("idle"))
        await graph.ainvoke({"items": []}, cfg("ended"))
        await graph.ainvoke({"items": []}, cfg("forever"))
        stored = await rows(engine, "ctx_graph_checkpoints")
        clock.advance(120)
        with pytest.raises(SessionExpiredError):
            await idle.ainvoke({"items": []}, cfg("idle"))
        await engine.end_session("ended")
        with pytest.raises(SessionNotActiveError):
            await graph.ainvoke({"items": []}, cfg("ended"))
        assert await rows(engine, "ctx_graph_checkpoints") == stored
        # reading works in any status
        assert (await graph.aget_state(cfg("ended"))).values == {"items": ["0"]}
        assert (await idle.aget_state(cfg("idle"))).values == {"items": ["0"]}
        clock.advance(10 * 365 * 24 * 3600)
        await graph.ainvoke({"items": []}, cfg("forever"))


async def test_purging_and_deleting_sessions_remove_their_checkpoints(
    engine: ContextEngine,
) -> None:
    saver = ContextEngineSaver(engine)
    graph = chain(2).compile(checkpointer=saver)
    for name in ("purged", "deleted", "kept"):
        await graph.ainvoke({"items": []}, cfg(name))
    await engine.end_session("purged")
    now = (await engine.get_session("purged")).ended_at  # type: ignore[union-attr]
    assert await engine.purge_sessions(ended_before=now + timedelta(seconds=1)) == 1
    assert await engine.delete_session("deleted")
    assert await saver.aget_tuple(cfg("purged")) is None
    assert await saver.aget_tuple(cfg("deleted")) is None
    assert await saver.aget_tuple(cfg("kept")) is not None
    async with engine._store.engine.connect() as conn:
        for table in ("ctx_graph_checkpoints", "ctx_graph_blobs", "ctx_graph_writes"):
            query = text(f"SELECT DISTINCT session_id FROM {table}")
            assert {r[0] for r in await conn.execute(query)} <= {"kept"}


async def test_delete_thread_removes_the_checkpoints_and_keeps_the_session(
    engine: ContextEngine,
) -> None:
    saver = ContextEngineSaver(engine)
    await chain(2).compile(checkpointer=saver).ainvoke({"items": []}, cfg("t"))
    await saver.adelete_thread("t")
    assert await saver.aget_tuple(cfg("t")) is None
    assert await rows(engine, "ctx_graph_blobs") == 0
    assert await engine.get_session("t") is not None


async def test_tenants_never_see_each_others_threads(engine: ContextEngine) -> None:
    a = ContextEngineSaver(engine.tenant("a"))
    b = ContextEngineSaver(engine.tenant("b"))
    run = cfg("same", run_id=str(uuid.uuid4()))
    await chain(2, tag="a").compile(checkpointer=a).ainvoke({"items": []}, run)
    assert await b.aget_tuple(cfg("same")) is None
    assert [t async for t in b.alist(None)] == []
    assert [t async for t in b.alist(cfg("same"))] == []
    await b.adelete_thread("same")
    await b.aprune(["same"], strategy="delete")
    await b.adelete_for_runs([run["configurable"]["run_id"]])
    result = await chain(1, tag="b").compile(checkpointer=b).ainvoke({"items": []}, cfg("same"))
    assert result == {"items": ["b0"]}
    mine = await a.aget_tuple(cfg("same"))
    assert mine is not None and mine.checkpoint["channel_values"]["items"] == ["a0", "a1"]
    assert len([t async for t in a.alist(None)]) == 4
    assert await engine.tenant("a").get_session("same") is not None
    assert await engine.get_session("same") is None  # nothing in the default tenant


async def test_prune_keeps_the_last_checkpoints_of_each_namespace(engine: ContextEngine) -> None:
    saver = ContextEngineSaver(engine)
    graph = chain(4).compile(checkpointer=saver)
    for thread in ("one", "three"):
        for _ in range(3):
            await graph.ainvoke({"items": ["in"]}, cfg(thread))
    before = await rows(engine, "ctx_graph_blobs")
    await saver.aprune(["one"])
    await saver.aprune(["three"], keep=3)
    one = [t async for t in saver.alist(cfg("one"))]
    three = [t async for t in saver.alist(cfg("three"))]
    assert len(one) == 1 and one[0].parent_config is None
    assert len(three) == 3
    assert await rows(engine, "ctx_graph_blobs") < before
    # the state is whole, and the thread goes on from it
    assert one[0].checkpoint["channel_values"]["items"] == ["in", "0", "1", "2", "3"] * 3
    again = await graph.ainvoke({"items": ["in"]}, cfg("one"))
    assert again["items"] == ["in", "0", "1", "2", "3"] * 4
    await saver.aprune(["three"], strategy="delete")
    assert [t async for t in saver.alist(cfg("three"))] == []
    with pytest.raises(ValidationError):
        await saver.aprune(["one"], keep=0)
    with pytest.raises(ValidationError):
        await saver.aprune(["one"], strategy="keep_some")


async def test_channel_values_are_stored_once_per_version(engine: ContextEngine) -> None:
    class Wide(TypedDict):
        counter: int
        log: Annotated[list[int], operator.add]
        a: str
        b: str
        c: str

    builder = StateGraph(Wide)
    builder.add_node("step", lambda state: {"counter": state["counter"] + 1})
    builder.add_edge(START, "step")
    builder.add_edge("step", END)
    saver = ContextEngineSaver(engine)
    graph = builder.compile(checkpointer=saver)
    start = {"counter": 0, "log": [1], "a": "x" * 100, "b": "y" * 100, "c": "z" * 100}
    counts = []
    for n in range(1, 21):
        await graph.ainvoke(start if n == 1 else {"counter": n * 10}, cfg("t"))
        counts.append(await rows(engine, "ctx_graph_blobs"))
    listed = [t async for t in saver.alist(cfg("t"))]
    named = {(c, str(v)) for t in listed for c, v in t.checkpoint["channel_versions"].items()}
    # every version named has exactly one row, written once
    assert counts[-1] == len(named)
    # each run adds the same few rows (its new versions), whatever the thread's length
    growth = {later - earlier for earlier, later in itertools.pairwise(counts[1:])}
    assert len(growth) == 1
    (per_run,) = growth
    checkpoints_per_run = len(listed) // 20
    assert per_run < checkpoints_per_run * len(start)  # unchanged channels not stored again
    final = listed[0].checkpoint["channel_values"]
    assert final["counter"] == 201 and final["a"] == "x" * 100 and final["log"] == [1]


# -- the interface --------------------------------------------------------------------------


def test_the_sync_methods_name_their_async_twin(engine: ContextEngine) -> None:
    saver = ContextEngineSaver(engine)
    calls: dict[str, Callable[[], Any]] = {
        "get": lambda: saver.get(cfg("t")),
        "get_tuple": lambda: saver.get_tuple(cfg("t")),
        "list": lambda: saver.list(cfg("t")),
        "put": lambda: saver.put(cfg("t"), {}, {}, {}),  # type: ignore[typeddict-item]
        "put_writes": lambda: saver.put_writes(cfg("t"), [], "task"),
        "delete_thread": lambda: saver.delete_thread("t"),
        "delete_for_runs": lambda: saver.delete_for_runs(["r"]),
        "copy_thread": lambda: saver.copy_thread("t", "u"),
        "prune": lambda: saver.prune(["t"]),
        "get_delta_channel_history": lambda: saver.get_delta_channel_history(
            config=cfg("t"), channels=["c"]
        ),
    }
    for name, call in calls.items():
        with pytest.raises(NotImplementedError, match=f"a{name}\\("):
            call()
    with pytest.raises(NotImplementedError, match="aget_tuple"):
        chain(1).compile(checkpointer=saver).invoke({"items": []}, cfg("t"))


async def test_bad_input_raises_a_clear_error_and_writes_nothing(engine: ContextEngine) -> None:
    saver = ContextEngineSaver(engine)
    graph = chain(2).compile(checkpointer=saver)
    with pytest.raises(ValidationError, match="thread_id is 256 characters long"):
        await graph.ainvoke({"items": []}, cfg("x" * 256))
    with pytest.raises(ValidationError, match="thread_id must not be empty"):
        await graph.ainvoke({"items": []}, cfg(""))
    with pytest.raises(ValidationError, match="user_id is 300 characters"):
        await graph.ainvoke({"items": []}, cfg("u", user_id="u" * 300))
    with pytest.raises(ValidationError, match="thread_id"):
        await saver.aget_tuple({"configurable": {}})
    with pytest.raises(ValidationError, match="thread_id is 256"):
        await saver.adelete_thread("x" * 256)
    with pytest.raises(ValidationError, match="metadata must be JSON"):
        tup = await saver.aput(cfg("m"), _checkpoint("1"), {"step": object()}, {})  # type: ignore[typeddict-item]
        assert tup is None
    assert await all_rows(engine) == 0
    assert await engine.count_sessions() == 0
    # an int thread id is its text, and comes back as given
    done = await saver.aput(cfg(7), _checkpoint("1"), {"step": 0}, {})  # type: ignore[typeddict-item]
    assert done["configurable"]["thread_id"] == 7
    assert await engine.get_session("7") is not None


async def test_a_closed_saver_refuses_calls_and_leaves_the_engine_open(
    engine: ContextEngine,
) -> None:
    async with ContextEngineSaver(engine) as saver:
        await chain(1).compile(checkpointer=saver).ainvoke({"items": []}, cfg("t"))
    with pytest.raises(RuntimeError, match="is closed"):
        await saver.aget_tuple(cfg("t"))
    assert await ContextEngineSaver(engine).aget_tuple(cfg("t")) is not None


def _checkpoint(checkpoint_id: str) -> Any:
    return {
        "v": 1,
        "id": checkpoint_id,
        "ts": "2030-01-01T00:00:00+00:00",
        "channel_values": {},
        "channel_versions": {},
        "versions_seen": {},
        "updated_channels": None,
    }


async def test_a_thread_whose_writes_wait_never_holds_up_another(pg_url: str) -> None:
    """No global lock: while another transaction holds thread "busy"'s session row, its
    writes wait, and writes of every other thread go on."""
    import asyncpg

    settings = EngineSettings(auto_cleanup=False)
    async with ContextEngine(pg_url, settings=settings) as engine:
        saver = ContextEngineSaver(engine)
        graph = chain(2).compile(checkpointer=saver)
        for name in ("busy", "free"):
            await graph.ainvoke({"items": []}, cfg(name))
        holder = await asyncpg.connect(pg_url.replace("postgresql+asyncpg", "postgresql"))
        try:
            lock = holder.transaction()
            await lock.start()
            await holder.execute("SELECT 1 FROM ctx_sessions WHERE session_id = 'busy' FOR UPDATE")
            waiting = asyncio.ensure_future(graph.ainvoke({"items": []}, cfg("busy")))
            for i in range(4):  # the other thread runs to the end, and so do new ones
                done = await asyncio.wait_for(graph.ainvoke({"items": []}, cfg(f"new-{i}")), 60)
                assert done == {"items": ["0", "1"]}
            await asyncio.wait_for(graph.ainvoke({"items": []}, cfg("free")), 60)
            assert not waiting.done()
            await lock.rollback()
            assert await asyncio.wait_for(waiting, 60) == {"items": ["0", "1"] * 2}
        finally:
            await holder.close()


async def test_copy_a_thread_then_delete_a_runs_checkpoints(engine: ContextEngine) -> None:
    saver = ContextEngineSaver(engine)
    graph = chain(2).compile(checkpointer=saver)
    # LangGraph copies the configurable's run_id into the metadata of its checkpoints
    first, second = cfg("src", run_id=str(uuid.uuid4())), cfg("src", run_id=str(uuid.uuid4()))
    await graph.ainvoke({"items": ["a"]}, first)
    await graph.ainvoke({"items": ["b"]}, second)
    await engine.create_session("other", "ada")
    await saver.acopy_thread("src", "dst")
    await saver.acopy_thread("missing", "nowhere")
    assert await engine.get_session("nowhere") is None
    copied = await engine.get_session("dst")
    assert copied is not None and copied.user_id == "src"
    source = [t.checkpoint["id"] async for t in saver.alist(cfg("src"))]
    assert [t.checkpoint["id"] async for t in saver.alist(cfg("dst"))] == source
    # the copy goes on alone
    assert (await graph.ainvoke({"items": ["c"]}, cfg("dst")))["items"][-3:] == ["c", "0", "1"]
    assert len([t async for t in saver.alist(cfg("src"))]) == len(source)
    # the second run's checkpoints go, in both threads; what is left loads whole
    await saver.adelete_for_runs([second["configurable"]["run_id"]])
    left = [t async for t in saver.alist(cfg("src"))]
    assert len(left) == len(source) // 2
    assert {t.metadata["run_id"] for t in left} == {first["configurable"]["run_id"]}
    assert left[0].checkpoint["channel_values"]["items"] == ["a", "0", "1"]
    assert (await graph.aget_state(cfg("src"))).values == {"items": ["a", "0", "1"]}
    assert (await graph.ainvoke({"items": ["d"]}, cfg("src")))["items"] == [
        *["a", "0", "1"],
        *["d", "0", "1"],
    ]
