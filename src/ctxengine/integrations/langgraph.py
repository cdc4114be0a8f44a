"""LangGraph on ctxengine (the extra ``langgraph``).

    from ctxengine.integrations.langgraph import ContextEngineSaver

    saver = ContextEngineSaver(engine)
    graph = builder.compile(checkpointer=saver)
    await graph.ainvoke(inputs, {"configurable": {"thread_id": "conversation-42"}})

:class:`ContextEngineSaver` is a checkpointer: each thread is an engine session.
"""

from ._langgraph_saver import ContextEngineSaver
from ._langgraph_store import ContextEngineStore

__all__ = ["ContextEngineSaver", "ContextEngineStore"]
