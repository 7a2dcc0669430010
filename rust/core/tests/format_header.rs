//! `.m` header: round trips, the byte layout, file sizes of real model shapes, bad headers.

mod format_common;

use dllama_core::format::header::{FieldValue, FIELD_NAMES, MODEL_MAGIC};
use dllama_core::format::{ArchType, FloatType, HiddenAct, ModelHeader, RopeType};
use dllama_core::Error;

/// A header with every field away from its default (as far as dllama accepts).
fn all_fields(ft: FloatType) -> ModelHeader {
    ModelHeader {
        version: 0,
        arch_type: ArchType::Llama,
        dim: 128,
        hidden_dim: 352,
        n_layers: 3,
        n_heads: 8,
        n_kv_heads: 2,
        n_experts: 0,
        n_active_experts: 0,
        vocab_size: 1000,
        max_seq_len: 4096,
        hidden_act: HiddenAct::Gelu,
        rope_theta: 500000,
        weights_float_type: ft,
        rope_scaling_factor: 8,
        rope_scaling_low_freq_factor: 1,
        rope_scaling_high_freq_factor: 4,
        rope_scaling_orig_max_seq_len: 8192,
        rope_type: RopeType::Llama31,
        head_dim: 32, // not dim / n_heads = 16: must be carried explicitly
        norm_epsilon: 1e-6,
        moe_hidden_dim: 64,
        norm_topk_prob: true,
        file_header_size: None,
    }
}

fn small(ft: FloatType) -> ModelHeader {
    format_common::small_header(ft, 50, 16)
}

/// Header bytes packed by hand from (key, value) pairs, as distributed-llama's writer.py does.
fn pack(pairs: &[(i32, i32)]) -> Vec<u8> {
    format_common::pack_pairs(0x0A00_ABCD, pairs)
}

fn format_err(bytes: &[u8]) -> String {
    match ModelHeader::parse(bytes) {
        Err(Error::Format(m)) => m,
        other => panic!("expected a format error, got {other:?}"),
    }
}

const BASE: [(i32, i32); 8] = [
    (2, 64),
    (3, 96),
    (4, 2),
    (5, 4),
    (6, 2),
    (9, 50),
    (10, 16),
    (13, 2),
];

