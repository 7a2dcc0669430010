"""Deterministic mixed text for tokenizer comparisons: CJK, code, emoji, digits, Latin,
Cyrillic, whitespace and newlines, in random fragments (seeded)."""

from __future__ import annotations

import random

_WORDS = ["the", "quick", "Brown", "fox", "don't", "I'LL", "naïve", "café", "Straße", "über"]
_CODE = [
    "def f(x):\n    return x**2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }\n",
    "self.value = obj.get('key', None)\n",
    '<div class="x">&nbsp;</div>\r\n',
    "\t\tif err != nil {\n\t\t\treturn err\n\t\t}\n",
]


def mixed_text(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        k = rng.randrange(9)
        if k == 0:
            s = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(rng.randrange(1, 12)))
        elif k == 1:
            s = rng.choice(_CODE)
        elif k == 2:
            s = "".join(chr(rng.randrange(0x1F300, 0x1FAFF)) for _ in range(rng.randrange(1, 4)))
            s += rng.choice(["", "\u200d", "\ufe0f", "\U0001f3fd"])
        elif k == 3:
            s = str(rng.randrange(10 ** rng.randrange(1, 12)))
            s += rng.choice([".", ",", " ", "-", "e-5", "%"])
        elif k == 4:
            s = "".join(chr(rng.randrange(0x0410, 0x044F)) for _ in range(rng.randrange(2, 9)))
        elif k == 5:
            s = rng.choice([" ", "  ", "\n", "\n\n", "\t", " \n ", "\r\n", "\u00a0", "\u3000"])
        elif k == 6:
            s = "".join(chr(rng.randrange(0x3040, 0x30FF)) for _ in range(rng.randrange(1, 8)))
        else:
            s = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(1, 6)))
        parts.append(s + (" " if rng.random() < 0.5 else ""))
        size += len(s)
    return "".join(parts)
