"""``ts.handler_utils``: streaming (``utils``) and handler timing (``timer``) helpers."""