fn with(extra: &[(i32, i32)]) -> Vec<u8> {
    let mut pairs: Vec<(i32, i32)> = BASE.to_vec();
    for &(k, v) in extra {
        match pairs.iter_mut().find(|p| p.0 == k) {
            Some(p) => p.1 = v,
            None => pairs.push((k, v)),
        }
    }
    pack(&pairs)
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

#[test]
fn every_field_round_trips_for_every_float_type() {
    for ft in FloatType::ALL {
        let h = all_fields(ft);
        h.validate().unwrap();
        let bytes = h.to_bytes();
        assert_eq!(bytes.len(), h.header_size());
        let back = ModelHeader::parse(&bytes).unwrap();
        assert_eq!(
            back,
            ModelHeader {
                file_header_size: Some(bytes.len()),
                ..h.clone()
            }
        );
        assert_eq!(back.tensors(), h.tensors());
        assert_eq!(back.file_size(), h.file_size());
    }
}

#[test]
fn each_field_alone_round_trips() {
    // Start from defaults and change one field at a time, so a field that is silently dropped
    // or swapped with another cannot hide behind the others.
    let base = small(FloatType::Q40);
    let variants: Vec<(&str, ModelHeader)> = vec![
        (
            "dim",
            ModelHeader {
                dim: 96,
                n_heads: 6,
                n_kv_heads: 2,
                ..base.clone()
            },
        ),
        (
            "hidden_dim",
            ModelHeader {
                hidden_dim: 160,
                ..base.clone()
            },
        ),
        (
            "n_layers",
            ModelHeader {
                n_layers: 5,
                ..base.clone()
            },
        ),
        (
            "n_heads",
            ModelHeader {
                n_heads: 8,
                head_dim: 8,
                ..base.clone()
            },
        ),
        (
            "n_kv_heads",
            ModelHeader {
                n_kv_heads: 1,
                ..base.clone()
            },
        ),
        (
            "vocab_size",
            ModelHeader {
                vocab_size: 77,
                ..base.clone()
            },
        ),
        (
            "max_seq_len",
            ModelHeader {
                max_seq_len: 999,
                ..base.clone()
            },
        ),
        (
            "hidden_act",
            ModelHeader {
                hidden_act: HiddenAct::Gelu,
                ..base.clone()
            },
        ),
        (
            "rope_theta",
            ModelHeader {
                rope_theta: 1_000_000,
                ..base.clone()
            },
        ),
        (
            "weights_float_type",
            ModelHeader {
                weights_float_type: FloatType::F16,
                ..base.clone()
            },
        ),
        (
            "rope_scaling_factor",
            // with llama rope a factor other than 1 means llama3.1 scaling (see below)
            ModelHeader {
                rope_scaling_factor: 3,
                rope_type: RopeType::Falcon,
                ..base.clone()
            },
        ),
        (
            "rope_scaling_low_freq_factor",
            ModelHeader {
                rope_scaling_low_freq_factor: 2,
                ..base.clone()
            },
        ),
        (
            "rope_scaling_high_freq_factor",
            ModelHeader {
                rope_scaling_high_freq_factor: 5,
                ..base.clone()
            },
        ),
        (
            "rope_scaling_orig_max_seq_len",
            ModelHeader {
                rope_scaling_orig_max_seq_len: 77,
                ..base.clone()
            },
        ),
        (
            "rope_type",
            ModelHeader {
                rope_type: RopeType::Falcon,
                ..base.clone()
            },
        ),
        (
            "head_dim",
            ModelHeader {
                head_dim: 64,
                ..base.clone()
            },
        ),
        (
            "norm_epsilon",
            ModelHeader {
                norm_epsilon: 1e-6,
                ..base.clone()
            },
        ),
        (
            "moe_hidden_dim",
            ModelHeader {
                moe_hidden_dim: 128,
                ..base.clone()
            },
        ),
    ];
    for (name, h) in variants {
        assert_ne!(h, base, "{name}: variant must differ");
        h.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        let back = ModelHeader::parse(&h.to_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            ModelHeader {
                file_header_size: None,
                ..back
            },
            h,
            "{name}"
        );
        // and through the named fields (the binding's dict)
        let fields: Vec<(String, FieldValue)> = h
            .fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(
            ModelHeader::from_fields(&fields).unwrap(),
            h,
            "{name} via fields"
        );
    }
}

#[test]
fn fields_cover_every_key() {
    let names: Vec<&str> = small(FloatType::F32)
        .fields()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(names, FIELD_NAMES.to_vec());
}

#[test]
fn bytes_are_distributed_llama_pairs_in_converter_order() {
    let h = all_fields(FloatType::Q40);
    let expected = pack(&[
        (0, 0),
        (1, 0xABCD00),
        (11, 0),
        (2, 128),
        (3, 352),
        (4, 3),
        (5, 8),
        (6, 2),
        (13, 2),
        (10, 4096),
        (9, 1000),
        (19, 32),
        (7, 0),
        (8, 0),
        (12, 500000),
        (14, 8),
        (15, 1),
        (16, 4),
        (17, 8192),
        (18, 2),
        (20, 6),
        (21, 64),
    ]);
    assert_eq!(h.to_bytes(), expected);
    assert_eq!(&expected[..4], &MODEL_MAGIC.to_le_bytes());
}

#[test]
fn absent_keys_take_distributed_llama_defaults() {
    let h = ModelHeader::parse(&pack(&BASE)).unwrap();
    assert_eq!(h.head_dim, 16); // dim / n_heads
    assert_eq!(h.hidden_act, HiddenAct::Silu);
    assert_eq!(h.rope_type, RopeType::Llama);
    assert_eq!(h.rope_theta, 10000);
    assert_eq!(h.rope_scaling_factor, 1);
    assert_eq!(h.norm_epsilon, 1e-5);
    assert_eq!(h.arch_type, ArchType::Llama);
    assert_eq!(h.weights_float_type, FloatType::Q40);
    // the tensors start after the file's header, whatever its key set
    assert_eq!(h.header_size(), 8 + 8 * BASE.len());
    assert_eq!(h.tensors()[0].offset, (8 + 8 * BASE.len()) as u64);
}

#[test]
fn rope_scaling_keys_read_as_distributed_llama_runs_them() {
    // a plain llama model is written without the scaling keys, as distributed-llama's
    // convert-hf.py does (its RoPE scales whenever the factor is not 1)
    let h = small(FloatType::Q40);
    let keys: Vec<i32> = h.to_bytes()[8..]
        .chunks(8)
        .map(|p| i32::from_le_bytes(p[..4].try_into().unwrap()))
        .collect();
    assert!(!keys.iter().any(|k| (14..=17).contains(k)), "{keys:?}");
    // factor 0 with llama rope (earlier dllama converters) means no scaling
    let h = ModelHeader::parse(&with(&[(14, 0), (15, 0), (16, 0), (17, 0), (18, 0)])).unwrap();
    assert_eq!((h.rope_type, h.rope_scaling_factor), (RopeType::Llama, 1));
    assert!(!h.to_bytes()[8..]
        .chunks(8)
        .any(|p| i32::from_le_bytes(p[..4].try_into().unwrap()) == 14));
    // another factor with llama rope: the C++ applies the llama3.1 scaling, so do we
    let h = ModelHeader::parse(&with(&[(14, 8), (15, 1), (16, 4), (17, 8192)])).unwrap();
    assert_eq!((h.rope_type, h.rope_scaling_factor), (RopeType::Llama31, 8));
    let m = format_err(&with(&[(14, 8)]));
    assert!(m.contains("llama3.1 RoPE scaling needs"), "{m}");
    // from named fields (the converter's path) the same
    let fields: Vec<(String, FieldValue)> = h
        .fields()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .map(|(k, v)| match k.as_str() {
            "rope_type" => (k, FieldValue::Int(0)),
            "rope_scaling_factor"
            | "rope_scaling_low_freq_factor"
            | "rope_scaling_high_freq_factor"
            | "rope_scaling_orig_max_seq_len" => (k, FieldValue::Int(0)),
            _ => (k, v),
        })
        .collect();
    let back = ModelHeader::from_fields(&fields).unwrap();
    assert_eq!(
        (back.rope_type, back.rope_scaling_factor),
        (RopeType::Llama, 1)
    );
}

// ---------------------------------------------------------------------------------------------
// Layout and sizes
// ---------------------------------------------------------------------------------------------

#[test]
fn tensors_are_contiguous_in_file_order() {
    let h = small(FloatType::Q80);
    let t = h.tensors();
    assert_eq!(t.len(), 1 + 9 * h.n_layers + 2);
    let names: Vec<&str> = t.iter().take(11).map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "embedding",
            "layers.0.q",
            "layers.0.k",
            "layers.0.v",
            "layers.0.wo",
            "layers.0.w1",
            "layers.0.w2",
            "layers.0.w3",
            "layers.0.attn_norm",
            "layers.0.ffn_norm",
            "layers.1.q"
        ]
    );
    assert_eq!(t[t.len() - 2].name, "norm");
    assert_eq!(t[t.len() - 1].name, "wcls");
    let mut offset = h.header_size() as u64;
    for s in &t {
        assert_eq!(s.offset, offset, "{}", s.name);
        assert_eq!(s.nbytes, s.float_type.bytes_for(s.n_values()).unwrap());
        offset += s.nbytes;
    }
    assert_eq!(offset, h.file_size());
    // shapes: q [n_heads*head_dim, dim], k [n_kv_heads*head_dim, dim], wo [dim, q_dim], w2 [dim, hidden]
    assert_eq!((t[1].rows, t[1].cols), (64, 64));
    assert_eq!((t[2].rows, t[2].cols), (32, 64));
    assert_eq!((t[4].rows, t[4].cols), (64, 64));
    assert_eq!((t[6].rows, t[6].cols), (64, 96));
    assert_eq!(t[0].float_type, FloatType::F32);
    assert_eq!(t[8].float_type, FloatType::F32);
    assert_eq!(t[t.len() - 1].float_type, FloatType::Q80);
}

