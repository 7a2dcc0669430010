"""Chat templates: a conversation (``messages``) to the prompt text a chat model was tuned on.

A template is Jinja2 with Hugging Face's semantics, rendered as ``transformers``'
``apply_chat_template`` renders it: a sandboxed immutable environment with ``trim_blocks``
and ``lstrip_blocks``, the ``loopcontrols`` extension, ``tojson`` without HTML escaping, and
the variables ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` and the
functions ``raise_exception``, ``strftime_now``. Extra variables (``enable_thinking``...) are
passed through.

The template comes from the tokenizer's ``.t`` file; when it has none, a built-in one is
chosen from the vocabulary (:data:`BUILTIN`: llama2, llama3, chatml, mistral, qwen3), and
``--chat-template NAME|FILE`` overrides both. Generation stops at the template's
end-of-turn token (e.g. ``<|im_end|>``) as well as at end-of-sequence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from dllama.tokenizer import Tokenizer

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Llama 2 chat: the system prompt inside the first [INST] between <<SYS>> markers.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + content | trim + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# Mistral instruct (v0.1-v0.3 style): no system role of its own, so a system prompt goes
# before the first user message.
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{{ '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported') }}"
    "{% endif %}{% endfor %}"
)

# Qwen3: ChatML with thinking. Past assistant turns lose their <think> block; with
# enable_thinking=false the generation prompt holds an empty one, so the model answers directly.
QWEN3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "{{ '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"
)

#: the built-in templates, by name
BUILTIN: dict[str, str] = {
    "llama2": LLAMA2,
    "llama3": LLAMA3,
    "chatml": CHATML,
    "mistral": MISTRAL,
    "qwen3": QWEN3,
}

#: special tokens that end a turn in the templates of the common model families
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


def guess_builtin(tok: Tokenizer) -> str:
    """The built-in template that fits a vocabulary without a template of its own."""
    names = {p.decode("utf-8", "replace") for p in tok._specials}
    if "<|eot_id|>" in names:
        return "llama3"
    if "<|im_start|>" in names:
        return "qwen3" if b"<think>" in tok._ids else "chatml"
    if "[INST]" in names or tok.vocab_size == 32768:
        return "mistral"
    return "llama2"


class ChatTemplate:
    """A compiled template and the tokens around it (see the module docstring).

    ``template``: a built-in's name, a file holding a template, or None for the tokenizer's own
    (else a built-in guessed from the vocabulary).
    """

    def __init__(self, tok: Tokenizer, template: str | None = None) -> None:
        self.tok = tok
        if template is None:
            if tok.chat_template:
                self.name, source = "the tokenizer's", tok.chat_template
            else:
                self.name = guess_builtin(tok)
                source = BUILTIN[self.name]
        elif template in BUILTIN:
            self.name, source = template, BUILTIN[template]
        else:
            path = Path(template)
            if not path.is_file():
                raise ValueError(
                    f"--chat-template {template!r} is neither a built-in "
                    f"({', '.join(BUILTIN)}) nor a file"
                )
            try:
                source = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"chat template {path}: not UTF-8 text (byte {e.start}); a Jinja template "
                    "file is expected"
                ) from None
            self.name = str(path)
        self.source = source
        try:
            self._template = _compile(source)
        except ValueError as e:
            raise ValueError(f"chat template {self.name}: {e}") from None
        self.bos_token = _piece(tok, tok.bos_id)
        self.eos_token = _piece(tok, tok.eos_ids[0]) if tok.eos_ids else ""
        # one question, rendered now: a template that fails on it (a raise_exception, a
        # variable it needs) fails here, not at the first message of a chat or a server
        if not self.encode([{"role": "user", "content": "Hi"}]):
            raise ValueError(f"chat template {self.name} renders a question as no text")
        # the end-of-turn tokens: the known ones this template writes and the vocabulary has
        specials = {p.decode("utf-8", "replace"): i for p, i in tok._specials.items()}
        self.end_of_turn_ids = [specials[t] for t in END_OF_TURN if t in source and t in specials]

    #: the variables every template gets from dllama; a caller's extra ones may not set them
    VARIABLES = ("messages", "add_generation_prompt", "bos_token", "eos_token")

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """The prompt text of ``messages`` (each with ``role`` and ``content``)."""
        import jinja2

        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} needs a role and a content, got {m!r}")
        taken = [k for k in self.VARIABLES if k in extra]
        if taken:
            raise ValueError(
                f"the template variable {taken[0]!r} is set by dllama, not by the caller"
            )
        try:
            text: str = self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as e:
            # the template failed on these messages or variables (a raise_exception, or an
            # operation on a value of the wrong type): the caller's input, not a server fault
            raise ValueError(f"chat template {self.name}: {e}") from e
        return text

    def encode(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> list[int]:
        """The prompt's token ids: the rendered text with its special tokens parsed (no
        BOS added: a template that wants one writes ``bos_token``)."""
        text = self.render(messages, add_generation_prompt, **extra)
        return self.tok.encode(text, add_bos=False, parse_special=True)


def _piece(tok: Tokenizer, i: int) -> str:
    return tok.vocab[i].decode("utf-8", "replace").strip() if 0 <= i < tok.vocab_size else ""


def _compile(source: str) -> Any:
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is a dependency
        raise ValueError("chat templates need jinja2: pip install jinja2") from e

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"line {e.lineno}: {e.message}") from e
