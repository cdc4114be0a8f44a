"""Session backends for agent frameworks, imported only when used.

- :mod:`ctxengine.integrations.openai_agents` (extra ``openai-agents``)
- :mod:`ctxengine.integrations.adk` (extra ``adk``)
"""
