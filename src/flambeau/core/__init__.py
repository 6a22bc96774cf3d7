"""flambeau core."""
