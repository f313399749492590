"""Each benchmark's prompt, and the letter a reply chose.

Prompts (the text after the video in the user turn; the video is the turn's first part):

- ``videomme``: Video-MME's published zero-shot instruction for the setting without subtitles
  ("Select the best answer ... Respond with only the letter ... The best answer is:"), options as
  ``A. text``.
- ``mlvu``: MLVU's multiple-choice template (``choice_bench.py``): its system prompt, then
  ``Question: ...`` / ``Options:`` / ``(A) text``. MLVU primes the reply with ``Best option: (``; a
  chat API has no portable way to start the assistant's turn, so the instruction asks for the
  option instead and the letter is extracted below.
- ``longvideobench``: the question, options as ``A. text``, then "Answer with the option's letter
  from the given choices directly." (the multiple-choice suffix used for LongVideoBench in its
  authors' and lmms-eval's evaluation). Interleaved subtitles are not sent.
- ``choice``: the reference implementation's format (Siyou-Li/QTSplus,
  ``evaluation/eval_sharegpt_video_choice.py``): the question, ``\\nA. text`` per option, and its
  instruction to answer with the letter only. The reference scores the next-token logits of A-D;
  through an API the generated text is parsed instead.

:func:`extract_letter` reads the chosen letter out of a free-form reply; ``None`` means no letter
could be found (counted as a wrong answer, and reported as the extraction failure rate). It
follows Video-MME's extraction (drop answer preambles, then take the letter) made stricter: a
capital that is an English word ("A man ...", "I think") is not a choice, and a reply that only
repeats one option's text counts as that option.
"""

from __future__ import annotations

import re

from .datasets import Item

VIDEOMME_INSTRUCTION = (
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter (A, B, C, or D) of the correct option."
)
MLVU_SYSTEM = (
    "Carefully watch this video and pay attention to every detail. Based on your observations, "
    "select the best option that accurately addresses the question."
)
LVB_SUFFIX = "Answer with the option's letter from the given choices directly."
CHOICE_SUFFIX = (
    "Please provide your options (only A or B or C or D) directly. Do not give any other responses."
)
PROTOCOLS = ("videomme", "mlvu", "longvideobench", "choice")


def _letter_list(letters: str) -> str:
    if len(letters) == 1:
        return letters
    return ", ".join(letters[:-1]) + f", or {letters[-1]}"


def build_prompt(item: Item) -> tuple[str | None, str]:
    """``(system prompt or None, user text)`` for ``item`` under its benchmark's protocol."""
    letters = item.letters
    if item.protocol == "videomme":
        instruction = VIDEOMME_INSTRUCTION
        if letters != "ABCD":
            instruction = instruction.replace("(A, B, C, or D)", f"({_letter_list(letters)})")
        options = "\n".join(f"{c}. {o}" for c, o in zip(letters, item.options, strict=True))
        return None, f"{instruction}\n{item.question}\n{options}\nThe best answer is:"
    if item.protocol == "mlvu":
        options = "\n".join(f"({c}) {o}" for c, o in zip(letters, item.options, strict=True))
        return MLVU_SYSTEM, f"Question: {item.question}\nOptions:\n{options}\nOnly give the best option."
    if item.protocol == "longvideobench":
        options = "\n".join(f"{c}. {o}" for c, o in zip(letters, item.options, strict=True))
        return None, f"{item.question}\n{options}\n{LVB_SUFFIX}"
    if item.protocol == "choice":
        suffix = CHOICE_SUFFIX
        if letters != "ABCD":
            suffix = suffix.replace("A or B or C or D", " or ".join(letters))
        options = "".join(f"\n{c}. {o}" for c, o in zip(letters, item.options, strict=True))
        return None, f"{item.question}{options}\n{suffix}"
    raise ValueError(f"unknown protocol {item.protocol!r}; one of {', '.join(PROTOCOLS)}")


_PREAMBLES = re.compile(
    r"^(?:the\s+)?(?:best|correct|right|final)?\s*(?:answer|option|choice)\b\s*(?:is|would be|:)?\s*[:\-]?\s*",
    re.IGNORECASE,
)
# A letter standing alone: at the start, in brackets, or followed by punctuation / the end.
_LEADING = re.compile(r"^[\s*_`\"'(\[]*([A-J])(?:[\s*_`\"')\].:,]|$)")
_BRACKETED = re.compile(r"[(\[]([A-J])[)\]]")
_CUED = re.compile(r"(?:answer|option|choice)\b\s*(?:is|would be)?\s*[:\-]?\s*\(?([A-J])\b", re.IGNORECASE)
_TOKEN = re.compile(r"(?<![A-Za-z'])([A-J])(?![A-Za-z'])")


def _english(text: str, end: int) -> bool:
    """The capital ending at ``end`` is the word "A" or "I" ("A man ...", "I think ..."), not a choice."""
    return text[end - 1] in "AI" and re.match(r"\s+(?!(?:or|and|nor)\b)[a-z]", text[end:]) is not None


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def extract_letter(reply: str | None, letters: str = "ABCD", options: tuple[str, ...] = ()) -> str | None:
    """The option letter ``reply`` chose, or ``None`` when it names none (or several) of ``letters``."""
    if not reply:
        return None
    text = reply.strip()
    for _ in range(2):  # "The answer is: Answer: B"
        text = _PREAMBLES.sub("", text, count=1).strip()
    # 1. the reply starts with a letter on its own: "B", "B.", "(B)", "B) text", "**B**"
    match = _LEADING.match(text)
    if match and match.group(1) in letters and not _english(text, match.end(1)):
        return match.group(1)
    # 2. a letter after a cue anywhere: "... the answer is (C)", "Option D"
    for match in _CUED.finditer(text):
        letter = match.group(1)
        if letter in letters and not _english(text, match.end(1)):
            return letter
    # 3. exactly one distinct bracketed letter: "I would pick (C) because ..."
    found = {m.group(1) for m in _BRACKETED.finditer(text) if m.group(1) in letters}
    if len(found) == 1:
        return found.pop()
    # 4. exactly one distinct stand-alone capital that is not the English "A" / "I"
    found = set()
    for m in _TOKEN.finditer(text):
        letter = m.group(1)
        if letter not in letters:
            continue
        if not _english(text, m.end(1)):
            found.add(letter)
    if len(found) == 1:
        return found.pop()
    # 5. the reply repeats exactly one option's text
    if options:
        said = _norm(text)
        hits = [c for c, o in zip(letters, options, strict=False) if _norm(o) and _norm(o) in said]
        if len(hits) == 1:
            return hits[0]
    return None