/// Expected .m size from the shapes alone (independent of `tensors()`).
fn expected_size(h: &ModelHeader) -> u64 {
    let (d, hd, v, l) = (
        h.dim as u64,
        h.hidden_dim as u64,
        h.vocab_size as u64,
        h.n_layers as u64,
    );
    let (q, kv) = (
        (h.n_heads * h.head_dim) as u64,
        (h.n_kv_heads * h.head_dim) as u64,
    );
    let weights = |n: u64| match h.weights_float_type {
        FloatType::F32 => n * 4,
        FloatType::F16 => n * 2,
        FloatType::Q40 => n / 32 * 18,
        FloatType::Q80 => n / 32 * 34,
    };
    let per_layer = weights(q * d + 2 * kv * d + d * q + 3 * hd * d) + 2 * d * 4;
    h.header_size() as u64 + v * d * 4 + l * per_layer + d * 4 + weights(v * d)
}

fn llama2(
    dim: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    ft: FloatType,
) -> ModelHeader {
    ModelHeader {
        dim,
        hidden_dim: hidden,
        n_layers: layers,
        n_heads: heads,
        n_kv_heads: kv,
        vocab_size: 32000,
        max_seq_len: 4096,
        head_dim: dim / heads,
        weights_float_type: ft,
        ..ModelHeader::default()
    }
}

