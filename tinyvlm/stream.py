"""StreamDecoder: a tokenizer's generated ids turned into text one id at a time, as `Tokenizer.decode` would."""
from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tinyvlm.tokenizer import Tokenizer


class StreamDecoder:
    """Turns generated ids into text one id at a time.

    Byte-fallback pieces are held until they complete a UTF-8 character, and the single leading space that
    `decode` strips from the whole text (when the model adds a dummy prefix) is stripped here from the first
    text produced. For ids whose byte
    pieces form valid UTF-8 (everything `encode` returns), the pushes plus flush equal `decode(ids)`.
    A byte that cannot be part of valid UTF-8 becomes one U+FFFD as soon as that is known (SentencePiece's
    rule; `decode` instead replaces every byte of a run of byte pieces that is not valid as a whole).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._pending = b""  # the first bytes of an unfinished UTF-8 character
        self._at_start = tokenizer.strips_leading_space
        # Byte-level pieces may hold any run of bytes: decoded incrementally, as `decode` does for the whole.
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer.byte_level else None

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often "", e.g. inside a multi-byte character)."""
        data = self._tokenizer.token_bytes(token_id, self._skip_special)
        if not data:  # a skipped special token: decode drops it before joining byte pieces, so do we
            return ""
        if self._bytes is not None:
            return self._emit(self._bytes.decode(data))
        if len(data) == 1 and data[0] >= 0x80:  # a byte piece that may start or continue a character
            return self._emit(self._push_byte(data))
        return self._emit(self._drop_pending() + data.decode("utf-8"))

    def flush(self) -> str:
        """Text still held back: an unfinished character at the end becomes one U+FFFD per byte
        (one U+FFFD in all for a byte-level tokenizer, as its `decode` does)."""
        if self._bytes is not None:
            return self._emit(self._bytes.decode(b"", final=True))
        return self._emit(self._drop_pending())

    def _push_byte(self, byte: bytes) -> str:
        joined = _utf8_split(self._pending + byte)
        if joined is not None:
            text, self._pending = joined
            return text
        lost = self._drop_pending()  # the held bytes can no longer complete a character
        alone = _utf8_split(byte)
        if alone is None:
            return lost + "\ufffd"
        text, self._pending = alone
        return lost + text

    def _drop_pending(self) -> str:
        text, self._pending = "\ufffd" * len(self._pending), b""
        return text

    def _emit(self, text: str) -> str:
        if self._at_start and text:
            self._at_start = False
            return text.removeprefix(" ")
        return text


def _utf8_split(data: bytes) -> tuple[str, bytes] | None:
    """(text, b"") when data is whole UTF-8, ("", data) when it is the start of one character, else None."""
    try:
        return data.decode("utf-8"), b""
    except UnicodeDecodeError as err:
        return ("", data) if err.reason == "unexpected end of data" else None
