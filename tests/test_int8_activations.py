"""Int8 activations (the default for one token times a quantized matrix) against float32 activations, on models.

Decode quantizes each token's activation vector to int8 per block of 32 before every quantized matrix, as
llama.cpp does (kernels/quant_int8.py; tests/test_kernels_int8.py bounds one matvec). Here, the whole model: the
same tokens are fed one at a time (teacher forcing along the float32 model's greedy path) to the model with int8
activations and to the one with float32 activations, and to the references.

Measured (max |logit difference| / max |logit| over the decoded positions):
  tiny random checkpoints (tests/checkpoints.py), 12 decode steps after the prompt (and the image), int8 against
      float32 activations, the same on both backends: int4 (q4_0) v1 0.017, v2 0.018, text 0.035; int8 (q8_0)
      v1 0.015, v2 0.017, text 0.024; the greedy token the same at 11 or 12 of the 12 steps
  SmolLM2-135M-Instruct Q4_1, the 25-token prompt decoded token by token, against transformers' float32 logits:
      0.026 (numpy backend) and 0.031 (numba), top-1 the same at all 25 positions (float32 activations: 1.6e-6)
  SmolLM2, the same prompt in one forward pass (the Numba backend's int16 GEMM on x86-64): 0.029, top-1 the same at
      all 25 positions (the NumPy backend multiplies long prompts in float32: 1.6e-6)
  SmolLM2 against llama.cpp (tests/fixtures/smollm2_llamacpp.json; llama.cpp also rounds activations to 8 bits),
      the 4 prompts token by token, 97 positions: numba top-1 equal at all 97, max |logit difference| on
      llama.cpp's top-5 ids 1.48, mean 0.20; numpy 4 swaps at near ties (llama.cpp's top-2 gaps 0.006-0.155),
      1.26 and 0.19. (Float32 activations, test_smollm2_llamacpp.py: 1 swap, 1.06 and 0.17.)
The two backends' int8 paths differ more than their float32 ones: rounding to 8 bits is discontinuous, so a
float32 difference in the last bit can move an activation by a whole step.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tinyvlm
from tests.conftest import smollm2_path
from tinyvlm.config import GenerationConfig
from tinyvlm.generate import generate_tokens

QUESTION = "What is in the image?"
IMAGE = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
STEPS = 12
TINY_BOUND = 0.06  # measured at most 0.035 (see above)
PREFILL_BOUND = 0.06  # measured 0.029 (see above)
MAX_ABS_DIFF, MAX_MEAN_DIFF = 2.0, 0.3  # against llama.cpp's logits: measured at most 1.48 and 0.20
GGUF = smollm2_path()
FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_llamacpp.json"
PROMPT = ("<|im_start|>user\nWrite one sentence about the sea, and name two animals that live in it."
          "<|im_end|>\n<|im_start|>assistant\n")


def decode_logits(vlm: tinyvlm.VLM, prompt_embeds, follow: list[int]) -> np.ndarray:
    """Prefill the prompt, then feed `follow` one token at a time: the logits after the prompt and after each
    fed token but the last, (len(follow), V)."""
    lang = vlm.language
    cache = lang.new_cache()
    rows = [lang.forward(prompt_embeds, cache)]
    for t in follow[:-1]:
        rows.append(lang.forward(lang.embed([t]), cache))
    return np.stack([np.asarray(r).reshape(-1) for r in rows])


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", ["v1", "v2", "text"])
@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_tiny_checkpoints(checkpoints, backend_name, name: str, quant: str) -> None:
    models = {a: tinyvlm.load(checkpoints[name].path, quant=quant, decode_activations=a) for a in ("int8", "float32")}
    reference = models["float32"]
    ids = reference.prompt_ids(QUESTION)
    images = [reference.encode_image(IMAGE)] if reference.vision is not None else []
    embeds = reference.embed(ids, images)
    lang = reference.language
    follow = list(generate_tokens(lang, embeds, lang.new_cache(), GenerationConfig(max_new_tokens=STEPS),
                                  stop_ids=set(), history=[]))
    logits = {a: decode_logits(m, embeds, follow) for a, m in models.items()}
    assert rel_err(logits["int8"], logits["float32"]) <= TINY_BOUND
    assert 0 < rel_err(logits["int8"], logits["float32"])  # the int8 path did run
    assert logits["float32"].argmax(axis=1).tolist() == follow  # the float32 model's own greedy path


@pytest.fixture(scope="module")
def smollm2(backend_name: str) -> tinyvlm.VLM:
    return tinyvlm.load(GGUF, decode_activations="int8")


def test_smollm2_against_transformers_float32(smollm2: tinyvlm.VLM) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    reference = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    ids = smollm2.tokenizer.encode(PROMPT, add_bos=False)
    with torch.inference_mode():
        ref = reference(torch.tensor([ids])).logits[0].numpy()  # (T, V)
    lang = smollm2.language
    ours = decode_logits(smollm2, lang.embed(ids[:1]), ids[1:] + [0])  # position t predicts token t + 1
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= 0.06  # measured 0.026 (numpy backend) and 0.031 (numba)
    assert (ours.argmax(axis=1) == ref.argmax(axis=1)).mean() >= 0.9  # measured 25 of 25


def test_smollm2_prompt_in_one_pass_against_transformers(smollm2: tinyvlm.VLM) -> None:
    """The 25-token prompt in one forward pass: on the Numba backend on x86-64 its quantized layers multiply int8
    activations in the int16 GEMM (kernels/quant_gemm.py), elsewhere dequantized tiles in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    reference = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    ids = smollm2.tokenizer.encode(PROMPT, add_bos=False)
    with torch.inference_mode():
        ref = reference(torch.tensor([ids])).logits[0].numpy()  # (T, V)
    ours = smollm2.logits(ids)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= PREFILL_BOUND
    assert (ours.argmax(axis=1) == ref.argmax(axis=1)).mean() >= 0.9


def test_smollm2_against_llamacpp(smollm2: tinyvlm.VLM) -> None:
    """Top-1 as llama.cpp's, except where llama.cpp's own top two are within TIE_MARGIN and tinyvlm picks the
    second (both round the activations to 8 bits, each its own way); logits close on llama.cpp's top-5 ids."""
    from tests.test_smollm2_llamacpp import TIE_MARGIN

    with open(FIXTURE, encoding="utf-8") as f:
        fixture = json.load(f)
    lang = smollm2.language
    swapped = total = 0
    diffs = []
    for name, p in fixture["prompts"].items():
        ids = p["ids"]
        logits = decode_logits(smollm2, lang.embed(ids[:1]), ids[1:] + [0])  # (T, V)
        ours = logits.argmax(axis=1)
        ref_ids, ref_logits = np.array(p["top_ids"]), np.array(p["top_logits"])  # (T, 5)
        for t, ((first, second), (l1, l2)) in enumerate(zip(ref_ids[:, :2], ref_logits[:, :2])):
            total += 1
            if ours[t] != first:
                assert l1 - l2 < TIE_MARGIN and ours[t] == second, (
                    f"{name} position {t}: tinyvlm picks {ours[t]}, llama.cpp {first} (gap {l1 - l2:.3f})")
                swapped += 1
        diffs.append(np.abs(np.take_along_axis(logits, ref_ids, axis=1) - ref_logits).ravel())
    diff = np.concatenate(diffs)
    assert total == 97 and swapped <= 6  # measured 0 (numba) and 4 (numpy)
    assert diff.max() <= MAX_ABS_DIFF and diff.mean() <= MAX_MEAN_DIFF