#[test]
fn llama2_file_sizes() {
    for ft in FloatType::ALL {
        for h in [
            llama2(4096, 11008, 32, 32, 32, ft),
            llama2(5120, 13824, 40, 40, 40, ft),
            llama2(8192, 28672, 80, 64, 8, ft),
        ] {
            h.validate().unwrap();
            assert_eq!(h.file_size(), expected_size(&h), "{} {ft}", h.dim);
        }
    }
    let q40_7b = llama2(4096, 11008, 32, 32, 32, FloatType::Q40).file_size();
    let gib = q40_7b as f64 / (1u64 << 30) as f64;
    assert!(
        (3.9..4.0).contains(&gib),
        "7B Q40 is {q40_7b} bytes = {gib:.3} GiB"
    );
    // the classic figures: 7B f32 ≈ 27 GB (6.7 G params × 4 bytes), 70B Q40 ≈ 39 GB
    let f32_7b = llama2(4096, 11008, 32, 32, 32, FloatType::F32).file_size();
    assert!((26.0e9..27.5e9).contains(&(f32_7b as f64)), "{f32_7b}");
    let q40_70b = llama2(8192, 28672, 80, 64, 8, FloatType::Q40).file_size();
    assert!((38.0e9..40.0e9).contains(&(q40_70b as f64)), "{q40_70b}");
}

// ---------------------------------------------------------------------------------------------
// Bad headers
// ---------------------------------------------------------------------------------------------

#[test]
fn wrong_magic() {
    let mut b = pack(&BASE);
    b[0] = 0x00;
    let m = format_err(&b);
    assert!(m.contains("magic") && m.contains("0x0a00abcd"), "{m}");
    let mut old = pack(&BASE);
    old[..4].copy_from_slice(&0xABCD00u32.to_le_bytes());
    assert!(format_err(&old).contains("old model format"));
}

#[test]
fn truncated_header() {
    let b = pack(&BASE);
    for cut in [0, 3, 7] {
        let m = format_err(&b[..cut]);
        assert!(m.contains("too short"), "{cut}: {m}");
    }
    for cut in [8, 12, 20, b.len() - 1] {
        let m = format_err(&b[..cut]);
        assert!(m.contains("truncated"), "{cut}: {m}");
    }
}

