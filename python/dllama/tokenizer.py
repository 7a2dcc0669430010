"""Tokenizers: SentencePiece `.model` files and distributed-llama `.t` files.

A `.t` file holds pieces and scores but no pre-tokenizer or token types, so the scheme is
inferred from the vocabulary:

- **SentencePiece style** (the vocabulary has the 256 byte-fallback pieces `<0x00>`..`<0xFF>`;
  Llama 2, Mistral): a space is prepended (SentencePiece's dummy prefix), the text is split
  into characters, and the adjacent pair whose concatenation is a piece with the highest score
  is merged until none is left (leftmost on ties) - SentencePiece's BPE. Pieces that are not
  in the vocabulary become their UTF-8 bytes `<0xNN>`. Special tokens are pieces of the form
  `<...>` with score 0 (SentencePiece's control tokens); they never take part in merges.
- **Byte-level BPE** (otherwise; GPT-2 style: SmolLM2, Llama 3): the text is pre-tokenized
  by the pattern the vocabulary implies: Llama 3's when it has tokens of three digits but none
  longer (Llama 3 groups digits by three); Qwen's (Llama 3's with one digit at a time) when no
  token holds two digits and some glue punctuation to letters (".get"); SmolLM's (each digit
  alone, then GPT-2's) when no token holds two digits; GPT-2's otherwise. Then each piece's bytes are merged by score the same way. Our
  converter writes -(merge rank + 1) as the score, so this is the merge order of the
  original tokenizer. Special tokens are tokens of the form `<...>` that the encoder cannot
  produce from their own text (e.g. `<|im_start|>`).

- **distributed-llama's encoder** (any other vocabulary): the C++'s own algorithm, so that
  every `.t` it runs gives the same ids here: bytes are gathered until they spell a token
  (ids below bos_id), then pairs are merged by score; ids from bos_id on are special.

`encode(text, parse_special=True)` also turns the text of special tokens into their ids (as
Hugging Face tokenizers do; needed for chat templates).
"""

from __future__ import annotations

import heapq
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dllama._pretokenize import SPLITTERS

if TYPE_CHECKING:
    from dllama._core import TokenizerDict

_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
_SPECIAL_SHAPE = re.compile(rb"<[^\s<>]+>")
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/=]+ \d+\r?\n")
_NUMERIC2 = re.compile(rb" ?[0-9]{2,}")
_NUMERIC3 = re.compile(rb" ?[0-9]{3}")
_NUMERIC4 = re.compile(rb" ?[0-9]{4,}")
# punctuation glued to the letters after it (".get", "_id"): only a llama3 / qwen style
# pre-tokenizer ([^\r\n\p{L}\p{N}]?\p{L}+) produces such pieces
_PUNCT_WORD = re.compile(rb"[._(][a-z]+")


def _bpe(symbols: list[bytes], merge_score: dict[bytes, float]) -> list[bytes]:
    """Merges the adjacent pair whose concatenation has the highest score, leftmost first."""
    n = len(symbols)
    if n < 2:
        return symbols
    sym: list[bytes | None] = list(symbols)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    heap: list[tuple[float, int, bytes, bytes]] = []

    def push(left: int) -> None:
        right = nxt[left]
        if right >= n:
            return
        a, b = sym[left], sym[right]
        assert a is not None and b is not None
        s = merge_score.get(a + b)
        if s is not None:
            heapq.heappush(heap, (-s, left, a, b))

    for i in range(n - 1):
        push(i)
    while heap:
        _, left, a, b = heapq.heappop(heap)
        right = nxt[left] if left < n else n
        if sym[left] != a or right >= n or sym[right] != b:
            continue  # stale: one side was merged since
        sym[left] = a + b
        sym[right] = None
        nxt[left] = nxt[right]
        if nxt[right] < n:
            prv[nxt[right]] = left
        if prv[left] >= 0:
            push(prv[left])
        push(left)
    return [s for s in sym if s is not None]


