"""Java ``.properties`` text, as TorchServe's config.properties and snapshots use it.

Shared by the core (the server's configuration) and the snapshot plugin (snapshot files).
"""

from __future__ import annotations

import re


def parse_properties(text: str) -> dict[str, str]:
    """Parse Java ``.properties`` text: ``=``/``:`` separators, ``#``/``!`` comments, ``\\``
    continuation lines."""
    props: dict[str, str] = {}
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.lstrip()
        if not pending and (not line or line[0] in "#!"):
            continue
        # An odd number of trailing backslashes continues the line.
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:
            pending += line[:-1]
            continue
        logical.append(pending + line)
        pending = ""
    if pending:
        logical.append(pending)
    for line in logical:
        # The key ends at the first unescaped separator; one '=' or ':' may follow blanks.
        match = re.match(r"((?:\\.|[^=:\s\\])*)\s*(?:[=:]\s*)?(.*)$", line, re.S)
        key, value = (match.group(1), match.group(2)) if match else (line, "")
        props[_unescape(key)] = _unescape(value)
    return props


_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _unescape(text: str) -> str:
    """Java's escapes: ``\\t \\n \\r \\f``, ``\\uXXXX``, and ``\\X`` for any other X
    (``http\\://host`` as TorchServe writes snapshots)."""
    if "\\" not in text:
        return text

    def repl(match: re.Match[str]) -> str:
        escaped = match.group(1)
        if escaped.startswith("u") and len(escaped) == 5:
            return chr(int(escaped[1:], 16))
        return _ESCAPES.get(escaped[0], escaped[0])

    return re.sub(r"\\(u[0-9a-fA-F]{4}|.)", repl, text)
