"""``/example/echo``: answers with what it received, in TorchServe's JSON style.

A route is a :class:`flambeau.web.ApiHandler` subclass: authentication, authorization, body
size limits and error rendering happen before ``post``/``get`` run; ``setup`` receives the
route spec's ``kwargs``.
"""

from __future__ import annotations

from typing import Any

from flambeau.api import BadRequestError
from flambeau.web import ApiHandler

__all__ = ["EchoHandler"]


class EchoHandler(ApiHandler):
    """``POST`` echoes the UTF-8 body (with the configured prefix); ``GET`` the ``text`` query
    argument. Anything else is TorchServe's 405."""

    def setup(self, prefix: str = "", **kwargs: Any) -> None:
        super().setup(**kwargs)
        self.prefix = prefix

    async def get(self) -> None:
        self._answer(self.get_query_argument("text", ""))

    async def post(self) -> None:
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError:
            # A FlambeauError becomes the protocol's error body ({"code", "type", "message"}).
            raise BadRequestError("the echo route takes UTF-8 text") from None
        self._answer(text)

    def _answer(self, text: str) -> None:
        self.send_json(
            {
                "echo": self.prefix + text,
                "identity": self.identity.name if self.identity else None,
                "request_id": self.request_id,
            }
        )
