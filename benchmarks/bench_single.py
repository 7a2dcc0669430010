"""One-machine speed: dllama against llama.cpp on the same random Q40 weights.

For each shape (Llama 2 7B: dim 4096, hidden 11008, 32 layers, 32 heads, vocab 32000;
TinyLlama 1.1B: 2048, 5632, 22 layers, 32 heads, 4 KV heads) the script

1. writes a `.m` file of random Q40 weights (cached in --dir),
2. writes the very same Q4_0 blocks as a GGUF file (Q40 is byte-for-byte ggml's Q4_0),
3. measures this machine's memory read bandwidth with as many readers at once as the engine
   has threads, right before each dllama run (the two-thread bandwidth of these VMs jumps
   between two levels from one minute to the next, so each run gets its own floor), with two
   readers, the higher one counts: numpy processes taking the max of a float32 array, and
   `dllama._core.read_bandwidth` (AVX2 loads over 4 or 8 interleaved streams per thread,
   with and without prefetch, the fastest kept, in a buffer allocated as the packed weights,
   transparent huge pages where the system allows),
4. times dllama (`dllama._core.Node.forward`, one token at a time after a short prompt, the
   logits written into one array as `dllama run` does):
   median ms/token over --tokens generated tokens, at each thread count,
5. times llama.cpp on the GGUF through the `xllamacpp` wheel (its own timing of the generated
   tokens: mean ms/token over the same number of tokens), at each thread count,
   (4 and 5 alternate --repeat times; each engine's best run is kept),
6. with --prefill N (default 128; 0 skips it): times the prefill of an N-token prompt in
   dllama (one `Node.forward` of the N tokens from position 0) and in llama.cpp (its own
   prompt eval time for the same N token ids, prompt cache off), alternating --repeat times,
   best kept; printed as tokens/s beside our one-token-at-a-time rate (1000 / the generation
   ms/token of step 4), with the two targets: >= 0.5x llama.cpp and >= 3x one at a time,

and prints a table with the bandwidth floor (weight bytes read per token / the bandwidth
measured just before dllama's best run), the strict floor (the same at the highest bandwidth
any round of that row measured: the level can flip between a measurement and the run after it)
and the ratios; the target is floor / dllama >= 0.85, which the table checks on the strict one.
Run: `python benchmarks/bench_single.py` (about 10 minutes; --shapes tinyllama for a quick run). Not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from dllama import _core
from dllama.convert.gguf_source import gguf_tensor_name


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    seq_len: int = 2048


SHAPES = {
    "7b": Shape("llama2-7b", 4096, 11008, 32, 32, 32),
    "tinyllama": Shape("tinyllama-1.1b", 2048, 5632, 22, 32, 4),
}


def fields(s: Shape) -> dict[str, int | float]:
    return {
        "version": 0,
        "arch_type": 0xABCD00,
        "dim": s.dim,
        "hidden_dim": s.hidden,
        "n_layers": s.layers,
        "n_heads": s.heads,
        "n_kv_heads": s.kv_heads,
        "n_experts": 0,
        "n_active_experts": 0,
        "vocab_size": s.vocab,
        "max_seq_len": s.seq_len,
        "hidden_act": 1,
        "rope_theta": 10000,
        "weights_float_type": 2,
        "rope_type": 0,
        "head_dim": s.dim // s.heads,
        "norm_epsilon": 1e-5,
    }


def random_q40(rng: np.random.Generator, rows: int, cols: int) -> npt.NDArray[np.uint8]:
    """(rows, cols / 32 * 18) bytes of Q40 blocks: random nibbles, scales ~ N(0, 0.02) / 8."""
    nb = rows * cols // 32
    blocks = np.empty((nb, 18), dtype=np.uint8)
    d = (np.abs(rng.standard_normal(nb, dtype=np.float32)) * 0.0025 + 1e-4).astype(np.float16)
    blocks[:, :2] = d.view(np.uint8).reshape(nb, 2)
    blocks[:, 2:] = rng.integers(0, 256, size=(nb, 16), dtype=np.uint8)
    return blocks.reshape(rows, cols // 32 * 18)


def write_model(s: Shape, path: Path) -> None:
    write_random_model(fields(s), path)


def write_random_model(f: dict[str, int | float], path: Path) -> None:
    """The `.m` file of header `f` with random weights (Q40 blocks of `random_q40`, norms ~ 1,
    F32 matrices such as the embedding or a router ~ N(0, 0.02), a router's rounded to bf16
    as in a file converted from a bf16 checkpoint); one of the right size is kept."""
    tensors = _core.model_tensors(f)
    header = _core.encode_model_header(f)
    size = len(header) + sum(t.nbytes for t in tensors)
    if path.exists() and path.stat().st_size == size:
        return
    print(f"writing {path} ({size / 1e9:.2f} GB of random Q40 weights)...", flush=True)
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as out:
        out.write(header)
        for name, rows, cols, ft, _off, nbytes in tensors:
            if ft == "q40":
                data = random_q40(rng, rows, cols).tobytes()
            elif name.endswith("norm"):
                data = (1.0 + 0.05 * rng.standard_normal(cols, dtype=np.float32)).tobytes()
            else:
                v = 0.02 * rng.standard_normal(rows * cols, dtype=np.float32)
                if name.endswith("moe_gate"):  # to the nearest bf16, ties to even
                    b = v.view(np.uint32).astype(np.uint64)
                    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
                    v = b.astype(np.uint32).view(np.float32)
                data = v.tobytes()
            assert len(data) == nbytes, name
            out.write(data)
    tmp.rename(path)


def write_gguf(s: Shape, m_path: Path, path: Path) -> None:
    """The same weights as a llama GGUF (Q4_0 matmuls, F32 embedding and norms), the tensors
    taken from the .m file's memory map without copying."""
    if path.exists():
        return
    import gguf

    print(f"writing {path} (the same weights as GGUF Q4_0)...", flush=True)
    f = fields(s)
    mm = np.memmap(m_path, dtype=np.uint8, mode="r")
    tmp = path.with_suffix(".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_context_length(s.seq_len)
    w.add_embedding_length(s.dim)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(s.hidden)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_rope_dimension_count(s.dim // s.heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    add_filler_vocab(w, s.vocab)
    for t in _core.model_tensors(f):
        add_m_tensor(w, gguf_tensor_name(t.name), mm[t.offset : t.offset + t.nbytes], t)
    finish_gguf(w, tmp, path)


def add_filler_vocab(w: Any, vocab: int) -> None:
    """A SentencePiece-style vocabulary of `vocab` tokens: specials, 256 byte tokens, fillers."""
    import gguf

    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [f"t{i}".encode() for i in range(vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (vocab - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def add_m_tensor(w: Any, gname: str, raw: npt.NDArray[np.uint8], t: _core.TensorSpec) -> None:
    """The bytes `raw` of the `.m` tensor `t` as the GGUF tensor `gname`: Q40 blocks as Q4_0
    (the same bytes), F32 as they are."""
    import gguf

    if t.float_type == "q40":
        w.add_tensor(
            gname, raw.reshape(t.rows, t.cols // 32 * 18), raw_dtype=gguf.GGMLQuantizationType.Q4_0
        )
    else:
        arr = raw.view(np.float32)
        w.add_tensor(gname, arr if t.rows == 1 else arr.reshape(t.rows, t.cols))


def finish_gguf(w: Any, tmp: Path, path: Path) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    tmp.rename(path)


def _read_worker(nbytes: int, barrier: Any, rounds: int, out: Any) -> None:
    a = np.ones(nbytes // 4, dtype=np.float32)
    a.max()  # touch every page before timing
    times = []
    for _ in range(rounds):
        barrier.wait()
        t0 = time.perf_counter()
        a.max()
        times.append(time.perf_counter() - t0)
    out.put(times)


def read_bandwidth(nprocs: int, nbytes: int = 1 << 30, rounds: int = 5) -> float:
    """Bytes per second that `nprocs` readers take from memory at once: the best of
    `numpy_read_bandwidth` and `_core.read_bandwidth` (`nprocs` threads), printed both."""
    np_bw = numpy_read_bandwidth(nprocs, nbytes, rounds)
    rust_bw = _core.read_bandwidth(nbytes, nprocs, rounds)
    print(
        f"  read bandwidth, {nprocs} reader(s): numpy {np_bw / 1e9:.1f} GB/s, "
        f"_core.read_bandwidth {rust_bw / 1e9:.1f} GB/s",
        flush=True,
    )
    return max(np_bw, rust_bw)


def numpy_read_bandwidth(nprocs: int, nbytes: int = 1 << 30, rounds: int = 5) -> float:
    """Bytes per second that `nprocs` processes read from memory at once: each takes the max
    of its own float32 array (a share of `nbytes`, far larger than the caches); processes,
    not threads, so no lock serializes them. Best of `rounds` (each round: slowest process)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(nprocs)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_read_worker, args=(nbytes // nprocs, barrier, rounds, out))
        for _ in range(nprocs)
    ]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    slowest = [max(r[i] for r in results) for i in range(rounds)]
    return float((nbytes // nprocs * nprocs) / min(slowest))


def time_dllama(path: Path, nthreads: int, tokens: int) -> tuple[float, float, str, int]:
    """(median ms/token, prefill ms/token of a 16-token prompt, kernel path, bytes/token)."""
    node = _core.Node(str(path), nthreads=nthreads, max_seq_len=256)
    prompt = [(i * 7919) % node.vocab_size for i in range(16)]
    # the logits land in one array every step, as in `Generator.generate`
    out = np.empty(node.vocab_size, np.float32)
    t0 = time.perf_counter()
    logits = node.forward(prompt, 0, out)
    prefill = (time.perf_counter() - t0) * 1000 / len(prompt)
    times = []
    for i in range(tokens + 2):
        tok = int(np.argmax(logits))
        t0 = time.perf_counter()
        logits = node.forward([tok], len(prompt) + i, out)
        times.append((time.perf_counter() - t0) * 1000)
    info = (node.kernels, node.weight_bytes_per_token)
    del node
    gc.collect()
    return statistics.median(times[2:]), prefill, info[0], info[1]


def prompt_ids(n: int, vocab: int) -> list[int]:
    """n ordinary token ids (past the 3 specials and the 256 byte tokens of the GGUF vocab)."""
    return [259 + (i * 7919) % (vocab - 259) for i in range(n)]


def time_dllama_prefill(path: Path, nthreads: int, n: int) -> float:
    """Tokens/s of one `Node.forward` of an n-token prompt from position 0 (after one
    warm-up prefill of the same prompt, which the timed one overwrites in the KV cache)."""
    node = _core.Node(str(path), nthreads=nthreads, max_seq_len=max(256, n))
    prompt = prompt_ids(n, node.vocab_size)
    node.forward(prompt, 0)
    t0 = time.perf_counter()
    node.forward(prompt, 0)
    dt = time.perf_counter() - t0
    del node
    gc.collect()
    return n / dt


def llamacpp_completion(
    path: Path,
    nthreads: int,
    n_ctx: int,
    req: dict[str, Any],
    n_batch: int = 0,
    warm_up: bool = True,
) -> dict[str, Any] | None:
    """llama.cpp's `timings` for the completion `req` on a fresh server (`nthreads` threads,
    `n_ctx` positions; with `n_batch`, prompts of up to that many tokens are one batch), after
    one warm-up request when `warm_up`; None without xllamacpp."""
    try:
        import xllamacpp as x
    except ImportError:
        print(
            "llama.cpp not timed: xllamacpp is not installed (pip install xllamacpp)",
            file=sys.stderr,
        )
        return None
    p = x.CommonParams()
    p.model.path = str(path)
    p.n_ctx = n_ctx
    if n_batch:
        p.n_batch = n_batch
        p.n_ubatch = n_batch
    p.n_parallel = 1
    p.cpuparams.n_threads = nthreads
    p.cpuparams_batch.n_threads = nthreads
    p.warmup = True
    server = x.Server(p)
    if warm_up:
        server.handle_completions({**req, "n_predict": min(4, int(req["n_predict"]))})
    res = server.handle_completions(req)
    del server
    gc.collect()
    timings: dict[str, Any] = res["timings"]
    return timings


def time_llamacpp_prefill(path: Path, nthreads: int, n: int, vocab: int) -> float | None:
    """llama.cpp's own prompt eval tokens/s for the same n token ids, or None without
    xllamacpp. The prompt cache is off so every run evaluates the whole prompt; the batch
    size is at least n, so the prompt is one batch as in dllama."""
    req = {"prompt": prompt_ids(n, vocab), "n_predict": 1, "temperature": 0, "cache_prompt": False}
    t = llamacpp_completion(path, nthreads, max(256, 2 * n), req, n_batch=max(512, n))
    if t is None:
        return None
    assert t["prompt_n"] == n, t
    return float(t["prompt_per_second"])


def time_llamacpp(path: Path, nthreads: int, tokens: int) -> float | None:
    """llama.cpp's own mean ms per generated token, or None without xllamacpp."""
    req = {"prompt": "t1 t2 t3 t4", "n_predict": tokens, "temperature": 0, "ignore_eos": True}
    t = llamacpp_completion(path, nthreads, 256, req)
    if t is None:
        return None
    assert t["predicted_n"] == tokens, t
    return float(t["predicted_per_token_ms"])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["tinyllama", "7b"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--tokens", type=int, default=40, help="generated tokens timed (>= 32)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dllama-bench"))
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--repeat", type=int, default=2, help="runs per engine; the best is kept")
    ap.add_argument(
        "--prefill", type=int, default=128, help="prompt tokens for the prefill timing; 0: skip"
    )
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)

    rows = []
    pre_rows = []
    for key in args.shapes:
        s = SHAPES[key]
        m_path = args.dir / f"{s.name}-q40.m"
        g_path = args.dir / f"{s.name}-q4_0.gguf"
        write_model(s, m_path)
        if not args.no_llamacpp:
            write_gguf(s, m_path, g_path)
        for n in args.threads:
            # alternate the two engines --repeat times and keep each one's best run: other
            # tenants of a shared machine only ever make a run slower
            runs, refs = [], []
            for _ in range(args.repeat):
                bw = read_bandwidth(n)
                print(f"memory read bandwidth, {n} reader(s): {bw / 1e9:.1f} GB/s", flush=True)
                runs.append((*time_dllama(m_path, n, args.tokens), bw))
                if not args.no_llamacpp:
                    refs.append(time_llamacpp(g_path, n, args.tokens))
            ms, prefill, kernels, wbytes, bw = min(runs)
            floor = wbytes / bw * 1000
            # the level can flip between a measurement and the run after it: the strict floor
            # takes the highest bandwidth any round of this row saw
            bw_max = max(r[-1] for r in runs)
            strict = wbytes / bw_max * 1000
            valid = [r for r in refs if r is not None]
            ref = min(valid) if valid else None
            rows.append((s.name, n, ms, prefill, ref, bw, floor, bw_max, strict, kernels))
            print(
                f"{s.name} {n} thread(s): dllama {ms:.1f} ms/token (prefill {prefill:.1f} "
                f"ms/token), llama.cpp {ref if ref is None else f'{ref:.1f}'} ms/token, "
                f"floor {floor:.1f} ms",
                flush=True,
            )
            if args.prefill > 0:
                pre, pre_refs = [], []
                for _ in range(args.repeat):
                    pre.append(time_dllama_prefill(m_path, n, args.prefill))
                    if not args.no_llamacpp:
                        pre_refs.append(time_llamacpp_prefill(g_path, n, args.prefill, s.vocab))
                tps = max(pre)
                valid_pre = [r for r in pre_refs if r is not None]
                ref_tps = max(valid_pre) if valid_pre else None
                pre_rows.append((s.name, n, tps, ref_tps, 1000 / ms))
                print(
                    f"{s.name} {n} thread(s): prefill of {args.prefill} tokens: dllama "
                    f"{tps:.1f} tokens/s, llama.cpp "
                    f"{ref_tps if ref_tps is None else f'{ref_tps:.1f}'} tokens/s, "
                    f"one token at a time {1000 / ms:.1f} tokens/s",
                    flush=True,
                )

    print()
    print(
        "| shape | threads | dllama ms/token | llama.cpp ms/token | dllama / llama.cpp "
        "| read GB/s before the best run | floor ms | floor / dllama "
        "| highest read GB/s of the row | strict floor ms | strict floor / dllama (target >= 0.85) "
        "| dllama prefill ms/token | kernels |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, n, ms, prefill, ref, bw, floor, bw_max, strict, kernels in rows:
        ratio = "-" if ref is None else f"{ms / ref:.2f}"
        ref_s = "-" if ref is None else f"{ref:.1f}"
        print(
            f"| {name} | {n} | {ms:.1f} | {ref_s} | {ratio} | {bw / 1e9:.1f} | {floor:.1f} "
            f"| {floor / ms:.2f} | {bw_max / 1e9:.1f} | {strict:.1f} | {strict / ms:.2f} "
            f"| {prefill:.1f} | {kernels} |"
        )

    if pre_rows:
        print()
        print(
            f"| shape | threads | dllama prefill tokens/s ({args.prefill}-token prompt) "
            "| llama.cpp prefill tokens/s | dllama / llama.cpp (target >= 0.5) "
            "| dllama one-at-a-time tokens/s | prefill / one-at-a-time (target >= 3) |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, n, tps, ref_tps, single in pre_rows:
            ref_s = "-" if ref_tps is None else f"{ref_tps:.1f}"
            ratio = "-" if ref_tps is None else f"{tps / ref_tps:.2f}"
            print(
                f"| {name} | {n} | {tps:.1f} | {ref_s} | {ratio} | {single:.1f} "
                f"| {tps / single:.2f} |"
            )


if __name__ == "__main__":
    main()
