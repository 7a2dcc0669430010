"""The README's table of environment variables against the code: every variable the code reads
(and every `DLLAMA_*` name anywhere) is in the table, and the table names none that is gone."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

THIS = Path(__file__).resolve()
ROOT = THIS.parent.parent
SOURCE_SUFFIXES = {".py", ".pyi", ".rs", ".sh"}
#: reads of one variable by name, in Rust and Python (the scripts' are all DLLAMA_ names)
READS = re.compile(r'env::var\("(\w+)"\)|environ\.get\("(\w+)"|environ\["(\w+)"\]|getenv\("(\w+)"')
PREFIXED = re.compile(r"\bDLLAMA_[A-Z0-9_]+\b")


def sources() -> Iterator[Path]:
    for folder in ("python", "rust", "scripts", "benchmarks", "converter", "tests", ".ci"):
        for dirpath, dirnames, filenames in os.walk(ROOT / folder):
            dirnames[:] = [d for d in dirnames if d not in ("target", "corpus", "__pycache__")]
            for name in filenames:
                p = Path(dirpath) / name
                if (p.suffix in SOURCE_SUFFIXES or p.parent.name == ".ci") and p != THIS:
                    yield p


def test_readme_lists_every_environment_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Environment variables\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE))
    texts = {p: p.read_text(errors="replace") for p in sources()}
    used: set[str] = set()
    for p, text in texts.items():
        used |= set(PREFIXED.findall(text))
        if p.relative_to(ROOT).parts[0] != "tests":  # the tests' own TMPDIR, PYTHONPATH...
            used |= {g for m in READS.finditer(text) for g in m.groups() if g}
    assert used - listed == set(), "read by the code but not in README.md's table"
    stale = {name for name in listed if not any(name in text for text in texts.values())}
    assert stale == set(), "in README.md's table but nowhere in the code"
