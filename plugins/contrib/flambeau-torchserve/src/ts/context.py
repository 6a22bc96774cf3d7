"""``ts.context``: the Context a handler receives and its per-request RequestProcessor.

Both are flambeau's own (:mod:`flambeau.handler.context`), which keep TorchServe's surface.
"""

from __future__ import annotations

from flambeau.handler.context import Context, RequestProcessor

__all__ = ["Context", "RequestProcessor"]