#[test]
fn absurd_header_size() {
    for size in [-8, 0, 4, 13, 1 << 20, i32::MAX] {
        let mut b = pack(&BASE);
        b[4..8].copy_from_slice(&size.to_le_bytes());
        let m = format_err(&b);
        assert!(m.contains("absurd header size"), "{size}: {m}");
    }
}

#[test]
fn unknown_and_duplicate_keys() {
    let m = format_err(&with(&[(23, 1)]));
    assert!(m.contains("unknown header key 23"), "{m}");
    let m = format_err(&with(&[(-1, 0)]));
    assert!(m.contains("unknown header key -1"), "{m}");
    let mut pairs = BASE.to_vec();
    pairs.push((2, 64));
    assert!(format_err(&pack(&pairs)).contains("appears twice"));
}

#[test]
fn unknown_enum_codes() {
    for (pair, word) in [
        ((1, 0x1234), "arch_type"),
        ((11, 2), "hidden_act"),
        ((13, 4), "weights_float_type"),
        ((18, 3), "rope_type"),
        ((20, 7), "norm_epsilon"),
    ] {
        let m = format_err(&with(&[pair]));
        assert!(m.contains("unknown") && m.contains(word), "{pair:?}: {m}");
    }
    let no_type: Vec<(i32, i32)> = BASE.iter().copied().filter(|p| p.0 != 13).collect();
    assert!(format_err(&pack(&no_type)).contains("weights_float_type"));
}

#[test]
fn zero_negative_and_inconsistent_dims() {
    for (k, name) in [
        (2, "dim"),
        (3, "hidden_dim"),
        (4, "n_layers"),
        (5, "n_heads"),
        (6, "n_kv_heads"),
        (9, "vocab_size"),
        (10, "max_seq_len"),
    ] {
        let m = format_err(&with(&[(k, 0)]));
        assert!(m.contains(name) && m.contains("zero"), "{name}: {m}");
        let m = format_err(&with(&[(k, -5)]));
        assert!(m.contains("negative"), "{name}: {m}");
    }
    let m = format_err(&with(&[(2, 96), (5, 5)])); // 96 / 5
    assert!(m.contains("not divisible by n_heads"), "{m}");
    let m = format_err(&with(&[(5, 4), (6, 3)]));
    assert!(m.contains("n_kv_heads 3 does not divide n_heads 4"), "{m}");
    let m = format_err(&with(&[(5, 4), (6, 8)]));
    assert!(m.contains("does not divide"), "{m}");
    let m = format_err(&with(&[(19, 15)]));
    assert!(m.contains("head_dim 15 is odd"), "{m}");
}

#[test]
fn quantized_weights_need_multiples_of_32() {
    // dim 48 (heads 3 × 16): fine for f32 / f16, not for q40 / q80
    for (ft, ok) in [(0, true), (1, true), (2, false), (3, false)] {
        let r = ModelHeader::parse(&with(&[(2, 48), (5, 3), (6, 1), (13, ft)]));
        assert_eq!(r.is_ok(), ok, "{ft}: {r:?}");
    }
    let m = format_err(&with(&[(3, 100)]));
    assert!(
        m.contains("hidden_dim = 100 is not a multiple of 32"),
        "{m}"
    );
    let m = format_err(&with(&[(19, 6)])); // q_dim = 4 * 6 = 24
    assert!(m.contains("n_heads × head_dim = 24"), "{m}");
}

