"""Which text the selector scores against: the query rule of qtsplus_vllm.question."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from qtsplus_vllm.question import DEFAULT_QUESTION, extract_question_ids, extract_question_text
from qtsplus_vllm.testing import write_tiny_checkpoint

V = "<|vision_start|><|video_pad|><|vision_end|>"
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
ASSISTANT = "<|im_start|>assistant\n"


def user(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n"


@pytest.mark.parametrize(
    "prompt, expected",
    [
        (SYSTEM + user(V + "What is moving?") + ASSISTANT, "What is moving?"),  # text after the video
        (SYSTEM + user("What is moving? " + V) + ASSISTANT, "What is moving?"),  # text before it
        (
            SYSTEM + user("First look. " + V + "Then: what moves?") + ASSISTANT,
            "First look. Then: what moves?",
        ),
        (SYSTEM + user(V + "\nWhat is moving?") + ASSISTANT, "What is moving?"),  # vLLM "string" format
        (SYSTEM + user(V) + ASSISTANT, DEFAULT_QUESTION),  # a turn with no text
        (SYSTEM + user("   \n ") + ASSISTANT, DEFAULT_QUESTION),
        # multi-turn: the last user turn, the one being answered
        (
            SYSTEM
            + user(V + "What is moving?")
            + ASSISTANT
            + "A square.<|im_end|>\n"
            + user("Which colour is it?")
            + ASSISTANT,
            "Which colour is it?",
        ),
        # the system prompt is never the query
        (
            "<|im_start|>system\nLook for dogs.<|im_end|>\n" + user(V + "Count the cars.") + ASSISTANT,
            "Count the cars.",
        ),
        # a raw completion prompt: the whole text
        (V + "Describe the motion.", "Describe the motion."),
    ],
)
def test_query_rule(prompt, expected):
    assert extract_question_text(prompt) == expected


def test_ids_are_the_question_tokens_without_specials(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(str(model))
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is moving?"}]}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert extract_question_ids(ids, tok) == tok("What is moving?", add_special_tokens=False)["input_ids"]
