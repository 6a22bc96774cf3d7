"""``ts.handler_utils.timer``: the ``timed`` decorator for handler methods.

With model-config ``handler: {profile: true}`` a decorated method's duration is recorded as
metric ``ts_handler_<method>`` in milliseconds; otherwise it costs one dict lookup.
"""

from __future__ import annotations

from flambeau.handler.utils import timed

__all__ = ["timed"]
