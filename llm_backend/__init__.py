"""ragloom llm_backend package."""
