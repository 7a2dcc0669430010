"""Peak resident memory of `dllama convert` on a large generated checkpoint.

    python benchmarks/convert_memory.py --shape 7b --source hf   --dir /tmp/dllama-mem
    python benchmarks/convert_memory.py --shape 7b --source meta --dir /tmp/dllama-mem

Writes a random checkpoint of the given shape (Hugging Face: config.json + one f16
model.safetensors; Meta: params.json + consolidated.00.pth in f16, made from the same bytes),
then runs `dllama convert ... --type q40` in a child process and reports its peak RSS
(ru_maxrss) beside the checkpoint size. The values are random: only sizes and memory matter.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = {
    # dim, hidden, layers, heads, kv heads, vocab
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "1b": (2048, 5632, 22, 32, 4, 32000),
    "small": (1024, 2816, 8, 16, 4, 32000),
}


def hf_tensors(shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    dim, hidden, n_layers, n_heads, n_kv, vocab = shape
    hd = dim // n_heads
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, dim))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (n_heads * hd, dim)),
            (p + "self_attn.k_proj.weight", (n_kv * hd, dim)),
            (p + "self_attn.v_proj.weight", (n_kv * hd, dim)),
            (p + "self_attn.o_proj.weight", (dim, n_heads * hd)),
            (p + "mlp.gate_proj.weight", (hidden, dim)),
            (p + "mlp.down_proj.weight", (dim, hidden)),
            (p + "mlp.up_proj.weight", (hidden, dim)),
            (p + "input_layernorm.weight", (dim,)),
            (p + "post_attention_layernorm.weight", (dim,)),
        ]
    return out + [("model.norm.weight", (dim,)), ("lm_head.weight", (vocab, dim))]


def write_hf(folder: Path, shape: tuple[int, ...]) -> Path:
    dim, hidden, n_layers, n_heads, n_kv, vocab = shape
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    header: dict[str, object] = {}
    offset = 0
    tensors = hf_tensors(shape)
    for name, shp in tensors:
        n = int(np.prod(shp)) * 2
        header[name] = {"dtype": "F16", "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    pool = (np.random.default_rng(0).standard_normal(1 << 24) * 0.02).astype(np.float16).tobytes()
    path = folder / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        left = offset
        while left:
            chunk = pool[: min(left, len(pool))]
            f.write(chunk)
            left -= len(chunk)
    return path


def write_meta(folder: Path, hf_file: Path, shape: tuple[int, ...]) -> None:
    """A one-shard Meta checkpoint whose tensors are views of the safetensors bytes."""
    import torch

    dim, _, n_layers, n_heads, n_kv, _ = shape
    folder.mkdir(parents=True, exist_ok=True)
    with open(hf_file, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    (n,) = struct.unpack("<Q", m[:8])
    header = json.loads(m[8 : 8 + n])
    base = 8 + n
    rename = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    sd = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if name in rename:
            key = rename[name]
        else:
            parts = name.split(".")  # model.layers.{i}.<module path>.weight
            key = f"layers.{parts[2]}.{layer['.'.join(parts[3:-1])]}.weight"
        begin, end = e["data_offsets"]
        t = torch.frombuffer(m, dtype=torch.float16, count=(end - begin) // 2, offset=base + begin)
        sd[key] = t.reshape(e["shape"])
    torch.save(sd, folder / "consolidated.00.pth")
    params = {
        "dim": dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "vocab_size": -1,
        "multiple_of": 256,
        "norm_eps": 1e-5,
    }
    (folder / "params.json").write_text(json.dumps(params))


def measure(src: Path, out: Path, float_type: str) -> tuple[float, int]:
    cmd = [
        sys.executable,
        "-m",
        "dllama.cli",
        "convert",
        str(src),
        "--out",
        str(out),
        "--type",
        float_type,
        "--no-progress",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"conversion failed: {cmd}")
    return elapsed, usage.ru_maxrss * 1024  # Linux reports KiB


def _generate_in_child() -> None:
    # Generation maps the whole checkpoint; a child forked from a process with a large
    # resident set inherits that high-water mark in ru_maxrss, so generate in another process.
    subprocess.run([sys.executable, *sys.argv, "--generate-only"], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--source", choices=["hf", "meta"], default="hf")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dllama-convert-mem"))
    ap.add_argument("--type", default="q40")
    ap.add_argument("--keep", action="store_true", help="keep the converted file")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    if not args.generate_only:
        _generate_in_child()
    hf_dir = args.dir / f"{args.shape}-hf"
    hf_file = hf_dir / "model.safetensors"
    if not hf_file.is_file():
        print(f"generating {hf_dir} ...", flush=True)
        write_hf(hf_dir, shape)
    src = hf_dir
    if args.source == "meta":
        src = args.dir / f"{args.shape}-meta"
        if not (src / "consolidated.00.pth").is_file():
            print(f"generating {src} ...", flush=True)
            write_meta(src, hf_file, shape)
    if args.generate_only:
        return
    size = sum(p.stat().st_size for p in src.iterdir())
    out = args.dir / f"{args.shape}-{args.source}-{args.type}.m"
    elapsed, peak = measure(src, out, args.type)
    print(
        f"{args.shape} {args.source} -> {args.type}: checkpoint {size / 1e9:.2f} GB, "
        f"output {out.stat().st_size / 1e9:.2f} GB, {elapsed:.0f} s, "
        f"peak RSS {peak / 1e9:.2f} GB ({peak / size:.1%} of the checkpoint)"
    )
    if not args.keep:
        out.unlink()


if __name__ == "__main__":
    main()
