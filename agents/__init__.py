"""ragloom agents package."""
