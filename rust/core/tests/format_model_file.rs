//! Memory-mapped `.m` and legacy `.bin` files: write → open → bytes, exact size checks.

mod format_common;

use std::path::PathBuf;

use dllama_core::format::{self, FloatType, ModelFile, ModelHeader};
use dllama_core::Error;

/// A file path in the temp dir, unique to this test process and `name`.
fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dllama-format-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn small(ft: FloatType) -> ModelHeader {
    format_common::small_header(ft, 40, 8)
}

/// Deterministic values for tensor `t` (different per tensor and position).
fn values(t: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + t * 104729) % 2001) as f32 - 1000.0) / 997.0)
        .collect()
}

/// Writes a `.m` file; returns its path and the float32 values of every tensor.
fn write_model(name: &str, h: &ModelHeader) -> (PathBuf, Vec<Vec<f32>>) {
    let mut bytes = h.to_bytes();
    let mut all = Vec::new();
    for (i, t) in h.tensors().iter().enumerate() {
        assert_eq!(bytes.len() as u64, t.offset, "{}", t.name);
        let v = values(i, t.rows * t.cols);
        bytes.extend(format::quantize(&v, t.float_type).unwrap());
        all.push(v);
    }
    let path = temp_path(name);
    std::fs::write(&path, &bytes).unwrap();
    (path, all)
}

/// Largest error a stored value may have: 0 for f32, f16 rounding, half a quantization step.
fn bound(ft: FloatType, x: &[f32]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    match ft {
        FloatType::F32 => 0.0,
        FloatType::F16 => amax / 1024.0,
        // Q40 steps of amax/8 (values of the other sign near amax clamp to +7: up to one step);
        // Q80 steps of amax/127, plus the f16 rounding of the scale
        FloatType::Q40 => amax / 8.0 * 1.01,
        FloatType::Q80 => amax / 127.0 * 0.51 + amax / 1024.0,
    }
}

