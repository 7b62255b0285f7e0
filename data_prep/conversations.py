"""Conversation rows: ``{"messages": [{"role": ..., "content": ...}, ...], "system": "..."?}``.

The row parser of ``chat`` (see sources.py): a valid row becomes a ``Conversation``, anything
else a ``BadDocument`` saying what is wrong (the reader adds file:line or the dataset row).
Roles: system, user, assistant, tool; content a string. Keys of a message other than role and
content (``name``, ``tool_call_id``, ...) go to the template as they are; keys set to null are
left out, because `datasets` fills every key of any message into all of them. A ``system``
string becomes a first system message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .sources import BadDocument

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, Any]]
    origin: str

    @property
    def chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages)


def _message(value: Any, i: int) -> dict[str, Any] | str:
    """The message, or what is wrong with it."""
    where = f"messages[{i}]"
    if not isinstance(value, dict):
        return f"{where} is {type(value).__name__}, not an object with role and content"
    message = {k: v for k, v in value.items() if v is not None}
    for key in ("role", "content"):
        if key not in message:
            return f"{where} has no {key!r}"
    if message["role"] not in ROLES:
        return f"{where}: unknown role {message['role']!r} (known: {', '.join(ROLES)})"
    if not isinstance(message["content"], str):
        return f"{where}: content is {type(message['content']).__name__}, not a string"
    return message


def parse_conversation(row: Any, origin: str) -> Conversation | BadDocument:
    if not isinstance(row, dict):
        return BadDocument(origin, f"not a JSON object: {type(row).__name__}")
    if row.get("messages") is None:
        return BadDocument(origin, f"missing field 'messages': keys {sorted(row)[:8]}")
    if not isinstance(row["messages"], list):
        return BadDocument(origin, f"field 'messages' is {type(row['messages']).__name__}, not a list")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        return BadDocument(origin, f"field 'system' is {type(system).__name__}, not a string")
    messages = []
    for i, value in enumerate(row["messages"]):
        message = _message(value, i)
        if isinstance(message, str):
            return BadDocument(origin, message)
        messages.append(message)
    if system:
        if messages and messages[0]["role"] == "system":
            return BadDocument(origin, "both a 'system' field and a first system message")
        messages.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in messages):
        return BadDocument(origin, "no assistant message: nothing to train on")
    return Conversation(messages, origin)
