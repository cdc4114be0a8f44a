"""LangGraph on ctxengine (the extra ``langgraph``).

    from ctxengine.integrations.langgraph import ContextEngineSaver, ContextEngineStore

    saver = ContextEngineSaver(engine)
    store = ContextEngineStore(engine)
    graph = builder.compile(checkpointer=saver, store=store)
    await graph.ainvoke(inputs, {"configurable": {"thread_id": "conversation-42"}})

:class:`ContextEngineSaver` is a checkpointer: each thread is an engine session.
:class:`ContextEngineStore` is a long-term store on the engine's memory (SPEC §13).
"""

from ._langgraph_saver import ContextEngineSaver
from ._langgraph_store import ContextEngineStore

__all__ = ["ContextEngineSaver", "ContextEngineStore"]