#[test]
fn unsupported_models() {
    // experts in a llama header (Mixtral) are refused; qwen3_moe needs them
    let m = format_err(&with(&[(7, 8), (8, 2)]));
    assert!(m.contains("mixture-of-experts"), "{m}");
    let m = format_err(&with(&[(1, 0xABCD02)]));
    assert!(m.contains("qwen3_moe needs"), "{m}");
    let m = format_err(&with(&[(1, 0xABCD02), (7, 4), (8, 5), (21, 32)]));
    assert!(m.contains("n_active_experts 5"), "{m}");
    let m = format_err(&with(&[(1, 0xABCD02), (7, 4), (8, 2), (21, 40), (13, 2)]));
    assert!(m.contains("hidden_dim = 40 is not a multiple of 32"), "{m}");
    let m = format_err(&with(&[(1, 0xABCD02), (7, 4), (8, 2), (21, 32), (22, 2)]));
    assert!(m.contains("norm_topk_prob = 2"), "{m}");
    let m = format_err(&with(&[(0, 1)]));
    assert!(m.contains("version 1"), "{m}");
    let m = format_err(&with(&[(18, 2), (14, 8), (15, 4), (16, 1), (17, 8192)]));
    assert!(m.contains("llama3.1"), "{m}");
    let m = format_err(&with(&[
        (2, 1 << 17),
        (3, 1 << 20),
        (4, 4096),
        (9, 1 << 24),
        (5, 32),
        (6, 32),
    ]));
    assert!(m.contains("absurd"), "{m}");
    // each dimension has its own bound, named in the message
    for (k, name) in [
        (2, "dim"),
        (3, "hidden_dim"),
        (4, "n_layers"),
        (9, "vocab_size"),
        (10, "max_seq_len"),
        (19, "head_dim"),
    ] {
        let m = format_err(&with(&[(k, i32::MAX - 31)]));
        assert!(m.contains(&format!("{name} = 2147483616 is beyond")), "{m}");
    }
}

#[test]
fn from_fields_errors_are_invalid_argument() {
    let ok: Vec<(String, FieldValue)> = small(FloatType::Q40)
        .fields()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let bad = |name: &str, v: FieldValue| {
        let mut f = ok.clone();
        match f.iter_mut().find(|p| p.0 == name) {
            Some(p) => p.1 = v,
            None => f.push((name.to_string(), v)),
        }
        match ModelHeader::from_fields(&f) {
            Err(Error::Invalid(m)) => m,
            other => panic!("{name}: expected Invalid, got {other:?}"),
        }
    };
    assert!(bad("dimm", FieldValue::Int(3)).contains("unknown model header field \"dimm\""));
    assert!(bad("dim", FieldValue::Float(64.5)).contains("must be an integer"));
    assert!(bad("dim", FieldValue::Int(-1)).contains("out of range"));
    assert!(bad("weights_float_type", FieldValue::Int(9)).contains("unknown weights_float_type"));
    assert!(bad("norm_epsilon", FieldValue::Float(1e-4)).contains("norm_epsilon"));
    assert!(bad("n_kv_heads", FieldValue::Int(3)).contains("does not divide"));
    assert!(bad("file_size", FieldValue::Int(12)).contains("does not match"));
    // integral floats are accepted for integer fields (HF configs give rope_theta as 10000.0)
    let mut f = ok.clone();
    f.push(("rope_theta".into(), FieldValue::Float(500000.0)));
    assert_eq!(ModelHeader::from_fields(&f).unwrap().rope_theta, 500000);
}

