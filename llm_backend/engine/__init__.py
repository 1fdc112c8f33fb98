"""ragloom llm_backend/engine package."""