#[test]
fn write_open_read_every_float_type() {
    for ft in FloatType::ALL {
        let h = small(ft);
        let (path, vals) = write_model(&format!("rt-{ft}.m"), &h);
        let f = ModelFile::open(&path).unwrap();
        assert_eq!(
            ModelHeader {
                file_header_size: None,
                ..f.header.clone()
            },
            h
        );
        assert_eq!(f.tensors, h.tensors());
        assert_eq!(f.map().len() as u64, h.file_size());
        for (t, v) in f.tensors.iter().zip(&vals) {
            let raw = f.bytes(t);
            assert_eq!(
                raw,
                &format::quantize(v, t.float_type).unwrap()[..],
                "{}",
                t.name
            );
            // bytes() points into the map: no copy
            let map = f.map();
            let base = map.as_ptr() as usize;
            assert_eq!(raw.as_ptr() as usize - base, t.offset as usize);
            let back = f.read_f32(&t.name).unwrap();
            assert_eq!(back.len(), v.len());
            for (blk_x, blk_y) in v.chunks(32).zip(back.chunks(32)) {
                let b = bound(t.float_type, blk_x);
                for (a, c) in blk_x.iter().zip(blk_y) {
                    assert!(
                        (a - c).abs() <= b,
                        "{ft} {}: {a} vs {c} (bound {b})",
                        t.name
                    );
                }
            }
        }
        assert!(f.tensor("layers.1.w3").is_ok());
        match f.tensor("layers.2.q") {
            Err(Error::Invalid(m)) => assert!(m.contains("no tensor \"layers.2.q\""), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn truncated_and_oversized_files() {
    let h = small(FloatType::Q40);
    let (path, _) = write_model("size.m", &h);
    let full = std::fs::read(&path).unwrap();
    let total = full.len() as u64;
    assert_eq!(total, h.file_size());
    for cut in [1usize, 17, 1000] {
        let p = temp_path(&format!("short-{cut}.m"));
        std::fs::write(&p, &full[..full.len() - cut]).unwrap();
        match ModelFile::open(&p) {
            Err(Error::Format(m)) => {
                assert!(
                    m.contains(&format!(
                        "is {cut} byte{} short of the {total} bytes",
                        if cut == 1 { "" } else { "s" }
                    )),
                    "{m}"
                );
                assert!(m.contains("truncated?") && m.contains("short-"), "{m}");
            }
            other => panic!("{other:?}"),
        }
    }
    let p = temp_path("long.m");
    let mut long = full.clone();
    long.extend_from_slice(&[0, 0, 0]);
    std::fs::write(&p, &long).unwrap();
    match ModelFile::open(&p) {
        Err(Error::Format(m)) => assert!(m.contains("has 3 extra bytes"), "{m}"),
        other => panic!("{other:?}"),
    }
    // cut inside the header: the header parser reports it, naming the file
    let p = temp_path("header-cut.m");
    std::fs::write(&p, &full[..20]).unwrap();
    match ModelFile::open(&p) {
        Err(Error::Format(m)) => {
            assert!(m.contains("header-cut.m") && m.contains("truncated"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    let p = temp_path("empty.m");
    std::fs::write(&p, b"").unwrap();
    assert!(matches!(ModelFile::open(&p), Err(Error::Format(_))));
}

#[test]
fn missing_file_is_an_io_not_found_error() {
    match ModelFile::open(&temp_path("does-not-exist.m")) {
        Err(Error::Io { source, context }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            assert!(context.contains("does-not-exist.m"), "{context}");
        }
        other => panic!("{other:?}"),
    }
    let dir = temp_path("a-directory");
    std::fs::create_dir_all(&dir).unwrap();
    assert!(ModelFile::open(&dir).is_err());
}

// ---------------------------------------------------------------------------------------------
// Legacy .bin
// ---------------------------------------------------------------------------------------------

/// Writes a legacy `.bin` by the layout of the seed's README (independently of `legacy.rs`);
/// returns the path and each tensor's (name, bytes).
fn write_legacy(
    name: &str,
    h: &ModelHeader,
    negative_vocab: bool,
) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let wt = h.weights_float_type;
    let vocab = if negative_vocab {
        -(h.vocab_size as i32)
    } else {
        h.vocab_size as i32
    };
    let mut b = Vec::new();
    for v in [
        h.dim as i32,
        h.hidden_dim as i32,
        h.n_layers as i32,
        h.n_heads as i32,
        h.n_kv_heads as i32,
        vocab,
        h.max_seq_len as i32,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    let (d, hd, v, kv) = (
        h.dim,
        h.hidden_dim,
        h.vocab_size,
        h.n_kv_heads * h.dim / h.n_heads,
    );
    let mut tensors = Vec::new();
    let mut push = |b: &mut Vec<u8>, name: String, n: usize, ft: FloatType| {
        let data = format::quantize(&values(tensors.len(), n), ft).unwrap();
        b.extend_from_slice(&data);
        tensors.push((name, data));
    };
    push(&mut b, "embedding".into(), v * d, FloatType::F32);
    for i in 0..h.n_layers {
        push(&mut b, format!("layers.{i}.attn_norm"), d, FloatType::F32);
        push(&mut b, format!("layers.{i}.ffn_norm"), d, FloatType::F32);
        push(&mut b, format!("layers.{i}.q"), d * d, wt);
        push(&mut b, format!("layers.{i}.k"), kv * d, wt);
        push(&mut b, format!("layers.{i}.v"), kv * d, wt);
        push(&mut b, format!("layers.{i}.wo"), d * d, wt);
        push(&mut b, format!("layers.{i}.w1"), hd * d, wt);
        push(&mut b, format!("layers.{i}.w2"), d * hd, wt);
        push(&mut b, format!("layers.{i}.w3"), hd * d, wt);
    }
    push(&mut b, "norm".into(), d, FloatType::F32);
    let head_size = d / h.n_heads;
    b.resize(b.len() + 2 * h.max_seq_len * (head_size / 2) * 4, 0);
    push(&mut b, "wcls".into(), v * d, wt);
    let path = temp_path(name);
    std::fs::write(&path, &b).unwrap();
    (path, tensors)
}

#[test]
fn legacy_files_expose_the_same_tensors() {
    for ft in FloatType::ALL {
        for negative in [false, true] {
            let h = small(ft);
            let (path, written) =
                write_legacy(&format!("legacy-{ft}-{negative}.bin"), &h, negative);
            let f = ModelFile::open_legacy(&path, ft).unwrap();
            assert_eq!(f.header.vocab_size, 40);
            assert_eq!(f.header.head_dim, 16);
            assert_eq!(f.header.weights_float_type, ft);
            let mut legacy_names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
            let m_tensors = h.tensors();
            let mut m_names: Vec<&str> = m_tensors.iter().map(|t| t.name.as_str()).collect();
            legacy_names.sort();
            m_names.sort();
            assert_eq!(legacy_names, m_names);
            for (name, data) in &written {
                let spec = f.tensor(name).unwrap();
                assert_eq!(f.bytes(spec), &data[..], "{ft} {name}");
                let m_spec = m_tensors.iter().find(|t| &t.name == name).unwrap();
                assert_eq!(
                    (spec.rows, spec.cols, spec.float_type),
                    (m_spec.rows, m_spec.cols, m_spec.float_type)
                );
            }
        }
    }
}

#[test]
fn legacy_size_and_header_errors() {
    let h = small(FloatType::Q40);
    let (path, _) = write_legacy("legacy-size.bin", &h, false);
    // opened with the wrong weights type, the sizes cannot match
    let (q80_path, _) = write_legacy("legacy-size-q80.bin", &small(FloatType::Q80), false);
    match ModelFile::open_legacy(&q80_path, FloatType::Q40) {
        Err(Error::Format(m)) => assert!(m.contains("extra bytes"), "{m}"),
        other => panic!("{other:?}"),
    }
    match ModelFile::open_legacy(&path, FloatType::F16) {
        Err(Error::Format(m)) => assert!(m.contains("bytes short"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[12..16].copy_from_slice(&0i32.to_le_bytes()); // n_heads = 0
    let p = temp_path("legacy-zero.bin");
    std::fs::write(&p, &bytes).unwrap();
    match ModelFile::open_legacy(&p, FloatType::Q40) {
        Err(Error::Format(m)) => assert!(m.contains("n_heads = 0"), "{m}"),
        other => panic!("{other:?}"),
    }
    let p = temp_path("legacy-short.bin");
    std::fs::write(&p, &bytes[..10]).unwrap();
    match ModelFile::open_legacy(&p, FloatType::Q40) {
        Err(Error::Format(m)) => assert!(m.contains("truncated"), "{m}"),
        other => panic!("{other:?}"),
    } // a .m file opened as legacy: its header has the type, the option is for .bin files
    let (m_path, _) = write_model("legacy-not.m", &h);
    match ModelFile::open_legacy(&m_path, FloatType::Q40) {
        Err(Error::Invalid(m)) => assert!(m.contains("only for legacy .bin files"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn hostile_headers_are_refused_before_the_tensor_list_is_built() {
    // .m: n_layers = 2^31 - 1 with tiny dims (9 × 2^31 tensor names would abort the process)
    let mut h = small(FloatType::F32);
    h.n_layers = i32::MAX as usize;
    let mut bytes = h.to_bytes();
    bytes.extend_from_slice(&[0u8; 4096]);
    let p = temp_path("hostile-layers.m");
    std::fs::write(&p, &bytes).unwrap();
    match ModelFile::open(&p) {
        Err(Error::Format(m)) => assert!(m.contains("n_layers = 2147483647 is beyond"), "{m}"),
        other => panic!("{other:?}"),
    }
    // within the bound but the file is short: the size is checked before the list is made
    h.n_layers = 4096;
    let mut bytes = h.to_bytes();
    bytes.extend_from_slice(&[0u8; 4096]);
    std::fs::write(&p, &bytes).unwrap();
    match ModelFile::open(&p) {
        Err(Error::Format(m)) => assert!(m.contains("bytes short"), "{m}"),
        other => panic!("{other:?}"),
    }
    // the computed size is the end of the listed tensors
    let t = h.tensors();
    let last = t.last().unwrap();
    assert_eq!(h.file_size(), last.offset + last.nbytes);
    // head_dim 2^30 with small dims (a RoPE table of GBs)
    let mut h = small(FloatType::F32);
    h.head_dim = 1 << 30;
    h.n_heads = 1;
    h.n_kv_heads = 1;
    match h.validate() {
        Err(Error::Invalid(m)) => assert!(m.contains("head_dim = 1073741824 is beyond"), "{m}"),
        other => panic!("{other:?}"),
    }
    // legacy .bin: the same n_layers
    let mut legacy = Vec::new();
    for v in [64, 96, i32::MAX, 4, 2, 40, 8] {
        legacy.extend_from_slice(&v.to_le_bytes());
    }
    legacy.extend_from_slice(&[0u8; 4096]);
    let p = temp_path("hostile-layers.bin");
    std::fs::write(&p, &legacy).unwrap();
    match ModelFile::open_legacy(&p, FloatType::F32) {
        Err(Error::Format(m)) => assert!(m.contains("n_layers = 2147483647 is beyond"), "{m}"),
        other => panic!("{other:?}"),
    }
    legacy[8..12].copy_from_slice(&4000i32.to_le_bytes());
    std::fs::write(&p, &legacy).unwrap();
    match ModelFile::open_legacy(&p, FloatType::F32) {
        Err(Error::Format(m)) => assert!(m.contains("bytes short"), "{m}"),
        other => panic!("{other:?}"),
    }
}
