"""Pre-tokenizers of byte-level BPE vocabularies, as hand-written scanners.

They split text exactly like these regular expressions (with Unicode classes \\p{L}, \\p{N},
\\s), without needing the third-party `regex` package:

- "gpt2" (GPT-2, SmolLM2, StarCoder):
  's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
- "smollm" (SmolLM/SmolLM2, StarCoder: Hugging Face's Digits(individual_digits=True) before
  the byte-level regex): every \\p{N} character alone, then "gpt2" on the text between them
- "llama3" (Llama 3):
  (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}
  | ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+
- "qwen" (Qwen, Qwen2, Qwen3): the "llama3" expression with \\p{N} (one digit at a time) in
  place of \\p{N}{1,3}
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")
L, N, S, O = 0, 1, 2, 3  # letter, number, whitespace, other


@lru_cache(maxsize=65536)
def _cls(c: str) -> int:
    cat = unicodedata.category(c)
    if cat[0] == "L":
        return L
    if cat[0] == "N":
        return N
    # \s is Unicode White_Space; str.isspace() also accepts the separators \x1c-\x1f
    if c.isspace() and c not in "\x1c\x1d\x1e\x1f":
        return S
    return O


def _run(text: str, i: int, cls: int) -> int:
    n = len(text)
    while i < n and _cls(text[i]) == cls:
        i += 1
    return i


def _contraction(text: str, i: int, ignore_case: bool) -> int:
    if text[i] != "'":
        return 0
    for c in _CONTRACTIONS:
        s = text[i + 1 : i + 1 + len(c)]
        if s == c or (ignore_case and s.lower() == c):
            return 1 + len(c)
    return 0


def _whitespace(text: str, i: int) -> int:
    # \s+(?!\S) then \s+: leave the last space of a run to the word that follows it
    end = _run(text, i, S)
    if end < len(text) and end - i >= 2:
        return end - 1
    return end


def split_gpt2(text: str) -> list[str]:
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        k = _contraction(text, i, False)
        if k:
            out.append(text[i : i + k])
            i += k
            continue
        start = i
        if text[i] == " " and i + 1 < n and _cls(text[i + 1]) != S:
            i += 1
        c = _cls(text[i])
        if c == S:
            end = _whitespace(text, i)
        else:
            end = _run(text, i, c)
        out.append(text[start:end])
        i = end
    return out


def split_llama3(text: str, max_digits: int = 3) -> list[str]:
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        end = _llama3_match(text, i, max_digits)
        out.append(text[i:end])
        i = end
    return out


def split_qwen(text: str) -> list[str]:
    return split_llama3(text, max_digits=1)


def _llama3_match(text: str, i: int, max_digits: int) -> int:
    n = len(text)
    k = _contraction(text, i, True)
    if k:
        return i + k
    c = _cls(text[i])
    nxt = _cls(text[i + 1]) if i + 1 < n else -1
    # [^\r\n\p{L}\p{N}]?\p{L}+
    if c == L:
        return _run(text, i, L)
    if c != N and text[i] not in "\r\n" and nxt == L:
        return _run(text, i + 1, L)
    # \p{N}{1,3} (Qwen: \p{N})
    if c == N:
        return min(_run(text, i, N), i + max_digits)
    # ?[^\s\p{L}\p{N}]+[\r\n]*
    j = i + 1 if text[i] == " " and nxt == O else i
    if _cls(text[j]) == O:
        j = _run(text, j, O)
        while j < n and text[j] in "\r\n":
            j += 1
        return j
    # \s*[\r\n]+ : up to the end of the last newline inside this whitespace run
    end = _run(text, i, S)
    last_nl = max(text.rfind("\r", i, end), text.rfind("\n", i, end))
    if last_nl >= 0:
        return last_nl + 1
    # \s+(?!\S) | \s+
    return _whitespace(text, i)


def split_smollm(text: str) -> list[str]:
    out: list[str] = []
    start = 0
    for i, ch in enumerate(text):
        if _cls(ch) == N:
            if i > start:
                out += split_gpt2(text[start:i])
            out.append(ch)
            start = i + 1
    if start < len(text):
        out += split_gpt2(text[start:])
    return out


SPLITTERS = {
    "gpt2": split_gpt2,
    "smollm": split_smollm,
    "llama3": split_llama3,
    "qwen": split_qwen,
}
