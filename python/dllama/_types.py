"""The typed values the Rust extension returns and takes: defined here, in Python (a NamedTuple
and a TypedDict have no PyO3 form), and exposed as `dllama._core.TensorSpec` and
`dllama._core.TokenizerDict` (the binding imports this module when it is initialised)."""

from __future__ import annotations

from typing import NamedTuple, TypedDict


class TensorSpec(NamedTuple):
    """One tensor of a `.m` file: its shape, how it is stored and where."""

    name: str
    rows: int
    cols: int
    float_type: str
    offset: int
    nbytes: int


class TokenizerDict(TypedDict):
    """A `.t` tokenizer (see docs/DESIGN.md)."""

    vocab: list[bytes]
    scores: list[float]
    max_token_length: int
    bos_id: int
    eos_ids: list[int]
    pad_id: int
    chat_eos_id: int
    chat_template: str | None
    add_bos: bool
    version: int
