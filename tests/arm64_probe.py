"""Logits of a model along a given token sequence (teacher forcing), for test_arm64_wheel.py.

Run by that test both on the host and inside the arm64 root under qemu, with the installed
dllama; it must therefore need nothing but dllama and numpy.

    python arm64_probe.py MODEL TOKENIZER PROMPT FORCED OUT.npy

FORCED: comma-separated token ids fed one by one after the prompt. OUT.npy: (len(FORCED),
vocab) float32, row i = the logits that predict FORCED[i]. Prints one JSON line: the
kernels the node chose and the prompt's token ids.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from dllama.generate import LLM


def main() -> None:
    model, tokenizer, prompt, forced_s, out = sys.argv[1:6]
    forced = [int(t) for t in forced_s.split(",")]
    llm = LLM(model, tokenizer, nthreads=2, max_seq_len=256)
    tokens = llm.encode(prompt)
    rows = [np.array(llm.node.forward(tokens, 0), dtype=np.float32)]
    pos = len(tokens)
    for t in forced[:-1]:
        rows.append(np.array(llm.node.forward([t], pos), dtype=np.float32))
        pos += 1
    np.save(out, np.stack(rows))
    print(json.dumps({"kernels": llm.node.kernels, "prompt_tokens": tokens}))


if __name__ == "__main__":
    main()
