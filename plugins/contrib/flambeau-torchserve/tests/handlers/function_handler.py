"""A TorchServe module-function handler (--handler function_handler.py:predict)."""


def predict(data, context):
    if data is None:  # TorchServe initialises a function handler with data=None
        return None
    answers = []
    for idx, row in enumerate(data):
        text = row.get("data") or row.get("body")
        if isinstance(text, (bytes, bytearray)):
            text = text.decode()
        answers.append(
            {
                "model": context.model_name,
                "echo": text.upper(),
                "batch_size": context.system_properties["batch_size"],
                "has_request_id": bool(context.get_request_id(idx)),
            }
        )
    return answers
