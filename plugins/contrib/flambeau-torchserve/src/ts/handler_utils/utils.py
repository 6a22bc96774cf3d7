"""``ts.handler_utils.utils``: ``send_intermediate_predict_response`` for streaming handlers.

Each call sends one chunk per request of the batch before the handler returns; flambeau turns
them into a chunked HTTP response (or a gRPC stream), as TorchServe does.
"""

from __future__ import annotations

from flambeau.handler.utils import send_intermediate_predict_response

__all__ = ["send_intermediate_predict_response"]
