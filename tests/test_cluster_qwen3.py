"""Qwen3 and Qwen3-MoE split over 2 and 3 nodes (real worker processes on 127.0.0.1).

Each node holds its KV-head groups, its rows of the q/k norms' heads, and for a MoE its
hidden units of every expert (tensor parallelism inside the experts; the router is whole on
every node, which routes the same tokens from the same residual). F32 buffers give the single
node's greedy tokens; the bytes per step equal docs/PROTOCOL.md's formula, which does not
depend on the architecture.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster_utils import Worker, Workers
from dllama import _core
from dllama.convert import convert_model
from qwen3_utils import random_qwen3, save
from test_cluster import formula, greedy, rel_err

pytestmark = pytest.mark.slow

PROMPT = [1, 17, 99, 3, 42, 42, 7, 120]
#: 6 heads over 3 KV heads (1 to 3 nodes), 96 hidden units per expert (3 blocks of 32)
SHAPE = {"num_attention_heads": 6, "num_key_value_heads": 3, "intermediate_size": 96}


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp(f"qwen3-{request.param}")
    moe = request.param == "moe"
    m = random_qwen3(moe=moe, n_experts=6, top_k=2, moe_hidden=96, seed=5, overrides=SHAPE)
    out = tmp / "m.m"
    convert_model(save(m, tmp / "hf"), out, "q40", progress=False)
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_f32_buffers_give_the_single_node_tokens(model: Path, n: int) -> None:
    single = _core.Node(str(model), buffer_float_type="f32")
    want_tokens, want_logits = greedy(single, PROMPT, 8)
    with Workers(0) as ws:
        # the first worker maps its own copy, the others are shipped their slices
        for i in range(n - 1):
            ws.items.append(Worker(model=model if i == 0 else None))
        node = _core.Node(str(model), buffer_float_type="f32", workers=ws.addrs)
        assert node.n_nodes == n
        tokens, logits = greedy(node, PROMPT, 8)
        del node
    assert tokens == want_tokens
    assert rel_err(logits, want_logits) < 1e-5


@pytest.mark.parametrize(("n", "buffer"), [(2, "q80"), (3, "f32")])
def test_bytes_per_token_equal_the_formula(model: Path, n: int, buffer: str) -> None:
    h = _core.read_model_header(str(model))
    dim, layers, vocab = int(h["dim"]), int(h["n_layers"]), int(h["vocab_size"])
    with Workers(n - 1, model=model) as ws:
        node = _core.Node(str(model), buffer_float_type=buffer, workers=ws.addrs)
        node.forward(PROMPT[:5], 0)
        got = (node.last_sent_bytes, node.last_recv_bytes)
        assert got == formula(n, dim, layers, vocab, 5, buffer)
        node.forward([7], 5)
        got = (node.last_sent_bytes, node.last_recv_bytes)
        assert got == formula(n, dim, layers, vocab, 1, buffer)
        del node
