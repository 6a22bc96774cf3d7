"""``ts.protocol.otf_message_handler``: the old home of ``send_intermediate_predict_response``.

Only that function is provided: flambeau's workers speak their own frames, so TorchServe's
frame encoders (``create_predict_response``, ``retrieve_msg``...) have no meaning here.
"""

from __future__ import annotations

from flambeau.handler.utils import send_intermediate_predict_response

__all__ = ["send_intermediate_predict_response"]
