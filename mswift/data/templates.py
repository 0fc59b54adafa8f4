"""mswift's own chat templates, for tokenizers that ship none.

Each template renders a checked conversation (see formats.py) into text pieces, marking the
pieces an assistant turn generates: everything after the generation prompt up to and
including the end-of-turn token. They reproduce the families' official Jinja templates
character for character (tests compare them with `apply_chat_template` on real tokenizers):

- llama3: Llama-3.1 / 3.3 Instruct (system header with the knowledge-cutoff date lines);
- llama4: Llama-4 Scout / Maverick Instruct;
- deepseek_v3: DeepSeek-V3 (Dec 2024 release);
- qwen2_5: Qwen2.5 Instruct (ChatML with the default Qwen system prompt);
- qwen3: Qwen3 (ChatML, <think> block on assistant turns after the last user query).

Tool definitions ("tools" in a row) are rendered only by a tokenizer's own chat template.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class Piece:
    """A stretch of rendered text; `turn` is the index of the assistant message that
    generates it, or None for prompt text."""
    text: str
    turn: Optional[int] = None


def to_json(value: Any) -> str:
    """What the `tojson` filter of transformers' chat-template environment writes."""
    return json.dumps(value, ensure_ascii=False)


class ChatTemplate:
    name = ""
    end_of_turn = ""

    def render(self, messages: list[dict]) -> list[Piece]:
        raise NotImplementedError


def _call_function(call: dict) -> dict:
    return call["function"] if "function" in call else call


class Llama3Template(ChatTemplate):
    name = "llama3"
    end_of_turn = "<|eot_id|>"

    def __init__(self, bos_token: str = "<|begin_of_text|>", date_string: str = "26 Jul 2024"):
        self.bos_token = bos_token
        self.date_string = date_string

    @staticmethod
    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def render(self, messages: list[dict]) -> list[Piece]:
        system = ""
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), messages[1:]
            offset = 1
        else:
            offset = 0
        pieces = [Piece(self.bos_token + self.header("system") + "Cutting Knowledge Date: "
                        f"December 2023\nToday Date: {self.date_string}\n\n{system}<|eot_id|>")]
        for index, message in enumerate(messages, start=offset):
            role, content = message["role"], message["content"]
            if role == "assistant":
                pieces.append(Piece(self.header("assistant")))
                pieces.append(Piece(self._assistant_text(message) + "<|eot_id|>", index))
            elif role == "tool":
                pieces.append(Piece(self.header("ipython") + to_json(content) + "<|eot_id|>"))
            else:
                pieces.append(Piece(self.header(role) + content.strip() + "<|eot_id|>"))
        return pieces

    @staticmethod
    def _assistant_text(message: dict) -> str:
        if "tool_calls" not in message:
            return message["content"].strip()
        if len(message["tool_calls"]) != 1:
            raise ValueError("the Llama-3 template supports one tool call per assistant turn")
        function = _call_function(message["tool_calls"][0])
        return (f'{{"name": "{function["name"]}", "parameters": '
                f'{to_json(function.get("arguments"))}}}')


class Llama4Template(ChatTemplate):
    name = "llama4"
    end_of_turn = "<|eot|>"

    def __init__(self, bos_token: str = "<|begin_of_text|>"):
        self.bos_token = bos_token

    @staticmethod
    def header(role: str) -> str:
        return f"<|header_start|>{role}<|header_end|>\n\n"

    def render(self, messages: list[dict]) -> list[Piece]:
        pieces = [Piece(self.bos_token)]
        offset = 0
        if messages[0]["role"] == "system":
            pieces.append(Piece(self.header("system") + messages[0]["content"].strip()
                                + "<|eot|>"))
            messages, offset = messages[1:], 1
        for index, message in enumerate(messages, start=offset):
            role, content = message["role"], message["content"]
            if role == "assistant":
                pieces.append(Piece(self.header("assistant")))
                pieces.append(Piece(self._assistant_text(message) + "<|eot|>", index))
            elif role == "tool":
                pieces.append(Piece(self.header("ipython") + to_json(content) + "<|eot|>"))
            else:
                pieces.append(Piece(self.header(role) + content + "<|eot|>"))
        return pieces

    @staticmethod
    def _assistant_text(message: dict) -> str:
        content = message["content"] or ""
        if not message.get("tool_calls"):
            return content
        calls = "".join(
            f'{{"name": "{function["name"]}", "parameters": {to_json(function.get("arguments"))}}}'
            for function in map(_call_function, message["tool_calls"]))
        return f"<|python_start|>{content}<|python_end|>{calls}"


