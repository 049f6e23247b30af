"""Provider repositories (OpenRouter, Anthropic, Claude Agent SDK) and the SQL job store.

Repositories never import actors or settings: they take plain constructor arguments.
"""
