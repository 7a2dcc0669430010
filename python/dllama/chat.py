"""A multi-turn conversation over one :class:`~dllama.generate.LLM`, as ``dllama chat`` runs it.

Each turn renders the whole conversation with the chat template; the LLM's KV cache still
holds the previous turns, so only the tokens after their common prefix (the new user message
and the template's markup) go through the model. When the context is full, ``overflow``
decides: ``"stop"`` ends the answer (``Turn.context_full``), ``"shift"`` drops the oldest
turns (the system prompt stays) and carries on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dllama.chat_template import ChatTemplate
from dllama.generate import LLM, Piece, Summary
from dllama.sampler import SamplingParams


class ContextFullError(ValueError):
    """The conversation does not fit in the KV cache."""


@dataclass
class Turn:
    """What one answer cost: the summaries of its generate calls (more than one when the
    context was shifted) and why it ended."""

    summaries: list[Summary] = field(default_factory=list)
    #: the answer was cut by a full context (overflow "stop")
    context_full: bool = False
    #: turns dropped to make room (overflow "shift")
    dropped_exchanges: int = 0
    interrupted: bool = False

    @property
    def prompt_tokens(self) -> int:
        return self.summaries[0].prompt_tokens if self.summaries else 0

    @property
    def cached_tokens(self) -> int:
        return self.summaries[0].cached_tokens if self.summaries else 0

    @property
    def generated_tokens(self) -> int:
        return sum(s.generated_tokens for s in self.summaries)


class Chat:
    def __init__(
        self,
        llm: LLM,
        template: ChatTemplate,
        *,
        system: str | None = None,
        sampling: SamplingParams | None = None,
        max_tokens: int = 0,
        overflow: str = "stop",
        template_vars: dict[str, Any] | None = None,
    ) -> None:
        if overflow not in ("stop", "shift"):
            raise ValueError(f"context overflow must be 'stop' or 'shift', got {overflow!r}")
        self.llm = llm
        self.template = template
        self.system = system
        self.sampling = sampling or SamplingParams()
        self.max_tokens = max_tokens
        self.overflow = overflow
        self.template_vars = template_vars or {}
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """A new conversation (the system prompt stays); the KV cache is reused for it."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt(self) -> list[int]:
        return self.template.encode(self.messages, True, **self.template_vars)

    def _drop_oldest(self) -> bool:
        """Drops the oldest user/assistant exchange; False when nothing can go."""
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        # keep the last message (the user's question being answered)
        if len(self.messages) - first <= 1:
            return False
        del self.messages[first]
        if len(self.messages) - first > 1 and self.messages[first]["role"] == "assistant":
            del self.messages[first]
        return True

    def say(
        self, text: str, turn: Turn, should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[Piece]:
        """The answer to ``text``, piece by piece; ``turn`` gets the totals. ``should_stop``
        is asked before each token (Ctrl-C); the answer so far stays in the conversation."""
        llm = self.llm
        limit = llm.node.max_seq_len
        self.messages.append({"role": "user", "content": text})
        prompt = self._prompt()
        while len(prompt) >= limit:
            if self.overflow != "shift" or not self._drop_oldest():
                self.messages.pop()
                first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
                if len(self.messages) == first:  # the message alone is too long
                    raise ContextFullError(
                        f"this message makes a prompt of {len(prompt)} tokens, more than the "
                        f"context of {limit}: write a shorter one (or raise --max-seq-len)"
                    )
                raise ContextFullError(
                    f"the conversation is {len(prompt)} tokens, more than the context of "
                    f"{limit}: /reset to start over"
                    + ("" if self.overflow == "shift" else " (or --context-overflow shift)")
                )
            turn.dropped_exchanges += 1
            prompt = self._prompt()
        answer_ids: list[int] = []
        answer = ""
        budget = self.max_tokens or limit
        stop_ids = self.template.end_of_turn_ids
        try:
            while True:
                pieces = llm.generate(
                    prompt + answer_ids,
                    budget - len(answer_ids),
                    sampling=self.sampling,
                    stop_tokens=stop_ids,
                )
                for piece in pieces:
                    if should_stop():
                        turn.interrupted = True
                        pieces.close()
                        break
                    if piece.token >= 0:
                        answer_ids.append(piece.token)
                    answer += piece.text
                    yield piece
                summary = llm.last_summary
                if summary is not None:
                    turn.summaries.append(summary)
                if turn.interrupted or summary is None or summary.stop_reason != "max_seq_len":
                    break
                if self.overflow == "stop":
                    turn.context_full = True
                    break
                # shift: drop the oldest exchanges until the conversation and the answer so
                # far take at most half the context, then continue the answer
                dropped = 0
                while len(prompt) + len(answer_ids) > limit // 2 and self._drop_oldest():
                    dropped += 1
                    prompt = self._prompt()
                turn.dropped_exchanges += dropped
                if dropped == 0 or len(prompt) + len(answer_ids) >= limit:
                    turn.context_full = True
                    break
        finally:
            self.messages.append({"role": "assistant", "content": answer})
