"""ragloom ui package."""
