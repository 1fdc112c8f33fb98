"""ragloom retrieval package."""
