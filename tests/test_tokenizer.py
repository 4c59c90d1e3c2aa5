"""Tests for tinyvlm.tokenizer against references nobody here wrote: llama.cpp's tokenizer test vectors, the
`sentencepiece` library (encode, decode, and models it trains on the spot) and ../shared/design/mobilevlm.md
section 7. Ids and text must match exactly."""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tinyvlm.errors import TokenizerError
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.weights.sentencepiece import BYTE, CONTROL, NORMAL, UNKNOWN, parse_sentencepiece

BACKEND_FREE = True  # no model runs here: kernels, files and text only

SPECIAL_STRINGS = ("<s>", "</s>", "<unk>")  # matched as special tokens by us (legacy LlamaTokenizer), not by sp

# Random text: any code point (byte fallback covers what the vocab lacks) mixed with whitespace runs,
# newlines, accents, CJK and emoji, which are where SentencePiece tokenizers go wrong.
FRAGMENTS = st.one_of(
    st.characters(exclude_categories=("Cs",)),
    st.sampled_from([" ", "  ", "    ", "\n", "\n\n", "\t", " \n ", "é", "ñü", "東京", "日本語", "😀", "👍🏽", "€", "▁"]),
)
TEXT = st.lists(FRAGMENTS, max_size=40).map("".join)
HYPOTHESIS = settings(max_examples=200, derandomize=True, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model_path(shared_data: Path) -> Path:
    return shared_data / "llama-spm-vocab" / "tokenizer.model"


@pytest.fixture(scope="module")
def tok(model_path: Path) -> Tokenizer:
    return Tokenizer.from_sentencepiece(model_path)


@pytest.fixture(scope="module")
def sp(model_path: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(model_path))


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tok.stream_decoder()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def train_sentencepiece(vocab_size: int = 300, **options: object) -> bytes:
    """A small model trained by the sentencepiece library (0.02 s)."""
    words = ["hello", "world", "token", "piece", "naïve", "café", "東京", "日本語", "😀", "the", "of", "tinyvlm", "XY"]
    corpus = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(300)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=out, vocab_size=vocab_size,
                                   character_coverage=1.0, minloglevel=2, **options)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Parsing tokenizer.model


def test_parser_reads_every_piece_like_sentencepiece(model_path: Path, sp: spm.SentencePieceProcessor) -> None:
    model = parse_sentencepiece(model_path.read_bytes())
    assert len(model.pieces) == sp.vocab_size() == 32000
    assert model.pieces == [sp.id_to_piece(i) for i in range(32000)]
    assert model.scores == [sp.get_score(i) for i in range(32000)]  # float32 both sides: exact
    expected_types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
                      else NORMAL for i in range(32000)]
    assert model.types == expected_types
    assert (model.unk_id, model.bos_id, model.eos_id, model.pad_id) == (sp.unk_id(), sp.bos_id(), sp.eos_id(),
                                                                        sp.pad_id()) == (0, 1, 2, -1)
    assert (model.model_type, model.byte_fallback) == (2, True)
    assert (model.add_dummy_prefix, model.remove_extra_whitespaces, model.escape_whitespaces) == (True, False, True)
    assert model.precompiled_charsmap == b""


def test_construction_is_fast(model_path: Path) -> None:
    start = time.perf_counter()
    Tokenizer.from_sentencepiece(model_path)
    assert time.perf_counter() - start < 2.0


