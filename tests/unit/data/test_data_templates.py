"""Chat templates and loss masks on real tokenizers with the families' real chat templates.

For every family: the ids mswift produces equal `tokenizer.apply_chat_template(...)` on the
same conversation, both when mswift uses the tokenizer's own template and when it uses its
own template on the same tokenizer without one; and the loss targets are exactly the
assistant text + end-of-turn token, written out by hand below for each family.
"""
import numpy as np
import pytest

from mswift.data import Conversation, SampleEncoder

FAMILIES = ["llama3", "llama4", "deepseek_v3", "qwen2_5", "qwen3"]

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital."},
    {"role": "user", "content": "And of Japan? 日本"},
    {"role": "assistant", "content": "Tokyo, 東京."},
]

TOOL_CHAT = [
    {"role": "user", "content": "How warm is it in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "22C"},
    {"role": "assistant", "content": "It is 22 degrees."},
]

# What each family's assistant turns generate in CHAT: content + end-of-turn token.
EXPECTED_TARGETS = {
    "llama3": ["Paris is the capital.<|eot_id|>", "Tokyo, 東京.<|eot_id|>"],
    "llama4": ["Paris is the capital.<|eot|>", "Tokyo, 東京.<|eot|>"],
    "deepseek_v3": ["Paris is the capital.<｜end▁of▁sentence｜>",
                    "Tokyo, 東京.<｜end▁of▁sentence｜>"],
    "qwen2_5": ["Paris is the capital.<|im_end|>", "Tokyo, 東京.<|im_end|>"],
    # Qwen3 gives the last turn (after the last user query) an empty thinking block.
    "qwen3": ["Paris is the capital.<|im_end|>",
              "<think>\n\n</think>\n\nTokyo, 東京.<|im_end|>"],
}

EXPECTED_TOOL_TARGETS = {
    "llama3": ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
               "It is 22 degrees.<|eot_id|>"],
    "llama4": ['<|python_start|><|python_end|>{"name": "get_weather", "parameters": '
               '{"city": "Paris"}}<|eot|>', "It is 22 degrees.<|eot|>"],
    "qwen2_5": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                '</tool_call><|im_end|>', "It is 22 degrees.<|im_end|>"],
    "qwen3": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
              '</tool_call><|im_end|>', "<think>\n\n</think>\n\nIt is 22 degrees.<|im_end|>"],
}


def reference_ids(tokenizer, messages):
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))


def target_runs(sample):
    """Token ids of each contiguous run of loss targets."""
    runs, current = [], []
    for token, is_target in zip(sample.input_ids.tolist(), sample.target_mask.tolist()):
        if is_target:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def expected_runs(tokenizer, texts):
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_template_matches_apply_chat_template(real_tokenizer, family):
    tokenizer = real_tokenizer(family)
    sample = SampleEncoder(tokenizer, template="auto").encode(Conversation(CHAT))
    assert sample.input_ids.tolist() == reference_ids(tokenizer, CHAT)
    assert target_runs(sample) == expected_runs(tokenizer, EXPECTED_TARGETS[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_own_template_matches_real_template(real_tokenizer, family):
    with_template = real_tokenizer(family)
    bare = real_tokenizer(family, with_template=False)
    assert not bare.chat_template
    own = SampleEncoder(bare, template="auto").encode(Conversation(CHAT))  # detects family
    assert own.input_ids.tolist() == reference_ids(with_template, CHAT)
    assert target_runs(own) == expected_runs(bare, EXPECTED_TARGETS[family])


@pytest.mark.parametrize("family", sorted(EXPECTED_TOOL_TARGETS))
def test_tool_turns(real_tokenizer, family):
    tokenizer = real_tokenizer(family)
    reference = reference_ids(tokenizer, TOOL_CHAT)
    expected = expected_runs(tokenizer, EXPECTED_TOOL_TARGETS[family])
    for template in ("tokenizer", family):
        sample = SampleEncoder(tokenizer, template=template).encode(Conversation(TOOL_CHAT))
        assert sample.input_ids.tolist() == reference, template
        assert target_runs(sample) == expected, template


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_loss_on_last_assistant_and_all(real_tokenizer, family):
    tokenizer = real_tokenizer(family)
    last = SampleEncoder(tokenizer, loss_on="last_assistant").encode(Conversation(CHAT))
    assert target_runs(last) == expected_runs(tokenizer, EXPECTED_TARGETS[family][-1:])
    everything = SampleEncoder(tokenizer, loss_on="all").encode(Conversation(CHAT))
    assert everything.target_mask.all()
    assert everything.input_ids.tolist() == reference_ids(tokenizer, CHAT)


def test_qwen3_multi_turn_with_reasoning(real_tokenizer):
    """An earlier turn's reasoning is dropped by the template; the last turn's is kept."""
    tokenizer = real_tokenizer("qwen3")
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "add again"},
    ]
    expected = expected_runs(tokenizer, ["4<|im_end|>",
                                         "<think>\nadd again\n</think>\n\n6<|im_end|>"])
    for template in ("tokenizer", "qwen3"):
        sample = SampleEncoder(tokenizer, template=template).encode(Conversation(messages))
        assert sample.input_ids.tolist() == reference_ids(tokenizer, messages)
        assert target_runs(sample) == expected


def test_text_rows_are_all_targets_with_eos(real_tokenizer):
    tokenizer = real_tokenizer("qwen2_5")
    sample = SampleEncoder(tokenizer).encode_text("Plain pre-training text.")
    expected = tokenizer("Plain pre-training text.")["input_ids"] + [tokenizer.eos_token_id]
    assert sample.input_ids.tolist() == expected
    assert sample.target_mask.dtype == np.bool_ and sample.target_mask.all()


def test_unknown_template_name_is_rejected(real_tokenizer):
    tokenizer = real_tokenizer("qwen2_5", with_template=False)
    with pytest.raises(ValueError, match="data.template='chatglm'"):
        SampleEncoder(tokenizer, template="chatglm").encode(Conversation(CHAT))
    with pytest.raises(ValueError, match="no chat_template"):
        SampleEncoder(tokenizer, template="tokenizer").encode(Conversation(CHAT))
