"""Graphs of plain Python nodes for the LangGraph checkpointer tests, and code run in
spawned child processes."""

from __future__ import annotations

import asyncio
import operator
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph

from ctxengine import ContextEngine, EngineSettings


class Items(TypedDict):
    """A list every node appends to."""

    items: Annotated[list[str], operator.add]


def chain(steps: int, tag: str = "") -> StateGraph[Items, Any, Items, Items]:
    """START → n0 → n1 → … → END; node i appends ``f"{tag}{i}"``."""
    graph = StateGraph(Items)
    previous = START
    for i in range(steps):

        def node(state: Items, i: int = i) -> dict[str, list[str]]:
            return {"items": [f"{tag}{i}"]}

        graph.add_node(f"n{i}", node)
        graph.add_edge(previous, f"n{i}")
        previous = f"n{i}"
    graph.add_edge(previous, END)
    return graph


def run_on_one_thread(url: str, thread_id: str, writer: str, rounds: int, start_at: float) -> int:
    """From ``start_at`` (epoch seconds, shared by the writers), run a 3-node chain
    ``rounds`` times on ``thread_id``; how many runs completed."""
    import time

    from ctxengine.integrations.langgraph import ContextEngineSaver

    settings = EngineSettings(auto_cleanup=False, auto_migrate=False)

    async def main() -> int:
        done = 0
        async with ContextEngine(url, settings=settings) as engine:
            saver = ContextEngineSaver(engine)
            graph = chain(3, tag=f"{writer}-").compile(checkpointer=saver)
            config: Any = {"configurable": {"thread_id": thread_id}}
            await saver.aget_tuple(config)  # connected before the start
            await asyncio.sleep(max(start_at - time.time(), 0))
            for _ in range(rounds):
                await graph.ainvoke({"items": [f"{writer}-in"]}, config)
                done += 1
        return done

    return asyncio.run(main())
