"""Tokenizer vocabularies in GGUF metadata (`tokenizer.ggml.*`), following llama.cpp (src/llama-vocab.cpp).

Checks for the metadata lists and token ids, and the byte-level BPE of model "gpt2" (as SmolLM2 uses): every
byte is spelled as one printable character, the merges are given, and the text is first split by the regexes
llama.cpp picks for `tokenizer.ggml.pre`; tokens of type control or unknown are matched in the raw text as
special tokens, user-defined ones as added tokens.
"""
from __future__ import annotations

from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from tinyvlm.errors import TokenizerError
from tinyvlm.limits import MAX_MERGES, short
from tinyvlm.weights.sentencepiece import CONTROL, UNKNOWN, USER_DEFINED  # GGUF token types are these

GGUF_SOURCE = "GGUF tokenizer metadata"  # how errors name the source

# llama.cpp's pre-tokenizer regexes (llm_tokenizer_bpe), applied in order; each splits every chunk further,
# keeping both the matches and the text between them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "llama-v3": (_LLAMA3_SPLIT,),
}
_IGNORE_MERGES = frozenset({"llama-bpe", "llama3", "llama-v3"})  # llama.cpp: a whole chunk in the vocab is kept


def _gpt2_byte_chars() -> dict[str, int]:
    """GPT-2's byte alphabet, char -> byte: printable Latin-1 bytes stand for themselves, the other 68 bytes
    for the code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


BYTE_CHARS = _gpt2_byte_chars()


def gguf_list(metadata: dict[str, Any], key: str, kind: type, n: int | None = None) -> list[Any]:
    values = metadata.get(key)
    if not isinstance(values, list) or not all(isinstance(v, kind) for v in values):
        raise TokenizerError(f"{GGUF_SOURCE}: {key} is missing or not a list of {kind.__name__}")
    if n is not None and len(values) != n:
        raise TokenizerError(f"{GGUF_SOURCE}: {key} has {len(values)} entries, expected one per token ({n})")
    return values


def gguf_token_id(metadata: dict[str, Any], key: str, n_tokens: int, default: int) -> int:
    value = metadata.get(key, default)
    if not isinstance(value, int) or not 0 <= value < n_tokens:
        raise TokenizerError(f"{GGUF_SOURCE}: {key} is {short(value)}, expected a token id below {n_tokens}")
    return value


def build_byte_level(tokens: list[str], types: list[int], merges: list[str], pre: str) -> tokenizers.Tokenizer:
    """Byte-level BPE with llama.cpp's pre-tokenizer for `pre` (see the module docstring)."""
    if len(merges) > MAX_MERGES:
        raise TokenizerError(f"{GGUF_SOURCE}: {len(merges)} merges, more than the limit of {MAX_MERGES}")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, pair in zip(merges, pairs) if len(pair) != 2), None)
    if bad is not None:
        raise TokenizerError(f"{GGUF_SOURCE}: merge {short(bad)} is not two tokens separated by one space")
    vocab = {piece: i for i, piece in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError(f"{GGUF_SOURCE}: some tokens appear twice in tokenizer.ggml.tokens")
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    tk.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(p, special=True, normalized=False)
                           for p, t in zip(tokens, types) if t in (UNKNOWN, CONTROL)])
    tk.add_tokens([AddedToken(p, special=False, normalized=False)
                   for p, t in zip(tokens, types) if t == USER_DEFINED])
    return tk
