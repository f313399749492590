"""The query of a request: which text the QTS+ selector scores the video against (no vLLM, no torch).

vLLM hands the multimodal processor the prompt as token ids, already rendered by the chat template.
The rule, applied to the decoded prompt:

1. The query is the text of the **last user turn** (``<|im_start|>user`` … ``<|im_end|>``): that
   is the turn the model is answering. In a multi-turn chat a follow-up question re-selects the
   video's tokens for the new question, as the reference model would if asked it directly. (The
   price: the video's KV cache of an earlier turn cannot be reused, since its rows differ.)
2. Vision markup (``<|vision_start|>`` … ``<|vision_end|>``) and every other special token are
   removed; the remaining text parts stay in the order the client sent them (text before the video,
   after it, or both) and surrounding whitespace is stripped. Qwen2.5-VL's template concatenates
   a turn's text parts as they are, so several parts are joined as the client wrote them.
3. A prompt without chat markup (a raw completion prompt) uses the whole prompt text the same way.
4. When nothing is left (the turn holds only the video) the query is :data:`DEFAULT_QUESTION`.

The query is then tokenized without special tokens (DESIGN §2.3).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

DEFAULT_QUESTION = "Describe the video in detail."

_USER_TURN = re.compile(r"<\|im_start\|>user\n?(.*?)(?:<\|im_end\|>|$)", re.DOTALL)
_VISION = re.compile(r"<\|vision_start\|>.*?<\|vision_end\|>", re.DOTALL)
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz_")


class Tokenizer(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def extract_question_text(prompt: str) -> str:
    """The query text of a rendered prompt (rules in the module docstring); never empty."""
    turns = _USER_TURN.findall(prompt)
    text = turns[-1] if turns else prompt
    text = _remove_special(_VISION.sub("", text)).strip()
    return text or DEFAULT_QUESTION


def _remove_special(text: str) -> str:
    """``text`` without special-token markup, also markup that removing other markup joins up.

    ``<|im_<|x|>end|>`` is ``<|im_end|>`` once ``<|x|>`` is gone, and the tokenizer would read it as
    that special token. One left-to-right pass with a stack removes nested markup in linear time
    (a regex pass per nesting level would be quadratic in the prompt's length).
    """
    text = _SPECIAL.sub("", text)
    if not _SPECIAL.search(text):
        return text
    out: list[str] = []
    run: list[int] = []  # run[i]: length of the run of name characters that ends at out[i]
    for ch in text:
        run.append(run[-1] + 1 if run and ch in _NAME_CHARS else int(ch in _NAME_CHARS))
        out.append(ch)
        if ch == ">" and len(out) >= 5 and out[-2] == "|":
            start = len(out) - 4 - run[-3]
            if run[-3] and start >= 0 and out[start] == "<" and out[start + 1] == "|":
                del out[start:], run[start:]
    return "".join(out)


def extract_question_ids(prompt_ids: Sequence[int], tokenizer: Tokenizer) -> list[int]:
    """Token ids of the query (no special tokens) recovered from the prompt's token ids."""
    text = extract_question_text(tokenizer.decode(list(prompt_ids), skip_special_tokens=False))
    return list(tokenizer.encode(text, add_special_tokens=False))
