"""README.md against the code: its table of environment variables (every variable the code
reads, and every `DLLAMA_*` name anywhere, is in the table, and the table names none that is
gone), and its Qwen3-30B-A3B-on-4-Pis memory figures (what a node's check computes)."""

from __future__ import annotations

import os
import re
import socket
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


#: Qwen3-30B-A3B's config.json as the converter writes it into the header (hidden_size,
#: intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
#: num_experts, num_experts_per_tok, moe_intermediate_size, vocab_size,
#: max_position_embeddings, rope_theta, rms_norm_eps, norm_topk_prob), Q40 weights
QWEN3_30B_A3B: dict[str, int | float] = {
    "version": 0,
    "arch_type": 0xABCD02,
    "dim": 2048,
    "hidden_dim": 6144,
    "n_layers": 48,
    "n_heads": 32,
    "n_kv_heads": 4,
    "head_dim": 128,
    "n_experts": 128,
    "n_active_experts": 8,
    "moe_hidden_dim": 768,
    "vocab_size": 151936,
    "max_seq_len": 40960,
    "hidden_act": 1,
    "rope_theta": 1000000,
    "rope_type": 1,
    "norm_epsilon": 1e-6,
    "norm_topk_prob": 1,
    "weights_float_type": 2,
}


def test_readme_qwen3_moe_on_four_pis_memory(tmp_path: Path) -> None:
    """The README's Qwen3-30B-A3B figures are what the root computes of its slice of 4 nodes
    before loading (weights + KV cache and RoPE table, refused beyond `max_memory`): found
    exactly by bisection on `max_memory` against an 18 GB sparse file (nothing is read) and 3
    workers whose ports refuse connections (a run that passes the check stops there)."""
    from dllama import _core

    section = (ROOT / "README.md").read_text().split("**Qwen3-30B-A3B on 4 × Raspberry Pi 5")[1]
    text = " ".join(section.split("```")[0].split())

    def figure(pattern: str) -> float:
        m = re.search(pattern, text)
        assert m, f"README.md: {pattern!r} not found in the Qwen3-30B-A3B paragraph"
        return float(m.group(1))

    tensors = _core.model_tensors(QWEN3_30B_A3B)
    size = tensors[-1].offset + tensors[-1].nbytes
    path = tmp_path / "qwen3-30b-a3b-q40.m"
    with open(path, "wb") as f:
        f.write(_core.encode_model_header(QWEN3_30B_A3B))
        f.truncate(size)
    # bound, never listening: a connection is refused at once, and no other process can
    # take the port meanwhile
    closed = [socket.socket() for _ in range(3)]
    for s in closed:
        s.bind(("127.0.0.1", 0))
    workers = [f"127.0.0.1:{s.getsockname()[1]}" for s in closed]

    def fits(limit: int, seq: int) -> bool:
        try:
            _core.Node(str(path), workers=workers, max_seq_len=seq, max_memory=limit)
        except ValueError as e:
            assert "this model needs" in str(e), e
            return False
        except ConnectionError:
            return True
        raise AssertionError("a root with 3 unreachable workers started")

    def need(seq: int) -> int:
        lo, hi = 0, 1 << 40  # fits(lo) is false, fits(hi) true
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid, seq) else (mid, hi)
        return hi

    try:
        at_1024, at_2048, at_4096 = need(1024), need(2048), need(4096)
    finally:
        for s in closed:
            s.close()
    per_1024 = at_2048 - at_1024
    weights = at_1024 - per_1024
    embedding = next(t.nbytes for t in tensors if t.name == "embedding")
    assert figure(r"The Q40 file is (\d+\.\d+) GB") == round(size / 1e9, 2)
    assert figure(r"(\d+\.\d+) GB of weights per node") == round(weights / 1e9, 2)
    assert figure(r"F32 embedding \((\d+\.\d+) GB") == round(embedding / 1e9, 2)
    assert figure(r"(\d+\.\d+) MB per 1 024 positions") == round(per_1024 / 1e6, 1)
    assert figure(r"(\d+) MB at `--max-seq-len 4096`") == round((at_4096 - weights) / 1e6)
    rows = int(QWEN3_30B_A3B["vocab_size"]) // 4
    assert f"{rows // 1000} {rows % 1000:03d} of the 151 936 classifier rows" in text
