"""ragloom eval package."""
