"""The MobileVLM `v1` conversation template and the image-placeholder tokenization.

Follows ../shared/design/mobilevlm.md sections 6 and 8: the prompt string is split on "<image>", every chunk is
tokenized on its own (so each gets SentencePiece's dummy prefix), BOS is kept once, and the chunks are joined
with the sentinel id -200 where the image embeddings go.
"""
from __future__ import annotations

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
