"""Tokenizer conversions to distributed-llama's `.t` dictionary (see DESIGN.md).

Pieces are stored the way distributed-llama's own converters store them, so our `.t` files
work in the C++ project too:
- SentencePiece (Llama 2, Mistral): the piece text with `▁` replaced by a space, UTF-8
  encoded; byte-fallback pieces keep their literal text `<0xNN>`; the model's scores.
- Byte-level BPE (GPT-2 style: SmolLM2, Llama 3): the raw bytes of each token (GPT-2's
  byte-to-unicode mapping undone); special tokens as their UTF-8 text. Scores are
  -(merge rank + 1) for tokens made by a merge, so merging the highest-scoring pair first
  follows the merge order; tokens that no merge produces (bytes, specials) get -1e9.

Sources: a SentencePiece `tokenizer.model`, Meta's Llama 3 tiktoken `tokenizer.model`, a Hugging Face `tokenizer.json` (with
`tokenizer_config.json` / `config.json` beside it for bos/eos, add_bos and the chat template),
or the vocabulary of a GGUF file (`tokenizer.ggml.*`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dllama.convert.source import ConvertError

if TYPE_CHECKING:
    from dllama._core import TokenizerDict

NO_MERGE_SCORE = -1e9
SP_SPACE = "\u2581"  # ▁


def byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode character -> byte table (inverse of bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _byte_level_bytes(token: str, table: dict[str, int]) -> bytes:
    if all(ch in table for ch in token):
        return bytes(table[ch] for ch in token)
    return token.encode("utf-8")


def _tok_dict(
    vocab: list[bytes],
    scores: list[float],
    bos_id: int,
    eos_ids: list[int],
    *,
    add_bos: bool,
    chat_template: str | None,
    pad_id: int = -1,
) -> TokenizerDict:
    if not vocab:
        raise ConvertError("the tokenizer has an empty vocabulary")
    for i, piece in enumerate(vocab):
        if not piece:
            raise ConvertError(f"token {i} is empty (the .t format needs at least one byte)")
    n = len(vocab)
    for what, ids in (("bos", [bos_id]), ("eos", eos_ids)):
        for i in ids:
            if not 0 <= i < n:
                raise ConvertError(f"{what} id {i} is outside the vocabulary of {n} tokens")
    eos = list(dict.fromkeys(eos_ids))
    return {
        "version": 1,
        "vocab": vocab,
        "scores": [float(s) for s in scores],
        "max_token_length": max(len(p) for p in vocab),
        "bos_id": bos_id,
        "eos_ids": eos,
        "pad_id": pad_id if pad_id is not None and 0 <= pad_id < n else -1,
        "chat_eos_id": eos[0] if eos else -1,
        "chat_template": chat_template or None,
        "add_bos": bool(add_bos),
    }


# ---------------------------------------------------------------- SentencePiece -----


def _sp_processor(path: Path) -> Any:
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise ConvertError(f"{path}: not a SentencePiece model ({e})") from e


def tokenizer_vocab_size(path: Path) -> int:
    return len(load_tokenizer_source(path)["vocab"])


def from_sentencepiece(path: str | Path) -> TokenizerDict:
    """A SentencePiece `tokenizer.model` (Llama 2, Mistral)."""
    path = Path(path)
    sp = _sp_processor(path)
    vocab = [
        sp.id_to_piece(i).replace(SP_SPACE, " ").encode("utf-8") for i in range(sp.vocab_size())
    ]
    scores = [sp.get_score(i) for i in range(sp.vocab_size())]
    config = _side_config(path.parent)
    eos = [int(sp.eos_id())] + _extra_eos(path.parent)
    return _tok_dict(
        vocab,
        scores,
        int(sp.bos_id()),
        eos,
        add_bos=bool(config.get("add_bos_token", True)),
        chat_template=_template(config),
        pad_id=int(sp.pad_id()),
    )


# ------------------------------------------------------------- tokenizer.json -------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data


def _side_config(folder: Path) -> dict[str, Any]:
    p = folder / "tokenizer_config.json"
    return _read_json(p) if p.is_file() else {}


def _template(config: dict[str, Any]) -> str | None:
    t = config.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) else None


def _extra_eos(folder: Path) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        p = folder / name
        if p.is_file():
            value = _read_json(p).get("eos_token_id")
            if isinstance(value, int):
                ids.append(value)
            elif isinstance(value, list):
                ids += [int(v) for v in value]
    return ids


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def from_tokenizer_json(path: str | Path) -> TokenizerDict:
    """A Hugging Face `tokenizer.json` with a BPE model (byte-level, or SentencePiece-style)."""
    path = Path(path)
    data = _read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ConvertError(f"{path}: unsupported tokenizer model {model.get('type')!r} (only BPE)")
    token_to_id: dict[str, int] = dict(model.get("vocab") or {})
    added = {int(t["id"]): t for t in data.get("added_tokens") or []}
    for i, t in added.items():
        token_to_id[t["content"]] = i
    n = max(token_to_id.values()) + 1
    names: list[str | None] = [None] * n
    for tok, i in token_to_id.items():
        names[i] = tok
    missing = [i for i, t in enumerate(names) if t is None]
    if missing:
        raise ConvertError(
            f"{path}: token ids {missing[:5]} have no token (holes in the vocabulary)"
        )
    # SentencePiece-style (Llama 2 / Mistral tokenizer.json): byte fallback, or ▁ for spaces
    pre = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")], ensure_ascii=False)
    sp_style = bool(model.get("byte_fallback")) or SP_SPACE in pre
    table = byte_decoder()
    rank = _merge_ranks(model.get("merges") or [])
    vocab: list[bytes] = []
    scores: list[float] = []
    for i, name in enumerate(names):
        assert name is not None
        tok = name
        if i in added or sp_style:
            vocab.append(
                tok.replace(SP_SPACE, " ").encode("utf-8") if sp_style else tok.encode("utf-8")
            )
        else:
            vocab.append(_byte_level_bytes(tok, table))
        if i in added or (sp_style and tok.startswith("<0x") and len(tok) == 6):
            scores.append(0.0 if sp_style else NO_MERGE_SCORE)
        else:
            r = rank.get(tok)
            scores.append(-(r + 1.0) if r is not None else NO_MERGE_SCORE)
    config = _side_config(path.parent)
    bos_text = _token_text(config.get("bos_token"))
    eos_text = _token_text(config.get("eos_token"))
    bos_id = token_to_id.get(bos_text) if bos_text else None
    eos_ids = [token_to_id[eos_text]] if eos_text in token_to_id else []
    eos_ids += _extra_eos(path.parent)
    if bos_id is None:
        cfg = (
            _read_json(path.parent / "config.json")
            if (path.parent / "config.json").is_file()
            else {}
        )
        bos_id = cfg.get("bos_token_id")
    if bos_id is None or not eos_ids:
        raise ConvertError(
            f"{path}: cannot find the bos/eos tokens (put tokenizer_config.json with "
            "bos_token and eos_token, or config.json with bos_token_id/eos_token_id, beside it)"
        )
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # Llama 3's files say it only in tokenizer.json's post-processor
        bos_name = names[int(bos_id)] if 0 <= int(bos_id) < n else None
        add_bos = _post_processor_prepends(data.get("post_processor"), bos_name)
    if add_bos is None:
        add_bos = sp_style
    return _tok_dict(
        vocab,
        scores,
        int(bos_id),
        eos_ids,
        add_bos=bool(add_bos),
        chat_template=_template(config),
    )


def _post_processor_prepends(proc: Any, bos: str | None) -> bool | None:
    """Whether a tokenizer.json post-processor puts `bos` first in a single sequence: True or
    False for a TemplateProcessing (alone or inside a Sequence), None when there is none."""
    if not isinstance(proc, dict):
        return None
    if proc.get("type") == "Sequence":
        found = [_post_processor_prepends(p, bos) for p in proc.get("processors") or []]
        return next((f for f in found if f is not None), None)
    if proc.get("type") != "TemplateProcessing":
        return None
    single = proc.get("single") or []
    first = single[0] if isinstance(single, list) and single else None
    special = first.get("SpecialToken") if isinstance(first, dict) else None
    return isinstance(special, dict) and bos is not None and special.get("id") == bos


def _merge_ranks(merges: list[Any]) -> dict[str, int]:
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    return rank


# --------------------------------------------------------------------- GGUF ---------

GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4


def from_gguf(path: str | Path) -> TokenizerDict:
    """The vocabulary of a GGUF file (`tokenizer.ggml.model` "llama" or "gpt2")."""
    from dllama.convert.gguf_file import GGUFError, GGUFFile

    try:
        g = GGUFFile(path)
    except GGUFError as e:
        raise ConvertError(str(e)) from e
    with g:
        kind = g.get("tokenizer.ggml.model")
        tokens: list[str] | None = g.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ConvertError(f"{path}: the GGUF has no vocabulary (tokenizer.ggml.tokens)")
        types: list[int] = g.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        bos = g.get("tokenizer.ggml.bos_token_id")
        eos = g.get("tokenizer.ggml.eos_token_id")
        if bos is None or eos is None:
            raise ConvertError(f"{path}: the GGUF vocabulary has no bos/eos token ids")
        eos_ids = [int(eos)] + [
            int(g.get(k))
            for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if g.get(k) is not None
        ]
        template = g.get("tokenizer.chat_template")
        pad = g.get("tokenizer.ggml.padding_token_id")
        if kind == "llama":
            scores = g.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            vocab = [t.replace(SP_SPACE, " ").encode("utf-8") for t in tokens]
            add_bos = g.get("tokenizer.ggml.add_bos_token", True)
        elif kind == "gpt2":
            table = byte_decoder()
            rank = _merge_ranks(g.get("tokenizer.ggml.merges") or [])
            vocab, scores = [], []
            for t, ty in zip(tokens, types):
                special = ty in (GGUF_CONTROL, GGUF_USER_DEFINED)
                vocab.append(t.encode("utf-8") if special else _byte_level_bytes(t, table))
                r = None if special else rank.get(t)
                scores.append(-(r + 1.0) if r is not None else NO_MERGE_SCORE)
            add_bos = g.get("tokenizer.ggml.add_bos_token", False)
        else:
            raise ConvertError(f"{path}: unsupported GGUF tokenizer model {kind!r} (llama or gpt2)")
    return _tok_dict(
        vocab,
        [float(s) for s in scores],
        int(bos),
        eos_ids,
        add_bos=bool(add_bos),
        chat_template=template,
        pad_id=int(pad) if pad is not None else -1,
    )


# ----------------------------------------------------------- tiktoken (Llama 3) ----

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/=]+ \d+\r?\n")
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


#: Qwen's tiktoken file (`qwen.tiktoken`: 151 643 ranks) is followed by these specials, as
#: Qwen's own tiktoken tokenizer numbers them (from 151 643)
QWEN_N_RANKS = 151643
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [
    f"<|extra_{i}|>" for i in range(205)
]
#: ChatML with Qwen3's thinking switch: `enable_thinking=False` closes an empty think block
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)


def from_tiktoken(path: str | Path) -> TokenizerDict:
    """Meta's Llama 3 `tokenizer.model` (tiktoken ranks: one "base64 rank" line per token).

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, so the score of
    a token is -rank and merging by highest score is exactly tiktoken's algorithm. The 256
    special tokens follow the base tokens, in Llama 3's order.
    """
    path = Path(path)
    vocab: list[bytes] = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                piece = base64.b64decode(token, validate=True)
            except (ValueError, binascii.Error) as e:
                raise ConvertError(f"{path}:{n}: not a tiktoken line ({e})") from e
            if int(rank) != len(vocab):
                raise ConvertError(
                    f"{path}:{n}: rank {int(rank)} out of order (expected {len(vocab)})"
                )
            vocab.append(piece)
    n_base = len(vocab)
    scores = [-float(i) for i in range(n_base)]
    if n_base == QWEN_N_RANKS:
        return _qwen_tiktoken(path, vocab, scores)
    specials = LLAMA3_SPECIALS + [
        f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))
    ]
    vocab += [s.encode("utf-8") for s in specials]
    scores += [NO_MERGE_SCORE] * len(specials)
    ids = {s: n_base + i for i, s in enumerate(specials)}
    return _tok_dict(
        vocab,
        scores,
        ids["<|begin_of_text|>"],
        [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
        add_bos=True,
        chat_template=_template(_side_config(path.parent)) or LLAMA3_CHAT_TEMPLATE,
        pad_id=ids["<|finetune_right_pad_id|>"],
    )


def _qwen_tiktoken(path: Path, vocab: list[bytes], scores: list[float]) -> TokenizerDict:
    """Qwen's byte-level BPE: no bos token (bos_id points at <|endoftext|>, add_bos off),
    generation stops at <|im_end|> or <|endoftext|>."""
    n_base = len(vocab)
    vocab = vocab + [s.encode("utf-8") for s in QWEN_SPECIALS]
    scores = scores + [NO_MERGE_SCORE] * len(QWEN_SPECIALS)
    ids = {s: n_base + i for i, s in enumerate(QWEN_SPECIALS)}
    return _tok_dict(
        vocab,
        scores,
        ids["<|endoftext|>"],
        [ids["<|im_end|>"], ids["<|endoftext|>"]],
        add_bos=False,
        chat_template=_template(_side_config(path.parent)) or QWEN_CHAT_TEMPLATE,
        pad_id=ids["<|endoftext|>"],
    )


def load_tokenizer_source(path: str | Path) -> TokenizerDict:
    """Picks the conversion from the file: .model, tokenizer.json, .gguf (or a folder)."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer_source(path / name)
        raise ConvertError(f"{path}: no tokenizer.json or tokenizer.model in this folder")
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] == b"GGUF":
        return from_gguf(path)
    if path.suffix == ".json" or head[:1] == b"{":
        return from_tokenizer_json(path)
    if _TIKTOKEN_LINE.match(head):
        return from_tiktoken(path)
    if path.name.endswith(".model") or ".model." in path.name or head[:1] == b"\n":
        return from_sentencepiece(path)  # a SentencePiece protobuf
    raise ConvertError(
        f"{path}: not a tokenizer this converter knows (a SentencePiece .model, "
        "a Hugging Face tokenizer.json or a .gguf)"
    )
