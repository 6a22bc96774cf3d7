"""``ts.protocol``: kept for the old import path of the streaming helper."""
