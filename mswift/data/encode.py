"""Encode examples into token ids and a per-token loss target mask.

A conversation is rendered to text by a chat template, tokenized once (so the ids are exactly
what the tokenizer gives for the whole text), and the tokens whose first character lies inside
an assistant's generated text become loss targets.

The template is the tokenizer's own `chat_template` when it has one (template="auto" or
"tokenizer"): the generated text of assistant turn i starts where the rendering of the
conversation up to turn i with `add_generation_prompt=True` ends, and runs through the first
end-of-turn token after it. Otherwise one of mswift's templates (templates.py) renders it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from mswift.data.formats import Conversation, Example, PlainText
from mswift.data.templates import OWN_TEMPLATES, ChatTemplate, Piece, template_for_vocabulary


@dataclass
class EncodedSample:
    """Token ids of one sample and, per token, whether it is a loss target."""
    input_ids: np.ndarray    # [tokens] int64
    target_mask: np.ndarray  # [tokens] bool: token t is predicted (from tokens < t) with loss

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to_state(self) -> dict:
        # torch tensors, so that a checkpoint holding it loads with torch.load(weights_only=True)
        return {"input_ids": torch.from_numpy(self.input_ids.copy()),
                "target_mask": torch.from_numpy(self.target_mask.copy())}

    @classmethod
    def from_state(cls, state: dict) -> "EncodedSample":
        return cls(state["input_ids"].numpy().astype(np.int64),
                   state["target_mask"].numpy().astype(bool))


class TokenizerTemplate(ChatTemplate):
    """The tokenizer's own Jinja chat template, with assistant spans found by prefix renders."""
    name = "tokenizer"

    def __init__(self, tokenizer, end_of_turn: Optional[str] = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='tokenizer' but the tokenizer has no chat_template")
        self.tokenizer = tokenizer
        self.end_of_turn = end_of_turn or tokenizer.eos_token
        if not self.end_of_turn:
            raise ValueError("the tokenizer has no eos_token: name the end-of-turn token")

    def _render(self, messages: list[dict], tools, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)

    def render(self, messages: list[dict], tools=None) -> list[Piece]:
        full = self._render(messages, tools, False)
        pieces, cursor = [], 0
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:index], tools, True)
            if not full.startswith(prompt) or len(prompt) < cursor:
                raise ValueError(
                    f"the tokenizer's chat template does not render message {index} after the "
                    "generation prompt of the messages before it; use one of mswift's "
                    f"templates ({', '.join(OWN_TEMPLATES)}) instead")
            end = full.find(self.end_of_turn, len(prompt))
            if end < 0:
                raise ValueError(f"no end-of-turn token {self.end_of_turn!r} after assistant "
                                 f"message {index} in the rendered chat")
            end += len(self.end_of_turn)
            pieces += [Piece(full[cursor:len(prompt)]), Piece(full[len(prompt):end], index)]
            cursor = end
        pieces.append(Piece(full[cursor:]))
        return pieces


def resolve_template(tokenizer, name: str = "auto") -> ChatTemplate:
    """The chat template named by PipelineOptions.template for this tokenizer."""
    if name == "tokenizer" or (name == "auto" and getattr(tokenizer, "chat_template", None)):
        return TokenizerTemplate(tokenizer)
    if name == "auto":
        name = template_for_vocabulary(tokenizer.get_vocab())
        if name is None:
            raise ValueError("the tokenizer has no chat_template and no special tokens of a known "
                             f"family: set data.template to one of {', '.join(OWN_TEMPLATES)}")
    if name not in OWN_TEMPLATES:
        raise ValueError(f"data.template={name!r}: expected auto, tokenizer or one of "
                         f"{', '.join(OWN_TEMPLATES)}")
    template_class = OWN_TEMPLATES[name]
    bos = getattr(tokenizer, "bos_token", None)
    if name in ("llama3", "llama4", "deepseek_v3") and bos:
        return template_class(bos_token=bos)
    return template_class()


class SampleEncoder:
    """Turns examples into EncodedSample with the loss placement chosen by `loss_on`."""

    def __init__(self, tokenizer, template: str = "auto", loss_on: str = "assistant",
                 append_eos: bool = True):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("mswift needs a fast (Rust) tokenizer: it reads token offsets")
        self.tokenizer = tokenizer
        self.template_name = template
        self._template: Optional[ChatTemplate] = None
        self.loss_on = loss_on
        self.append_eos = append_eos

    @property
    def template(self) -> ChatTemplate:
        # Resolved on first use so that pre-training data needs no chat template at all.
        if self._template is None:
            self._template = resolve_template(self.tokenizer, self.template_name)
        return self._template

    def encode(self, example: Example) -> EncodedSample:
        if isinstance(example, PlainText):
            return self.encode_text(example.text)
        return self.encode_conversation(example)

    def encode_text(self, text: str) -> EncodedSample:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.append_eos and self.tokenizer.eos_token_id is not None:
            ids = ids + [self.tokenizer.eos_token_id]
        input_ids = np.asarray(ids, dtype=np.int64)
        return EncodedSample(input_ids, np.ones(len(input_ids), dtype=bool))

    def encode_conversation(self, conversation: Conversation) -> EncodedSample:
        template = self.template
        if isinstance(template, TokenizerTemplate):
            pieces = template.render(conversation.messages, conversation.tools)
        elif conversation.tools:
            raise ValueError(f"the {template.name} template of mswift does not render tool "
                             "definitions; use a tokenizer with its own chat_template")
        else:
            pieces = template.render(conversation.messages)
        return self.encode_pieces(pieces)

    def encode_pieces(self, pieces: list[Piece]) -> EncodedSample:
        text = "".join(piece.text for piece in pieces)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        starts = np.asarray([start for start, _ in encoded["offset_mapping"]], dtype=np.int64)
        char_target = np.zeros(len(text) + 1, dtype=bool)
        for begin, end in self._target_spans(pieces):
            char_target[begin:end] = True
        return EncodedSample(input_ids, char_target[starts])

    def _target_spans(self, pieces: list[Piece]) -> list[tuple[int, int]]:
        turns = [piece.turn for piece in pieces if piece.turn is not None]
        if self.loss_on == "all":
            return [(0, sum(len(piece.text) for piece in pieces))]
        last_turn = max(turns) if turns else None
        spans, position = [], 0
        for piece in pieces:
            end = position + len(piece.text)
            wanted = piece.turn is not None and (
                self.loss_on == "assistant" or piece.turn == last_turn)
            if wanted:
                spans.append((position, end))
            position = end
        return spans