def _merge_ids(
    ids: list[int], key: list[bytes], lookup: dict[bytes, int], scores: list[float]
) -> list[int]:
    """distributed-llama's merge loop: while some adjacent pair's concatenation is a token of
    `lookup` scoring above -1e10, merge the highest-scoring one, leftmost on ties. (A heap of
    candidate pairs instead of a rescan per merge: the same order.)"""
    n = len(ids)
    if n < 2:
        return ids
    cur: list[int | None] = list(ids)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    heap: list[tuple[float, int, int, int, int]] = []

    def push(left: int) -> None:
        right = nxt[left]
        if right >= n:
            return
        a, b = cur[left], cur[right]
        assert a is not None and b is not None
        j = lookup.get(key[a] + key[b])
        if j is not None and scores[j] > -1e10:
            heapq.heappush(heap, (-scores[j], left, a, b, j))

    for i in range(n - 1):
        push(i)
    while heap:
        _, left, a, b, j = heapq.heappop(heap)
        right = nxt[left]
        if cur[left] != a or right >= n or cur[right] != b:
            continue  # stale: one side was merged since
        cur[left] = j
        cur[right] = None
        nxt[left] = nxt[right]
        if nxt[right] < n:
            prv[nxt[right]] = left
        if prv[left] >= 0:
            push(prv[left])
        push(left)
    return [i for i in cur if i is not None]


