"""flambeau envelopes."""
