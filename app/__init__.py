"""ragloom app package."""