def test_basic_properties(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    assert [tok.id_to_piece(i) for i in (0, 1, 2, 13, 29871, 31999)] == [sp.id_to_piece(i) for i in
                                                                         (0, 1, 2, 13, 29871, 31999)]
    with pytest.raises(TokenizerError, match="32000"):
        tok.id_to_piece(32000)


@pytest.mark.parametrize("cut", [0, 7, 1000, 300_001])
def test_truncated_or_empty_model_is_rejected(model_path: Path, tmp_path: Path, cut: int) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(model_path.read_bytes()[:cut])
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_sentencepiece(bad)


# ---------------------------------------------------------------------------------------------------------
# Encoding


def test_llama_cpp_vectors(shared_data: Path, tok: Tokenizer) -> None:
    base = shared_data / "llama-spm-vocab" / "ggml-vocab-llama-spm.gguf"
    # Inputs are separated by "\n__ggml_vocab_test__\n" and the file ends with one, so the last split is empty;
    # an input may itself be empty or consist of newlines. .out holds one line of ids (no BOS) per input.
    inputs = base.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    assert inputs[-1] == ""
    inputs = inputs[:-1]
    outputs = base.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(inputs) == len(outputs) == 46
    wrong = [(text, tok.encode(text, add_bos=False), ids) for text, line in zip(inputs, outputs)
             if tok.encode(text, add_bos=False) != (ids := [int(x) for x in line.split()])]
    assert wrong == []


@HYPOTHESIS
@given(text=TEXT)
def test_matches_sentencepiece(tok: Tokenizer, sp: spm.SentencePieceProcessor, text: str) -> None:
    assume(not any(s in text for s in SPECIAL_STRINGS))
    ids = tok.encode(text)
    assert ids == sp.encode(text, add_bos=True)
    assert tok.encode(text, add_bos=False) == ids[1:]
    assert tok.decode(ids) == sp.decode(ids)


def test_mobilevlm_splice_facts(tok: Tokenizer) -> None:
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    before = tok.encode(system + " USER: ")
    assert before[0] == 1 and before[-4:] == [3148, 1001, 29901, 29871]
    after = tok.encode("\nWhat is in the image? ASSISTANT:", add_bos=False)
    assert after == [29871, 13, 5618, 338, 297, 278, 1967, 29973, 319, 1799, 9047, 13566, 29901]


def test_special_tokens_in_text_legacy(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    # <s>/</s> in the text are special tokens; the text after one is encoded as a fresh chunk (dummy prefix).
    answer, question = "It is a cat.", "USER: And the dog? ASSISTANT:"
    ids = tok.encode(f"{answer}</s>{question}")
    assert ids == sp.encode(answer, add_bos=True) + [2] + sp.encode(question)
    assert tok.decode(ids) == f"{answer} {question}"  # skip_special drops </s>, the dummy prefix stays a space
    assert tok.decode(ids, skip_special=False) == f"<s> {answer}</s> {question}"


# ---------------------------------------------------------------------------------------------------------
# Other SentencePiece models, trained here by the sentencepiece library


def test_trained_bpe_with_user_symbols_and_no_dummy_prefix(tmp_path: Path) -> None:
    data = train_sentencepiece(model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                               remove_extra_whitespaces=False, add_dummy_prefix=False,
                               user_defined_symbols=["<img>", "XY"])
    (tmp_path / "tokenizer.model").write_bytes(data)
    ours, ref = Tokenizer.from_dir(tmp_path), spm.SentencePieceProcessor(model_proto=data)
    texts = ["hello XYworld <img>東京😀 z", " leading space", "two  spaces\nand\ttabs ", "XYXY<img><img>",
             "naïve café ünïcödé 日本語 👍🏽", "", " ", "tinyvlmXYtoken"]
    for text in texts:
        assert ours.encode(text) == ref.encode(text, add_bos=True), text
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text)) == text
        assert "".join(stream(ours, ours.encode(text))) == text


@pytest.mark.parametrize(("options", "message"), [
    ({"model_type": "unigram", "byte_fallback": True, "normalization_rule_name": "identity",
      "remove_extra_whitespaces": False}, "unigram"),
    ({"model_type": "bpe", "byte_fallback": True}, "charsmap"),
    ({"model_type": "bpe", "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
      "vocab_size": 100}, "byte_fallback"),
])
def test_unsupported_models_are_rejected(tmp_path: Path, options: dict[str, object], message: str) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(train_sentencepiece(**options))
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_sentencepiece(path)


# ---------------------------------------------------------------------------------------------------------
# from_dir


