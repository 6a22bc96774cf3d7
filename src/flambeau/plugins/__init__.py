"""flambeau plugins."""
