"""Chat prompt templates for GGUF models: tell the kind of a `tokenizer.chat_template` and render prompts.

tinyvlm does not run Jinja templates. It recognises the two formats it can write itself and renders them:
* "vicuna_v1": MobileVLM's `v1` template (../shared/design/mobilevlm.md section 8; tinyvlm.prompt):
  `{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:`;
* "chatml": `<|im_start|>{role}\n{text}<|im_end|>\n` per message, ending with `<|im_start|>assistant\n`
  (as SmolLM2's template writes it).
Anything else is "plain": the texts as they are, one per line, after a warning.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

from tinyvlm.prompt import ASSISTANT, SYSTEM_PROMPT, USER

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
