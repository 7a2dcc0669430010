"""The sampling options shared by `dllama run` and `dllama chat` (see `dllama.sampler`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import typer

from dllama.sampler import MAX_TOP_LOGPROBS, SamplingParams

Temperature = Annotated[
    float, typer.Option(min=0.0, help="0 picks the most likely token; higher is more random.")
]
TopP = Annotated[
    float,
    typer.Option(
        "--top-p",
        "--topp",
        min=0.0,
        max=1.0,
        help="Top-p (nucleus) sampling mass; 1 keeps all tokens.",
    ),
]
TopK = Annotated[int, typer.Option("--top-k", help="Keep the K most likely tokens (>= 0); 0: all.")]
MinP = Annotated[
    float,
    typer.Option(
        "--min-p",
        help="Keep tokens at least MIN_P times as likely as the best one (0..1); 0: all.",
    ),
]
RepetitionPenalty = Annotated[
    float,
    typer.Option(
        "--repetition-penalty",
        help="Divide the logits of tokens already seen by this (> 0); 1: off.",
    ),
]
PresencePenalty = Annotated[
    float,
    typer.Option("--presence-penalty", help="Subtract from generated tokens' logits (-2..2)."),
]
FrequencyPenalty = Annotated[
    float,
    typer.Option(
        "--frequency-penalty", help="Subtract this per occurrence of a generated token (-2..2)."
    ),
]
Seed = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="Random seed: the same seed gives the same text (default: a fresh one each run).",
        show_default=False,
    ),
]
Stop = Annotated[
    list[str] | None,
    typer.Option(
        "--stop", help="Stop before this text (repeatable; not printed).", show_default=False
    ),
]
LogitBias = Annotated[
    list[str] | None,
    typer.Option(
        "--logit-bias",
        help="TOKEN_ID=BIAS added to that token's logit, -100..100 (repeatable).",
        show_default=False,
    ),
]


def parse_logit_bias(items: list[str] | None) -> dict[int, float]:
    """``["42=-100", "7=2.5"]`` to ``{42: -100.0, 7: 2.5}`` (ValueError naming a bad item)."""
    out: dict[int, float] = {}
    for item in items or []:
        tok, sep, bias = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[int(tok)] = float(bias)
        except ValueError:
            raise ValueError(
                f"--logit-bias {item!r}: expected TOKEN_ID=BIAS, e.g. 42=-100"
            ) from None
    return out


def sampling_params(options: Mapping[str, Any], vocab_size: int | None = None) -> SamplingParams:
    """The options as one checked :class:`SamplingParams` (ValueError naming a bad one).
    `options` are the command's own parameters (its ``locals()``), which declare the options
    above under these names (`topp` for `--top-p`), so that every command forwards all of them."""
    p = SamplingParams(
        temperature=options["temperature"],
        top_p=options["topp"],
        top_k=options["top_k"],
        min_p=options["min_p"],
        repetition_penalty=options["repetition_penalty"],
        presence_penalty=options["presence_penalty"],
        frequency_penalty=options["frequency_penalty"],
        seed=options["seed"],
        logit_bias=parse_logit_bias(options["logit_bias"]),
    )
    p.check(vocab_size)
    return p


def check_logprobs(n: int | None) -> None:
    if n is not None and not 0 <= n <= MAX_TOP_LOGPROBS:
        raise ValueError(f"--logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {n}")
