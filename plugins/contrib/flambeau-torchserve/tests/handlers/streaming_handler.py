"""A TorchServe streaming handler: one chunk per word, sent before the handler returns."""

from ts.handler_utils.utils import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    text = data[0].get("data") or data[0].get("body")
    if isinstance(text, (bytes, bytearray)):
        text = text.decode()
    words = text.split()
    for word in words[:-1]:
        send_intermediate_predict_response(
            [word + " "], context.request_ids, "Intermediate Prediction success", 200, context
        )
    return [words[-1]]