class DeepSeekV3Template(ChatTemplate):
    """DeepSeek-V3. Tool calls are closed after the last call, as the model emits them."""
    name = "deepseek_v3"
    end_of_turn = "<｜end▁of▁sentence｜>"

    def __init__(self, bos_token: str = "<｜begin▁of▁sentence｜>"):
        self.bos_token = bos_token

    def render(self, messages: list[dict]) -> list[Piece]:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        pieces = [Piece(self.bos_token + system)]
        after_tool_output, first_output = False, True
        for index, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "user":
                after_tool_output = False
                pieces.append(Piece("<｜User｜>" + content))
            elif role == "assistant":
                opener = "<｜tool▁outputs▁end｜>" if after_tool_output else "<｜Assistant｜>"
                pieces.append(Piece(opener))
                pieces.append(Piece(self._assistant_text(message) + self.end_of_turn, index))
                after_tool_output = False
            elif role == "tool":
                after_tool_output = True
                opener = "<｜tool▁outputs▁begin｜>" if first_output else "\n"
                first_output = False
                pieces.append(Piece(f"{opener}<｜tool▁output▁begin｜>{content}<｜tool▁output▁end｜>"))
        return pieces

    @staticmethod
    def _assistant_text(message: dict) -> str:
        if not message.get("tool_calls"):
            return message["content"]
        calls = []
        for call in message["tool_calls"]:
            function = _call_function(call)
            arguments = function.get("arguments")
            if not isinstance(arguments, str):
                arguments = to_json(arguments)
            calls.append(f"<｜tool▁call▁begin｜>{call.get('type', 'function')}<｜tool▁sep｜>"
                         f"{function['name']}\n```json\n{arguments}\n```<｜tool▁call▁end｜>")
        return (message["content"] or "") + "<｜tool▁calls▁begin｜>" + "\n".join(calls) + \
            "<｜tool▁calls▁end｜>"


class ChatMLTemplate(ChatTemplate):
    """Qwen2.5 Instruct (ChatML)."""
    name = "qwen2_5"
    end_of_turn = "<|im_end|>"
    default_system: Optional[str] = \
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

    def render(self, messages: list[dict]) -> list[Piece]:
        pieces = []
        offset = 0
        if messages[0]["role"] == "system":
            pieces.append(Piece(f"<|im_start|>system\n{messages[0]['content']}<|im_end|>\n"))
            offset = 1
        elif self.default_system is not None:
            pieces.append(Piece(f"<|im_start|>system\n{self.default_system}<|im_end|>\n"))
        for index in range(offset, len(messages)):
            role = messages[index]["role"]
            if role == "assistant":
                pieces.append(Piece("<|im_start|>assistant\n"))
                pieces.append(Piece(self.assistant_text(messages, index) + "<|im_end|>", index))
                pieces.append(Piece("\n"))
            elif role == "tool":
                pieces.append(Piece(self._tool_text(messages, index)))
            else:
                pieces.append(Piece(f"<|im_start|>{role}\n{messages[index]['content']}"
                                    "<|im_end|>\n"))
        return pieces

    def assistant_text(self, messages: list[dict], index: int) -> str:
        message = messages[index]
        content = message["content"] or ""
        return content + self.tool_call_text(message, content)

    @staticmethod
    def tool_call_text(message: dict, content: str, raw_string_arguments: bool = False) -> str:
        text = ""
        for number, call in enumerate(message.get("tool_calls") or []):
            function = _call_function(call)
            arguments = function.get("arguments")
            if not (raw_string_arguments and isinstance(arguments, str)):
                arguments = to_json(arguments)
            separator = "\n" if (content or number > 0) else ""
            text += (f'{separator}<tool_call>\n{{"name": "{function["name"]}", "arguments": '
                     f'{arguments}}}\n</tool_call>')
        return text

    @staticmethod
    def _tool_text(messages: list[dict], index: int) -> str:
        text = ""
        if index == 0 or messages[index - 1]["role"] != "tool":
            text += "<|im_start|>user"
        text += f"\n<tool_response>\n{messages[index]['content']}\n</tool_response>"
        if index == len(messages) - 1 or messages[index + 1]["role"] != "tool":
            text += "<|im_end|>\n"
        return text


class Qwen3Template(ChatMLTemplate):
    """Qwen3: no default system prompt; assistant turns after the last user query carry a
    <think> block (empty when the row has no reasoning)."""
    name = "qwen3"
    default_system = None

    def render(self, messages: list[dict]) -> list[Piece]:
        self._last_query = self._last_query_index(messages)
        return super().render(messages)

    @staticmethod
    def _last_query_index(messages: list[dict]) -> int:
        for index in range(len(messages) - 1, -1, -1):
            message = messages[index]
            content = message["content"]
            if message["role"] == "user" and isinstance(content, str) and not (
                    content.startswith("<tool_response>")
                    and content.endswith("</tool_response>")):
                return index
        return len(messages) - 1

    def assistant_text(self, messages: list[dict], index: int) -> str:
        message = messages[index]
        content = message["content"] if isinstance(message["content"], str) else ""
        reasoning = message.get("reasoning_content")
        if not isinstance(reasoning, str):
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1]
                reasoning = reasoning.lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
        is_last = index == len(messages) - 1
        if index > self._last_query and (is_last or reasoning):
            text = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}"
        else:
            text = content
        return text + self.tool_call_text(message, content, raw_string_arguments=True)


OWN_TEMPLATES = {
    "llama3": Llama3Template,
    "llama4": Llama4Template,
    "deepseek_v3": DeepSeekV3Template,
    "qwen2_5": ChatMLTemplate,
    "qwen3": Qwen3Template,
}

# A special token only one family's vocabulary has -> that family's template.
_FAMILY_MARKERS = (
    ("<|header_start|>", "llama4"),
    ("<|start_header_id|>", "llama3"),
    ("<｜Assistant｜>", "deepseek_v3"),
    ("<think>", "qwen3"),
    ("<|im_start|>", "qwen2_5"),
)


def template_for_vocabulary(vocabulary: dict[str, int]) -> Optional[str]:
    """Name of the mswift template whose special tokens the vocabulary holds, or None."""
    for marker, name in _FAMILY_MARKERS:
        if marker in vocabulary:
            return name
    return None
