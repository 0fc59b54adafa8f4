"""Row formats: turn one dataset row into a checked conversation or a pre-training text.

Formats (detected per row with row_format="auto", or declared):
- messages: {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}
  (OpenAI chat; an assistant turn may carry "tool_calls" and "reasoning_content"); an optional
  "tools" list is passed to the chat template;
- sharegpt: {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": ...}, ...]};
- alpaca: {"instruction": ..., "input": ..., "output": ...} (optional "system");
- text: {"text": ...} for pre-training (the key is configurable).

Every problem raises BadRowError naming the file and line, so the reader can either stop
or skip and count the row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant",
    "assistant": "assistant", "tool": "tool", "observation": "tool", "function": "tool",
}


class BadRowError(ValueError):
    """A row that cannot become a sample; `where` is "FILE:LINE"."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclass
class Conversation:
    """A checked chat: system (optional, first), then user/assistant/tool turns."""
    messages: list[dict[str, Any]]
    tools: Optional[list[Any]] = None


@dataclass
class PlainText:
    """A pre-training document."""
    text: str


Example = Union[Conversation, PlainText]


def detect_row_format(row: dict, text_key: str) -> Optional[str]:
    """The format a row looks like, or None."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if text_key in row:
        return "text"
    return None


def row_to_example(row: Any, row_format: str, text_key: str, where: str) -> Example:
    """Check `row` and turn it into a Conversation or PlainText; BadRowError if it can't."""
    if not isinstance(row, dict):
        raise BadRowError(where, f"row is a {type(row).__name__}, expected a JSON object")
    fmt = row_format
    if fmt == "auto":
        fmt = detect_row_format(row, text_key)
        if fmt is None:
            raise BadRowError(
                where, f"no known format: expected one of the keys 'messages', "
                f"'conversations', 'instruction'+'output' or {text_key!r}; found {sorted(row)}")
    if fmt == "text":
        return _text_example(row, text_key, where)
    if fmt == "messages":
        messages = _openai_messages(row, where)
    elif fmt == "sharegpt":
        messages = _sharegpt_messages(row, where)
    elif fmt == "alpaca":
        messages = _alpaca_messages(row, where)
    else:
        raise ValueError(f"unknown row format {row_format!r}")
    tools = row.get("tools") or None
    if tools is not None and not isinstance(tools, list):
        raise BadRowError(where, f"'tools' is a {type(tools).__name__}, expected a list")
    check_conversation(messages, where)
    return Conversation(messages=messages, tools=tools)


def _text_example(row: dict, text_key: str, where: str) -> PlainText:
    if text_key not in row:
        raise BadRowError(where, f"missing field {text_key!r}")
    text = row[text_key]
    if not isinstance(text, str):
        raise BadRowError(where, f"field {text_key!r} is a {type(text).__name__}, expected text")
    if not text.strip():
        raise BadRowError(where, f"field {text_key!r} is empty")
    return PlainText(text)


def _openai_messages(row: dict, where: str) -> list[dict]:
    raw = row.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRowError(where, "'messages' must be a non-empty list")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadRowError(where, f"messages[{index}] is not an object")
        if "role" not in message:
            raise BadRowError(where, f"messages[{index}] has no 'role'")
        clean = {"role": message["role"], "content": message.get("content")}
        for key in ("tool_calls", "reasoning_content", "name"):
            if message.get(key):
                clean[key] = message[key]
        messages.append(clean)
    return messages


def _sharegpt_messages(row: dict, where: str) -> list[dict]:
    raw = row.get("conversations")
    if not isinstance(raw, list) or not raw:
        raise BadRowError(where, "'conversations' must be a non-empty list")
    messages = []
    if isinstance(row.get("system"), str) and row["system"]:
        messages.append({"role": "system", "content": row["system"]})
    for index, turn in enumerate(raw):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRowError(where, f"conversations[{index}] needs 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise BadRowError(
                where, f"conversations[{index}] has from={turn['from']!r}: expected one of "
                f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _alpaca_messages(row: dict, where: str) -> list[dict]:
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise BadRowError(where, f"missing or non-text field {key!r}")
    prompt = row["instruction"]
    extra_input = row.get("input")
    if isinstance(extra_input, str) and extra_input.strip():
        prompt = f"{prompt}\n\n{extra_input}"
    messages = []
    if isinstance(row.get("system"), str) and row["system"]:
        messages.append({"role": "system", "content": row["system"]})
    messages += [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": row["output"]}]
    return messages


def check_conversation(messages: list[dict], where: str) -> None:
    """Roles and contents a chat template can render; raises BadRowError otherwise."""
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise BadRowError(where, f"message {index} has role {role!r}: expected one of "
                                     f"{', '.join(CHAT_ROLES)}")
        if role == "system" and index != 0:
            raise BadRowError(where, f"message {index}: a system message may only come first")
        if content is not None and not isinstance(content, str):
            raise BadRowError(where, f"message {index} ({role}) content is a "
                                     f"{type(content).__name__}, expected text")
        if role == "assistant":
            _check_assistant(message, index, where)
        elif content is None or (role == "user" and not content.strip()):
            raise BadRowError(where, f"message {index} ({role}) is empty")
        if role == "tool" and (index == 0 or messages[index - 1]["role"] not in ("assistant",
                                                                                    "tool")):
            raise BadRowError(where, f"message {index}: a tool result must follow an "
                                     "assistant turn or another tool result")
    chat = [m for m in messages if m["role"] != "system"]
    if not chat or chat[0]["role"] != "user":
        raise BadRowError(where, "the first message after the system prompt must be a user turn")
    if messages[-1]["role"] != "assistant":
        raise BadRowError(where, f"the last message is a {messages[-1]['role']} turn, "
                                 "expected an assistant turn to learn from")


def _check_assistant(message: dict, index: int, where: str) -> None:
    content = message["content"]
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list) or not all(
                isinstance(call, dict) and isinstance(call.get("function"), dict)
                and isinstance(call["function"].get("name"), str) for call in tool_calls):
            raise BadRowError(where, f"message {index}: tool_calls must be a list of "
                                     "{'type': 'function', 'function': {'name', 'arguments'}}")
        return
    if content is None or not content.strip():
        raise BadRowError(where, f"message {index} is an empty assistant turn")
