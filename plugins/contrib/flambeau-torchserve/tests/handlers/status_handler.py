"""A TorchServe class handler that sets its own status, reason, headers and content type."""

from ts.torch_handler.base_handler import BaseHandler


class StatusHandler(BaseHandler):
    def initialize(self, context):
        self.context = context
        self.initialized = True  # no model: this handler only shapes responses

    def handle(self, data, context):
        for idx, _row in enumerate(data):
            context.set_response_status(201, "Created", idx)
            context.set_response_header(idx, "X-Compat-Handler", "status")
            context.set_response_content_type(idx, "text/plain")
        return ["created" for _ in data]
