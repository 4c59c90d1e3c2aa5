"""The LLaMA SentencePiece BPE tokenizer that MobileVLM ships, run through the `tokenizers` library.

MobileVLM checkpoints ship `tokenizer.model`, a SentencePiece ModelProto (protobuf). We read it with
weights/sentencepiece.py (no sentencepiece or protobuf import) and rebuild it as a `tokenizers` BPE
model that behaves like the reference's slow `LlamaTokenizer` with legacy=True (../shared/design/mobilevlm.md
section 7):

* normalizer: prepend the dummy prefix "▁", then every " " becomes "▁"; no pre-tokenizer split;
* model: BPE with byte fallback; SentencePiece merges the adjacent pair whose merged piece has the highest
  score, so the merge list is every (left, right) split of every piece, ranked by the merged piece's score;
* special tokens (<unk>, <s>, </s>) are matched in the raw text as `tokenizers` added tokens, and the text
  after one is normalized on its own, so it gets a dummy prefix too (the "legacy" behaviour);
* decoder: "▁" -> " ", byte fallback, fuse, strip one leading space.

GGUF files carry their vocabulary in `tokenizer.ggml.*` metadata (`Tokenizer.from_gguf`), following llama.cpp
(src/llama-vocab.cpp):
* model "llama": the same SentencePiece pieces, scores and types, built exactly as from tokenizer.model;
* model "gpt2": byte-level BPE (as SmolLM2 uses), built by gguf_vocab.py.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers

from tinyvlm.errors import TokenizerError
from tinyvlm.limits import MAX_MERGES, MAX_PIECE_CHARS, MAX_TOKENIZER_BYTES, flag, read_json_object, short

if TYPE_CHECKING:
    from tinyvlm.stream import StreamDecoder
from tinyvlm.gguf_vocab import BYTE_CHARS, GGUF_SOURCE, PRE_TOKENIZERS, build_byte_level, gguf_list, gguf_token_id
from tinyvlm.weights.sentencepiece import (BPE, CONTROL, NORMAL, UNIGRAM, UNKNOWN, USER_DEFINED, SentencePieceModel,
                                           parse_sentencepiece)

T = TypeVar("T")
SPACE = "\u2581"  # "▁", SentencePiece's escaped whitespace
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# ----------------------------------------------------------------------------------------------------------
# SentencePiece model -> tokenizers.Tokenizer


def _check_supported(sp: SentencePieceModel, path: str | Path) -> None:
    """Only LLaMA-style models: BPE, byte fallback, identity normalizer, whitespace escaped, kept as is."""
    problems = []
    if sp.model_type != BPE:
        name = {UNIGRAM: "unigram", 3: "word", 4: "char"}.get(sp.model_type, str(sp.model_type))
        problems.append(f"model type is {name}, expected BPE")
    if not sp.byte_fallback:
        problems.append("byte_fallback is off")
    if sp.precompiled_charsmap:
        problems.append("it has a normalization charsmap (e.g. nmt_nfkc), expected the identity normalizer")
    if sp.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces is on")
    if not sp.escape_whitespaces:
        problems.append("escape_whitespaces is off")
    if not sp.pieces:
        problems.append("it has no pieces")
    if len(set(sp.pieces)) != len(sp.pieces):
        problems.append("some pieces appear twice")
    if any(len(p) > MAX_PIECE_CHARS for p in sp.pieces):
        problems.append(f"a piece is longer than {MAX_PIECE_CHARS} characters")
    if problems:
        raise TokenizerError(f"{path}: unsupported SentencePiece model ({'; '.join(problems)}); "
                             "tinyvlm reads LLaMA-style BPE tokenizers only")
    for name, i in (("unk_id", sp.unk_id), ("bos_id", sp.bos_id), ("eos_id", sp.eos_id)):
        if not 0 <= i < len(sp.pieces):
            raise TokenizerError(f"{path}: {name} {i} is not a piece id (the model has {len(sp.pieces)} pieces)")


def bpe_merges(pieces: Sequence[str], scores: Sequence[float], mergeable: Sequence[bool],
               where: object = "tokenizer") -> list[tuple[str, str]]:
    """Every (left, right) split of a mergeable piece whose halves are mergeable pieces, best score first.

    Ties (equal scores) are ranked by the merged piece's id, then by the left piece's length.
    """
    ids = {p: i for i, p in enumerate(pieces) if mergeable[i]}
    ranked = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, cut, left, right))
        if len(ranked) > MAX_MERGES:
            raise TokenizerError(f"{where}: the pieces make more than {MAX_MERGES} BPE merges")
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _build(sp: SentencePieceModel, where: object) -> tokenizers.Tokenizer:
    """The `tokenizers` pipeline described in the module docstring."""
    mergeable = [t == NORMAL for t in sp.types]
    vocab = {piece: i for i, piece in enumerate(sp.pieces)}
    bpe = models.BPE(vocab=vocab, merges=bpe_merges(sp.pieces, sp.scores, mergeable, where),
                     unk_token=sp.pieces[sp.unk_id], byte_fallback=True, fuse_unk=True)
    tk = tokenizers.Tokenizer(bpe)
    steps = [normalizers.Replace(" ", SPACE)]
    decode_steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if sp.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend(SPACE))
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tk.normalizer = normalizers.Sequence(steps)
    tk.decoder = decoders.Sequence(decode_steps)
    tk.add_special_tokens([AddedToken(p, special=True, normalized=False)
                           for p, t in zip(sp.pieces, sp.types) if t in (UNKNOWN, CONTROL)])
    tk.add_tokens([AddedToken(p, special=False, normalized=True)
                   for p, t in zip(sp.pieces, sp.types) if t == USER_DEFINED])
    return tk


def _flag(metadata: dict[str, Any], key: str, default: bool) -> bool:
    return flag(metadata.get(key, default), f"{GGUF_SOURCE}: {key}", TokenizerError)


# ----------------------------------------------------------------------------------------------------------
# Public API


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, TokenizerError) if path.is_file() else {}


def _rust(build: Callable[[], T], where: object) -> T:
    """build(), with what the tokenizers library raises for input it refuses as a TokenizerError: an Exception, or
    pyo3's PanicException (a BaseException) when its Rust code panics."""
    try:
        return build()
    except (TokenizerError, KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as err:
        raise TokenizerError(f"{where}: the tokenizers library refuses it ({short(str(err))})") from None


def _token_name(value: Any) -> str | None:
    """A special token in a config file: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    """A tokenizer.json that holds a SentencePiece-style (byte-fallback BPE) tokenizer."""
    model = _read_json(path).get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("byte_fallback") is not True:
        found = f"type {short(model.get('type'))} with byte_fallback {short(model.get('byte_fallback'))}" \
            if isinstance(model, dict) else f"model {short(model)}"
        raise TokenizerError(f"{path}: expected a SentencePiece-style BPE model with byte_fallback, found {found}")
    return _rust(lambda: tokenizers.Tokenizer.from_file(str(path)), path)


class Tokenizer:
    """Encode text to token ids and decode ids back to text. Build with from_dir, from_sentencepiece or from_gguf."""

    def __init__(self, tk: tokenizers.Tokenizer, bos_id: int, eos_id: int, add_bos_token: bool = True,
                 source: object = "the tokenizer") -> None:
        self._tk = tk
        self.source = source  # the file (or GGUF metadata) it was read from, for messages
        self._bos_id = bos_id
        self._eos_id = eos_id
        self.add_bos_token = add_bos_token
        self._special_ids = frozenset(i for i, t in tk.get_added_tokens_decoder().items() if t.special)
        # Whether decoding removes the dummy prefix, i.e. one leading space of the whole text.
        self.strips_leading_space = tk.decoder is not None and tk.decoder.decode([SPACE + "x"]) == "x"
        # Byte-level BPE (GPT-2 style): every character of a piece stands for one byte.
        self.byte_level = isinstance(tk.decoder, decoders.ByteLevel)

    @classmethod
    def from_sentencepiece(cls, path: str | Path) -> Tokenizer:
        """Read a SentencePiece `tokenizer.model` (BPE with byte fallback, as LLaMA's)."""
        path = Path(path)
        try:
            if path.stat().st_size > MAX_TOKENIZER_BYTES:
                raise TokenizerError(f"{path}: {path.stat().st_size} bytes, above the limit of {MAX_TOKENIZER_BYTES}")
            sp = parse_sentencepiece(path.read_bytes())
        except OSError as err:
            raise TokenizerError(f"{path}: cannot read it ({err})") from err
        except (ValueError, UnicodeDecodeError) as err:
            raise TokenizerError(f"{path}: not a valid SentencePiece model ({err})") from err
        _check_supported(sp, path)
        return cls(_rust(lambda: _build(sp, path), path), sp.bos_id, sp.eos_id, source=path)

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any]) -> Tokenizer:
        """Build from a GGUF file's metadata: tokenizer.ggml.model "llama" (SentencePiece) or "gpt2" (byte-level
        BPE, pre-tokenized per tokenizer.ggml.pre); BOS is added when tokenizer.ggml.add_bos_token says so."""
        model = metadata.get("tokenizer.ggml.model")
        if model not in ("llama", "gpt2"):
            raise TokenizerError(f"{GGUF_SOURCE}: tokenizer.ggml.model is {short(model)}; tinyvlm reads 'llama' and "
                                 "'gpt2'")
        tokens = gguf_list(metadata, "tokenizer.ggml.tokens", str)
        n = len(tokens)
        types = gguf_list(metadata, "tokenizer.ggml.token_type", int, n)
        bos = gguf_token_id(metadata, "tokenizer.ggml.bos_token_id", n, 1)
        eos = gguf_token_id(metadata, "tokenizer.ggml.eos_token_id", n, 2)
        if model == "llama":  # the SentencePiece path, with the settings llama.cpp assumes for it
            scores = gguf_list(metadata, "tokenizer.ggml.scores", float, n)
            unk = gguf_token_id(metadata, "tokenizer.ggml.unknown_token_id", n, 0)
            dummy_prefix = _flag(metadata, "tokenizer.ggml.add_space_prefix", True)
            sp = SentencePieceModel(tokens, scores, types, model_type=BPE, byte_fallback=True, unk_id=unk,
                                    bos_id=bos, eos_id=eos, add_dummy_prefix=dummy_prefix,
                                    remove_extra_whitespaces=False, escape_whitespaces=True)
            _check_supported(sp, GGUF_SOURCE)
            return cls(_rust(lambda: _build(sp, GGUF_SOURCE), GGUF_SOURCE), bos, eos,
                       _flag(metadata, "tokenizer.ggml.add_bos_token", True), GGUF_SOURCE)
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"{GGUF_SOURCE}: tokenizer.ggml.pre {short(pre)} is not supported "
                                 f"(tinyvlm knows {', '.join(PRE_TOKENIZERS)})")
        merges = gguf_list(metadata, "tokenizer.ggml.merges", str)
        tk = _rust(lambda: build_byte_level(tokens, types, merges, pre), GGUF_SOURCE)
        return cls(tk, bos, eos, _flag(metadata, "tokenizer.ggml.add_bos_token", False), GGUF_SOURCE)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load tokenizer.json if present, else tokenizer.model. tokenizer_config.json and
        special_tokens_map.json are read when they exist (add_bos_token, bos_token, eos_token)."""
        model_dir = Path(model_dir)
        json_path, sp_path = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
        if json_path.is_file():
            tk, defaults = _load_tokenizer_json(json_path), {"bos_token": "<s>", "eos_token": "</s>"}
            source = json_path
        elif sp_path.is_file():
            base = cls.from_sentencepiece(sp_path)
            tk = base._tk
            defaults = {"bos_token": base.id_to_piece(base.bos_id), "eos_token": base.id_to_piece(base.eos_id)}
            source = sp_path
        else:
            raise TokenizerError(f"{model_dir}: no tokenizer found (looked for tokenizer.json and tokenizer.model)")
        settings = _read_json(model_dir / "special_tokens_map.json") | _read_json(model_dir / "tokenizer_config.json")
        special = {}
        for key, default in defaults.items():
            name = _token_name(settings.get(key)) or default
            special[key] = tk.token_to_id(name)
            if special[key] is None:
                raise TokenizerError(f"{model_dir}: {key} {short(name)} is not in the vocabulary")
        add_bos = settings.get("add_bos_token", True)  # null means no BOS, as transformers reads it
        return cls(tk, special["bos_token"], special["eos_token"], add_bos is not None and
                   flag(add_bos, f"{model_dir}: add_bos_token in the tokenizer settings", TokenizerError), source)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def vocab_size(self) -> int:  # V
        return self._tk.get_vocab_size(with_added_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tk.id_to_token(token_id)
        if piece is None:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return piece

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; BOS first when add_bos and the tokenizer's add_bos_token setting allow it."""
        ids = _rust(lambda: self._tk.encode(text, add_special_tokens=False).ids, f"{self.source} (encoding)")
        return [self._bos_id, *ids] if add_bos and self.add_bos_token else ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids` (special tokens such as <s> and </s> left out when skip_special)."""
        return _rust(lambda: self._tk.decode(list(ids), skip_special_tokens=skip_special), f"{self.source} (decoding)")

    def token_bytes(self, token_id: int, skip_special: bool = True) -> bytes:
        """The UTF-8 bytes one token contributes to decoded text (b"" for a skipped special token)."""
        if skip_special and token_id in self._special_ids:
            return b""
        piece = self.id_to_piece(token_id)
        if self.byte_level:  # added tokens such as <|im_start|> are not spelled in bytes: their UTF-8 as is
            spelled = all(c in BYTE_CHARS for c in piece)
            return bytes(BYTE_CHARS[c] for c in piece) if spelled else piece.encode("utf-8")
        byte = _BYTE_PIECE.fullmatch(piece)
        return bytes([int(byte.group(1), 16)]) if byte else piece.replace(SPACE, " ").encode("utf-8")

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        from tinyvlm.stream import StreamDecoder

        return StreamDecoder(self, skip_special)