def test_from_dir_with_tokenizer_json(tok: Tokenizer, sp: spm.SentencePieceProcessor, tmp_path: Path) -> None:
    tok._tk.save(str(tmp_path / "tokenizer.json"))  # only tokenizer.json: from_dir must not need the .model
    loaded = Tokenizer.from_dir(tmp_path)
    texts = ["Hello world", "  Hello\n\n world", "Äpfel 東京 😀 ied 4 ½ months", "a</s>b", ""]
    for text in texts:
        assert loaded.encode(text) == tok.encode(text), text
    assert loaded.encode("Äpfel 東京 😀") == sp.encode("Äpfel 東京 😀", add_bos=True)
    assert (loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (1, 2, 32000)
    ids = loaded.encode(texts[2])
    assert loaded.decode(ids) == sp.decode(ids) == "".join(stream(loaded, ids))


def test_from_dir_reads_configs(model_path: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(model_path.read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<unk>"}}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "bos_token": "</s>"}))
    loaded = Tokenizer.from_dir(tmp_path)
    assert (loaded.bos_id, loaded.eos_id) == (2, 0)
    assert loaded.encode("Hello") == [15043]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(TokenizerError, match="<nope>"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_without_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "tokenizer.json" in str(err.value) and "tokenizer.model" in str(err.value)


def test_from_dir_rejects_byte_level_tokenizer_json(tmp_path: Path) -> None:
    import tokenizers

    byte_level = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    byte_level.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="byte_fallback"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("document, message", [
    ({"model": 5}, "expected a SentencePiece-style BPE model with byte_fallback, found model 5"),
    ({"model": {"type": ["BPE"], "byte_fallback": True}}, r"found type \['BPE'\]"),
    ([1, 2], "expected a JSON object, found list"),
    ({"model": {"type": "BPE", "byte_fallback": True, "vocab": 5}}, "the tokenizers library refuses it"),
])
def test_hostile_tokenizer_json(tmp_path: Path, document: object, message: str) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps(document))
    with pytest.raises(TokenizerError, match=message) as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(err.value) and "\n" not in str(err.value)


def test_tokenizer_json_that_panics_at_encode(tok: Tokenizer, tmp_path: Path) -> None:
    """A pre-tokenizer regex that makes the tokenizers library panic (a BaseException) when it encodes."""
    tok._tk.save(str(tmp_path / "tokenizer.json"))
    document = json.loads((tmp_path / "tokenizer.json").read_text())
    document["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(\\w+\\s?)+$"}, "behavior": "Isolated",
                                 "invert": False}
    (tmp_path / "tokenizer.json").write_text(json.dumps(document))
    hostile = Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="tokenizer.json .encoding.: the tokenizers library refuses it"):
        hostile.encode("a" * 40 + "!")


def test_merges_are_bounded(monkeypatch: pytest.MonkeyPatch, shared_data: Path) -> None:
    import tinyvlm.tokenizer

    monkeypatch.setattr(tinyvlm.tokenizer, "MAX_MERGES", 1000)
    with pytest.raises(TokenizerError, match="tokenizer.model: the pieces make more than 1000 BPE merges"):
        Tokenizer.from_sentencepiece(shared_data / "llama-spm-vocab" / "tokenizer.model")


def test_hostile_tokenizer_config(tok: Tokenizer, tmp_path: Path) -> None:
    tok._tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": "no"}')
    with pytest.raises(TokenizerError, match="add_bos_token in the tokenizer settings is .no.; expected true or false"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: JSON nested too deep"):
        Tokenizer.from_dir(tmp_path)


def test_hostile_tokenizer_model(shared_data: Path, tmp_path: Path) -> None:
    """Flipped and cut protobuf bytes, and a piece too long to rank merges for, are TokenizerErrors."""
    data = (shared_data / "llama-spm-vocab" / "tokenizer.model").read_bytes()
    (tmp_path / "cut.model").write_bytes(data[: len(data) // 3])
    piece = b"\x0a\xd0\x0f" + b"x" * 2000 + b"\x15" + bytes(4)  # field 1: the piece (2000 bytes), field 2: score
    (tmp_path / "long.model").write_bytes(data + b"\x0a" + bytes([len(piece) & 0x7F | 0x80, len(piece) >> 7]) + piece)
    with pytest.raises(TokenizerError, match="cut.model: not a valid SentencePiece model"):
        Tokenizer.from_sentencepiece(tmp_path / "cut.model")
    with pytest.raises(TokenizerError, match="long.model: unsupported SentencePiece model .a piece is longer than 256"):
        Tokenizer.from_sentencepiece(tmp_path / "long.model")


# ---------------------------------------------------------------------------------------------------------
# Streaming decode


@HYPOTHESIS
@given(text=TEXT)
def test_stream_equals_decode(tok: Tokenizer, sp: spm.SentencePieceProcessor, text: str) -> None:
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == sp.decode(sp.encode(text, add_bos=True))
    assert all("\ufffd" not in p or "\ufffd" in text for p in pieces)  # never half a character


@HYPOTHESIS
@given(ids=st.lists(st.integers(3, 31999), max_size=12))
def test_stream_of_random_ids_matches_sentencepiece(tok: Tokenizer, sp: spm.SentencePieceProcessor,
                                                    ids: list[int]) -> None:
    # Any ids, including byte pieces that are not valid UTF-8: sentencepiece turns each bad byte into U+FFFD.
    # One known difference: sentencepiece keeps a leading space that comes from a byte piece <0x20>, while
    # decode (tokenizers' Strip) removes it; the stream follows decode.
    assume(not ids or tok.id_to_piece(ids[0]) != "<0x20>")
    assert "".join(stream(tok, ids)) == sp.decode(ids)


def test_stream_holds_bytes_until_a_character_is_whole(tok: Tokenizer) -> None:
    llama = tok.encode("🦙", add_bos=False)
    assert [tok.id_to_piece(i) for i in llama] == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    # BOS skipped, the "▁" at the start stripped (as decode does), then the emoji once its 4th byte arrives.
    assert stream(tok, [1, *llama, 2]) == ["", "", "", "", "", "🦙", "", ""]
    assert stream(tok, [15043, *llama]) == ["Hello", " ", "", "", "", "🦙", ""]
    assert stream(tok, [15043, *llama[:3]]) == ["Hello", " ", "", "", "\ufffd\ufffd"]  # cut off: one per byte
    assert tok.decode([15043, *llama[:3]]) == "Hello \ufffd\ufffd"
    assert stream(tok, [29871, 15043]) == ["", " Hello", ""]  # as decode: "▁" + "▁Hello" -> " Hello"
