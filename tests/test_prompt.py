"""tinyvlm.prompt: MobileVLM's v1 template (../shared/design/mobilevlm.md section 8) and the per-chunk <image>
tokenization (section 6), with the sentencepiece library on the real LLaMA tokenizer.model as the reference.
(ChatML rendering against transformers' chat template: tests/test_tokenizer_gguf.py.)"""
from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece

from tinyvlm.prompt import (ASSISTANT, CHATML, IMAGE_TOKEN_ID, PLAIN, SYSTEM_PROMPT, USER, VICUNA_V1, count_images,
                            detect, first_turn, next_turn, render, tokenize_with_images)
from tinyvlm.tokenizer import Tokenizer

BACKEND_FREE = True


@pytest.fixture(scope="module")
def tokenizers(shared_data: Path) -> tuple[Tokenizer, sentencepiece.SentencePieceProcessor]:
    model = shared_data / "llama-spm-vocab" / "tokenizer.model"
    return Tokenizer.from_sentencepiece(model), sentencepiece.SentencePieceProcessor(model_file=str(model))


def test_v1_first_and_next_turns() -> None:
    assert first_turn("What is it?", image=True) == f"{SYSTEM_PROMPT} USER: <image>\nWhat is it? ASSISTANT:"
    assert first_turn("Hi", image=False, system="S") == "S USER: Hi ASSISTANT:"
    assert first_turn("<image> left, then text", image=True) == f"{SYSTEM_PROMPT} USER: <image> left, then text ASSISTANT:"
    assert next_turn("And then?") == "USER: And then? ASSISTANT:"
    assert (USER, ASSISTANT) == ("USER", "ASSISTANT")
    # a finished first turn, its </s>, and the next turn: the multi-turn prompt of section 8
    two = render(VICUNA_V1, None, [("<image>\nq1", "a1"), ("q2", None)])
    assert two == first_turn("q1", image=True) + " a1</s>" + next_turn("q2")


@pytest.mark.parametrize("text", [
    "A chat. USER: <image>\nWhat is in the image? ASSISTANT:",
    "<image>\nstarts with the image",
    "two <image> images <image> here",
    "no image at all",
    "ends with <image>",
])
def test_each_chunk_is_tokenized_alone_with_one_bos(tokenizers, text: str) -> None:
    ours, sp = tokenizers
    expected: list[int] = []
    for i, chunk in enumerate(text.split("<image>")):
        ids = [sp.bos_id()] + sp.encode(chunk) if chunk or i == 0 else []  # each chunk gets its own dummy prefix
        expected += ([IMAGE_TOKEN_ID] if i else []) + (ids if i == 0 else ids[1:])  # BOS kept once
    got = tokenize_with_images(ours, text)
    assert got == expected
    assert count_images(got) == text.count("<image>")


def test_template_kinds() -> None:
    assert detect(None) == VICUNA_V1
    assert detect("{% for m in messages %}<|im_start|>{{ m.role }}<|im_end|>{% endfor %}") == CHATML
    with pytest.warns(UserWarning, match="plain text"):
        assert detect("[INST] {{ messages }} [/INST]") == PLAIN