class Tokenizer:
    """Encodes text to token ids and decodes them back (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        """A `.t` file, a SentencePiece `.model` (through sentencepiece), or any source the
        converter reads (tokenizer.json, Llama 3 tiktoken `tokenizer.model`, a GGUF)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if not path.is_file():
            raise ValueError(f"tokenizer path {path} is not a regular file")
        with open(path, "rb") as f:
            head = f.read(64)
        if head[:4] == b"GGUF" or head[:1] == b"{" or _TIKTOKEN_LINE.match(head):
            # a GGUF vocabulary, a tokenizer.json or Llama 3's tiktoken file: convert in memory
            from dllama.convert.tokenizers import load_tokenizer_source

            self._init_vocab(load_tokenizer_source(path))
        elif head[:1] == b"\n":  # a SentencePiece protobuf
            self._init_sentencepiece(path)
        else:
            from dllama import _core

            self._init_vocab(_core.read_tokenizer(str(path)))

    @classmethod
    def from_dict(cls, tok: TokenizerDict) -> Tokenizer:
        """A tokenizer over a `.t` dictionary (as `_core.read_tokenizer` returns it)."""
        self = cls.__new__(cls)
        self._init_vocab(tok)
        return self

    # ------------------------------------------------------------------ setup -----

    def _init_sentencepiece(self, path: Path) -> None:
        import sentencepiece as spm

        try:
            self._sp: Any = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from e
        sp = self._sp
        self.vocab = [
            sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8") for i in range(sp.vocab_size())
        ]
        self.bos_id: int = int(sp.bos_id())
        self.eos_ids: list[int] = [int(sp.eos_id())]
        self.add_bos = True
        self.chat_template: str | None = None
        self.scheme = "sentencepiece"
        self._byte_ids: dict[int, int] = {}
        for i in range(sp.vocab_size()):
            if sp.is_byte(i):
                m = _BYTE_PIECE.fullmatch(self.vocab[i])
                if m:
                    self._byte_ids[int(m.group(1), 16)] = i
        self._specials = {self.vocab[i]: i for i in range(sp.vocab_size()) if sp.is_control(i)}
        self._special_ids = set(self._specials.values())
        self._special_re: re.Pattern[str] | None = None

    def _init_vocab(self, tok: TokenizerDict) -> None:
        self._sp = None
        self.vocab = [bytes(p) for p in tok["vocab"]]
        scores: list[float] = [float(s) for s in tok["scores"]]
        if len(scores) != len(self.vocab):
            raise ValueError(f"{len(self.vocab)} tokens but {len(scores)} scores")
        self.bos_id = int(tok["bos_id"])
        self.eos_ids = [int(i) for i in tok["eos_ids"]]
        for what, i in [("bos", self.bos_id), *(("eos", e) for e in self.eos_ids)]:
            if i >= len(self.vocab) or (i < 0 and what == "eos"):
                raise ValueError(
                    f"{what} id {i} is outside the vocabulary of {len(self.vocab)} tokens"
                )
        self.add_bos = bool(tok.get("add_bos", True))
        self.chat_template = tok.get("chat_template")
        self._byte_ids = {}
        for i, piece in enumerate(self.vocab):
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                self._byte_ids.setdefault(int(m.group(1), 16), i)
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(self.vocab):
            self._ids.setdefault(piece, i)
        if len(self._byte_ids) == 256:
            self.scheme = "sentencepiece"
            specials = {
                i
                for i, p in enumerate(self.vocab)
                if scores[i] == 0.0 and _SPECIAL_SHAPE.fullmatch(p) and not _BYTE_PIECE.fullmatch(p)
            }
            excluded = specials | set(self._byte_ids.values())
            self._merge_score = {
                p: scores[i] for i, p in enumerate(self.vocab) if i not in excluded
            }
            self._piece_ids = {p: i for p, i in self._ids.items() if i not in excluded}
        elif sum(bytes([b]) in self._ids for b in range(256)) < 128:
            self._init_cpp(scores)
            return
        else:
            self._byte_ids = {}
            numeric2 = any(_NUMERIC2.fullmatch(p) for p in self.vocab)
            numeric3 = any(_NUMERIC3.fullmatch(p) for p in self.vocab)
            numeric4 = any(_NUMERIC4.fullmatch(p) for p in self.vocab)
            if numeric3 and not numeric4:
                self.scheme = "llama3"
            elif not numeric2 and any(_PUNCT_WORD.fullmatch(p) for p in self.vocab):
                self.scheme = "qwen"
            elif not numeric2:
                self.scheme = "smollm"
            else:
                self.scheme = "gpt2"
            self._merge_score = {p: scores[i] for i, p in enumerate(self.vocab)}
            self._piece_ids = self._ids
            specials = {
                i
                for i, p in enumerate(self.vocab)
                if _SPECIAL_SHAPE.fullmatch(p)
                and self._encode_ordinary(p.decode("utf-8", "replace")) != [i]
            }
        self._specials = {self.vocab[i]: i for i in sorted(specials)}
        self._special_ids = set(specials)
        self._special_re = (
            re.compile(
                "|".join(
                    re.escape(p.decode("utf-8", "replace"))
                    for p in sorted(self._specials, key=len, reverse=True)
                )
            )
            if self._specials
            else None
        )

    def _init_cpp(self, scores: list[float]) -> None:
        """distributed-llama's own encoder (src/tokenizer.cpp, after llama2.c), for vocabularies
        of no scheme recognised above: ids below bos_id are the regular vocabulary, the others
        special. Tokens are compared as C strings (up to a NUL byte)."""
        self.scheme = "cpp"
        self._byte_ids = {}
        n = len(self.vocab)
        regular = self.bos_id if 0 <= self.bos_id <= n else n
        self._cpp_key = [p.split(b"\0", 1)[0] for p in self.vocab]
        self._cpp_scores = scores
        self._cpp_regular: dict[bytes, int] = {}
        for i in range(regular):
            self._cpp_regular.setdefault(self._cpp_key[i], i)
        self._cpp_special = [(self._cpp_key[i], i) for i in range(regular, n) if self._cpp_key[i]]
        self._specials = {}
        self._special_ids = set(range(regular, n))
        self._special_re = None

    def _encode_cpp(self, text: str, parse_special: bool) -> list[int]:
        """Each byte is appended to a buffer that becomes a token as soon as it spells one (a
        special token's text at the position is taken first when `parse_special`); then the
        adjacent pair that spells a regular token of the highest score is merged, leftmost
        on ties, until none is left."""
        data = text.encode("utf-8")
        ids: list[int] = []
        buf = b""
        pos = 0
        while pos < len(data):
            if parse_special:
                hit = next((i for k, i in self._cpp_special if data.startswith(k, pos)), None)
                if hit is not None:
                    ids.append(hit)
                    pos += len(self._cpp_key[hit])
                    continue
            buf += data[pos : pos + 1]
            pos += 1
            i = self._cpp_regular.get(buf)
            if i is not None:
                ids.append(i)
                buf = b""
        if buf:
            raise ValueError(
                f"cannot encode {text[:40]!r}: the vocabulary has no token for the bytes {buf[:16]!r}"
            )
        return _merge_ids(ids, self._cpp_key, self._cpp_regular, self._cpp_scores)

    # ---------------------------------------------------------------- encoding -----

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def special_ids(self) -> set[int]:
        return set(self._special_ids)

    def encode(
        self, text: str, add_bos: bool | None = None, parse_special: bool = False
    ) -> list[int]:
        """Token ids of `text`; a bos id first when `add_bos` (default: the tokenizer's)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            # lone surrogates: bytes that were not UTF-8 (a command line's, kept by Python as
            # U+DC80..U+DCFF) or a JSON string's unpaired \ud800
            raise ValueError(
                f"the text is not valid Unicode at character {e.start} (U+{ord(text[e.start]):04X}): "
                "not UTF-8 bytes, or half of a surrogate pair"
            ) from None
        ids: list[int] = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id >= 0:
            ids.append(self.bos_id)
        if self.scheme == "cpp":
            return ids + self._encode_cpp(text, parse_special)
        if self._sp is not None:
            if parse_special and self._specials:
                return ids + self._encode_with_specials(text, self._sp_encode)
            return ids + self._sp_encode(text)
        if parse_special and self._special_re is not None:
            return ids + self._encode_with_specials(text, self._encode_ordinary)
        return ids + self._encode_ordinary(text)

    def _sp_encode(self, text: str) -> list[int]:
        return [int(i) for i in self._sp.encode(text)]

    def _encode_with_specials(self, text: str, encode: Any) -> list[int]:
        pattern = self._special_re or re.compile(
            "|".join(
                re.escape(p.decode("utf-8", "replace"))
                for p in sorted(self._specials, key=len, reverse=True)
            )
        )
        ids: list[int] = []
        pos = 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                ids += encode(text[pos : m.start()])
            ids.append(self._specials[m.group().encode("utf-8")])
            pos = m.end()
        if pos < len(text):
            ids += encode(text[pos:])
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        if not text:
            return []
        ids: list[int] = []
        if self.scheme == "sentencepiece":
            # SentencePiece: dummy prefix, characters as the initial symbols, byte fallback
            symbols = [ch.encode("utf-8") for ch in " " + text]
            for piece in _bpe(symbols, self._merge_score):
                i = self._piece_ids.get(piece)
                if i is not None:
                    ids.append(i)
                else:
                    ids += [self._byte_ids[b] for b in piece]
            return ids
        if self.scheme == "qwen":
            # Qwen's tokenizers compose the text first (tokenizer.json's NFC normalizer, and
            # QWenTokenizer before it); the .t file has no field for it, the scheme implies it
            text = unicodedata.normalize("NFC", text)
        for word in SPLITTERS[self.scheme](text):
            raw = word.encode("utf-8")
            if self.scheme in ("llama3", "qwen"):
                # tiktoken takes a piece that is a token as it is, whatever the merges say
                whole = self._piece_ids.get(raw)
                if whole is not None:
                    ids.append(whole)
                    continue
            for piece in _bpe([bytes([b]) for b in raw], self._merge_score):
                i = self._piece_ids.get(piece)
                if i is not None:  # a byte missing from the vocabulary is dropped, as in HF
                    ids.append(i)
        return ids

    # ---------------------------------------------------------------- decoding -----

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes this token stands for (`<0xNN>` pieces are the byte itself)."""
        if not 0 <= token_id < len(self.vocab):
            raise ValueError(f"token id {token_id} is outside the vocabulary of {len(self.vocab)}")
        piece = self.vocab[token_id]
        if self.scheme == "sentencepiece":
            m = _BYTE_PIECE.fullmatch(piece)
            if m and token_id in self._byte_ids.values():
                return bytes([int(m.group(1), 16)])
        return piece

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """The text of `ids` (invalid UTF-8 becomes U+FFFD)."""
        d = self.decoder(skip_special=skip_special)
        return "".join(d.feed(i) for i in ids) + d.flush()

    def decoder(self, skip_special: bool = True) -> StreamDecoder:
        """A decoder that turns ids into text as they come, never splitting a character."""
        return StreamDecoder(self, skip_special)

    # ------------------------------------------------------------------- chat -----

    def render_chat(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt text of `messages` under the tokenizer's chat template (else a built-in
        one that fits the vocabulary): see `dllama.chat_template`."""
        from dllama.chat_template import ChatTemplate

        return ChatTemplate(self).render(messages, add_generation_prompt)


class StreamDecoder:
    """Feeds token ids, returns the text that is complete so far.

    Bytes of an unfinished UTF-8 character wait for the next token; an invalid sequence
    becomes U+FFFD. In SentencePiece style the dummy-prefix space of the first piece is dropped.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool) -> None:
        self.tok = tokenizer
        self.skip_special = skip_special
        self._pending = b""
        self._first = True

    def feed(self, token_id: int) -> str:
        tok = self.tok
        if self.skip_special and (token_id in tok._special_ids or token_id == tok.bos_id):
            return ""
        data = tok.piece_bytes(token_id)
        if self._first and tok.scheme == "sentencepiece" and data.startswith(b" "):
            data = data[1:]
        self._first = False
        self._pending += data
        return self._take(final=False)

    def flush(self) -> str:
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        buf = self._pending
        if final:
            self._pending = b""
            return buf.decode("utf-8", "replace")
        cut = _complete_prefix(buf)
        self._pending = buf[cut:]
        return buf[:cut].decode("utf-8", "replace")


def _complete_prefix(buf: bytes) -> int:
    """Length of `buf` without a trailing, still incomplete UTF-8 sequence."""
    n = len(buf)
    for back in range(1, min(4, n) + 1):
        b = buf[n - back]
        if b & 0xC0 == 0x80:
            continue  # continuation byte: look further back for the lead byte
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return n - back if need > back else n
    return n
