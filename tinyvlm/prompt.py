"""Prompts: the chat templates (MobileVLM's `v1`, ChatML, plain) and the image-placeholder tokenization.

MobileVLM follows ../shared/design/mobilevlm.md sections 6 and 8: the prompt string is split on "<image>", every
chunk is tokenized on its own (so each gets SentencePiece's dummy prefix), BOS is kept once, and the chunks are
joined with the sentinel id -200 where the image embeddings go.

GGUF models name their template in `tokenizer.chat_template`. tinyvlm does not run Jinja templates: `detect`
recognises the two formats it can write itself, and `render` writes them:
* "vicuna_v1": MobileVLM's `v1` template, `{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:`;
* "chatml": `<|im_start|>{role}\n{text}<|im_end|>\n` per message, ending with `<|im_start|>assistant\n`
  (as SmolLM2's template writes it).
Anything else is "plain": the texts as they are, one per line, after a warning.
"""
from __future__ import annotations

import warnings
from typing import Protocol, Sequence

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = -200
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER, ASSISTANT = "USER", "ASSISTANT"


class _Encoder(Protocol):
    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...


def first_turn(question: str, *, image: bool, system: str | None = None) -> str:
    """`{system} USER: <image>\\n{question} ASSISTANT:` (no space after the final colon)."""
    if image and IMAGE_TOKEN not in question:
        question = IMAGE_TOKEN + "\n" + question
    return f"{SYSTEM_PROMPT if system is None else system} {USER}: {question} {ASSISTANT}:"


def next_turn(question: str) -> str:
    """What follows a finished answer and its `</s>`: `USER: {question} ASSISTANT:`."""
    return f"{USER}: {question} {ASSISTANT}:"


def tokenize_with_images(tokenizer: _Encoder, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of `text` with IMAGE_TOKEN_ID for each "<image>"; chunks tokenized separately, BOS once."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if i > 0:
            ids.append(IMAGE_TOKEN_ID)
        if chunk:
            ids.extend(tokenizer.encode(chunk, add_bos=add_bos and i == 0))
        elif i == 0 and add_bos:
            ids.extend(tokenizer.encode("", add_bos=True))
    return ids


def count_images(ids: Sequence[int]) -> int:
    return sum(1 for t in ids if t == IMAGE_TOKEN_ID)


# ---------------------------------------------------------------- templates

CHATML, VICUNA_V1, PLAIN = "chatml", "vicuna_v1", "plain"
KINDS = (CHATML, VICUNA_V1, PLAIN)
# The text that ends an answer in each kind (the model's end-of-turn token).
STOP_TEXT = {CHATML: "<|im_end|>", VICUNA_V1: "</s>", PLAIN: None}

Turn = tuple[str, str | None]  # (user text, the answer, or None for the turn the model is to answer)


def detect(template: str | None, default: str = VICUNA_V1) -> str:
    """The kind of a chat template; `default` when there is none (MobileVLM's files carry no template)."""
    if not template:
        return default
    if "<|im_start|>" in template and "<|im_end|>" in template:
        return CHATML
    if "USER" in template and "ASSISTANT" in template:
        return VICUNA_V1
    warnings.warn("unknown chat template (neither ChatML nor the MobileVLM/vicuna v1 format): "
                  "prompts are sent as plain text", stacklevel=2)
    return PLAIN


def render(kind: str, system: str | None, turns: Sequence[Turn]) -> str:
    """The prompt for `turns`; give the last one an answer of None to have the model answer it.

    `system` None means the kind's default: MobileVLM's system prompt for vicuna_v1, none for chatml and plain.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown template kind {kind!r}; expected one of {', '.join(KINDS)}")
    if any(answer is None for _, answer in turns[:-1]):
        raise ValueError("only the last turn may be left without an answer")
    if kind == VICUNA_V1:
        parts = [f"{SYSTEM_PROMPT if system is None else system} "]
        for question, answer in turns:
            parts.append(f"{USER}: {question} {ASSISTANT}:")
            if answer is not None:
                parts.append(f" {answer}</s>")
        return "".join(parts)
    if kind == CHATML:
        parts = [] if system is None else [f"<|im_start|>system\n{system}<|im_end|>\n"]
        for question, answer in turns:
            parts.append(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
            if answer is not None:
                parts.append(f"{answer}<|im_end|>\n")
        return "".join(parts)
    texts = [] if system is None else [system]
    for question, answer in turns:
        texts += [question] if answer is None else [question, answer]
    return "\n".join(texts)