/// The tensor list of qwen3 / qwen3_moe headers follows distributed-llama's loadLlmNetWeight:
/// q, k, v, wo, [router, then w1 w2 w3 of each expert | w1 w2 w3], q_norm, k_norm, the two
/// block norms; the forced falcon RoPE; norm_topk_prob = false written as key 22.
#[test]
fn qwen3_layouts() {
    let base = ModelHeader {
        dim: 64,
        hidden_dim: 96,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 32,
        vocab_size: 100,
        max_seq_len: 128,
        weights_float_type: FloatType::Q40,
        rope_theta: 1_000_000,
        norm_epsilon: 1e-6,
        ..ModelHeader::default()
    };
    let dense = ModelHeader {
        arch_type: ArchType::Qwen3,
        rope_type: RopeType::Falcon,
        ..base.clone()
    };
    dense.validate().unwrap();
    let names: Vec<String> = dense.tensors().into_iter().map(|t| t.name).collect();
    let layer0: Vec<&str> = names[1..12].iter().map(|s| s.as_str()).collect();
    assert_eq!(
        layer0,
        [
            "layers.0.q",
            "layers.0.k",
            "layers.0.v",
            "layers.0.wo",
            "layers.0.w1",
            "layers.0.w2",
            "layers.0.w3",
            "layers.0.q_norm",
            "layers.0.k_norm",
            "layers.0.attn_norm",
            "layers.0.ffn_norm"
        ]
    );
    // a qwen3 file written with rope_type 0 (distributed-llama's converter does not set it)
    // reads as falcon, as the C++ does
    let mut bytes = ModelHeader {
        rope_type: RopeType::Falcon,
        ..dense.clone()
    }
    .to_bytes();
    let pos = bytes
        .chunks(4)
        .position(|w| w == 18i32.to_le_bytes())
        .unwrap()
        * 4;
    bytes[pos + 4..pos + 8].copy_from_slice(&0i32.to_le_bytes());
    assert_eq!(
        ModelHeader::parse(&bytes).unwrap().rope_type,
        RopeType::Falcon
    );

    let moe = ModelHeader {
        arch_type: ArchType::Qwen3Moe,
        rope_type: RopeType::Falcon,
        n_experts: 3,
        n_active_experts: 2,
        moe_hidden_dim: 32,
        ..base.clone()
    };
    moe.validate().unwrap();
    let t = moe.tensors();
    let layer0: Vec<(&str, usize, usize)> = t[1..19]
        .iter()
        .map(|s| (s.name.as_str(), s.rows, s.cols))
        .collect();
    assert_eq!(
        layer0,
        [
            ("layers.0.q", 128, 64),
            ("layers.0.k", 64, 64),
            ("layers.0.v", 64, 64),
            ("layers.0.wo", 64, 128),
            ("layers.0.moe_gate", 3, 64),
            ("layers.0.experts.0.w1", 32, 64),
            ("layers.0.experts.0.w2", 64, 32),
            ("layers.0.experts.0.w3", 32, 64),
            ("layers.0.experts.1.w1", 32, 64),
            ("layers.0.experts.1.w2", 64, 32),
            ("layers.0.experts.1.w3", 32, 64),
            ("layers.0.experts.2.w1", 32, 64),
            ("layers.0.experts.2.w2", 64, 32),
            ("layers.0.experts.2.w3", 32, 64),
            ("layers.0.q_norm", 1, 32),
            ("layers.0.k_norm", 1, 32),
            ("layers.0.attn_norm", 1, 64),
            ("layers.0.ffn_norm", 1, 64),
        ]
    );
    assert_eq!(t[5].float_type, FloatType::F32); // the router
    assert_eq!(t[6].float_type, FloatType::Q40);
    // the file size from distributed-llama's sizes: embedding and norms f32, router f32
    // (n_experts x dim), the rest in blocks of 32 values = 18 bytes
    let q40 = |n: u64| n / 32 * 18;
    let layer = q40(128 * 64)
        + 2 * q40(64 * 64)
        + q40(64 * 128)
        + 3 * 64 * 4
        + 3 * 3 * q40(32 * 64)
        + 2 * 32 * 4
        + 2 * 64 * 4;
    let want = moe.header_size() as u64 + 100 * 64 * 4 + 2 * layer + 64 * 4 + q40(100 * 64);
    assert_eq!(moe.file_size(), want);
    // round trip, with and without norm_topk_prob (key 22 only when false)
    for norm in [true, false] {
        let h = ModelHeader {
            norm_topk_prob: norm,
            ..moe.clone()
        };
        let b = h.to_bytes();
        let has22 = b[8..].chunks(8).any(|p| p[..4] == 22i32.to_le_bytes());
        assert_eq!(has22, !norm);
        let back = ModelHeader::parse(&b).unwrap();
        assert_eq!(back.norm_topk_prob, norm);
        assert_eq!(back.tensors(), h.tensors());
    }
}
