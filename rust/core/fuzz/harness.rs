//! The fuzz targets' bodies, shared by `cargo fuzz` (fuzz_targets/*.rs) and the stable-Rust
//! replay test (tests/fuzz_replay.rs). Each takes arbitrary bytes and must return normally:
//! an `Err` is fine, a panic, an abort or an unbounded allocation is a bug. Where a decoder
//! accepts its input, what it decoded must encode back to something it decodes the same.

use dllama_core::format::{legacy, FloatType, ModelHeader, Tokenizer};
use dllama_core::net::codec::Wire;
use dllama_core::net::protocol::{Hello, RootHello, Setup, StepHeader, TensorStart};

/// A target's body.
pub type Body = fn(&[u8]);

/// Every target: (name, the corpus folder under fuzz/corpus, body).
pub const TARGETS: [(&str, Body); 7] = [
    ("model_header", model_header),
    ("legacy_header", legacy_header),
    ("tokenizer", tokenizer),
    ("protocol", protocol),
    ("wire", wire),
    ("tensor", tensor),
    ("step", step),
];

/// A `.m` header: parse; an accepted one gives its sizes and survives a write / parse trip.
pub fn model_header(data: &[u8]) {
    let Ok(h) = ModelHeader::parse(data) else {
        return;
    };
    let size = h.file_size();
    assert!(size >= h.header_size() as u64);
    let back = ModelHeader::parse(&h.to_bytes()).expect("a parsed header writes a valid one");
    assert_eq!(
        back.file_size() - back.header_size() as u64,
        size - h.header_size() as u64
    );
}

/// A legacy `.bin` header, under each weights type.
pub fn legacy_header(data: &[u8]) {
    for ft in FloatType::ALL {
        if let Ok(h) = legacy::parse(data, ft, "fuzz input") {
            assert!(legacy::file_size(&h) > legacy::LEGACY_HEADER_SIZE as u64);
        }
    }
}

/// A `.t` (or llama2.c) tokenizer: parse; an accepted one writes bytes that parse the same.
pub fn tokenizer(data: &[u8]) {
    let Ok(t) = Tokenizer::parse(data, "fuzz input") else {
        return;
    };
    if let Ok(bytes) = t.to_bytes() {
        let back = Tokenizer::parse(&bytes, "rewritten").expect("a written tokenizer parses");
        assert_eq!(back.vocab, t.vocab);
    }
}

/// The handshake messages (the first byte picks which): decode, then re-encode and decode.
pub fn protocol(data: &[u8]) {
    let Some((&which, p)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(m) = Hello::decode(p) {
                assert_eq!(Hello::decode(&m.encode()).unwrap(), m);
            }
        }
        1 => {
            if let Ok(m) = RootHello::decode(p) {
                assert_eq!(RootHello::decode(&m.encode()).unwrap(), m);
            }
        }
        _ => {
            if let Ok(m) = Setup::decode(p) {
                assert_eq!(Setup::decode(&m.encode()).unwrap(), m);
            }
        }
    }
}

/// Vectors on the wire (F32, F16, Q80): the first byte picks the encoding and the length.
pub fn wire(data: &[u8]) {
    let Some((&which, p)) = data.split_first() else {
        return;
    };
    let w = [FloatType::F32, FloatType::F16, FloatType::Q80].map(Wire)[which as usize % 3];
    let n = 32 * (1 + (which as usize / 3) % 8);
    let mut out = vec![0f32; n];
    let _ = w.decode(p, &mut out);
    let mut acc = vec![0f32; n];
    let _ = w.decode_add(p, &mut acc, &mut Vec::new());
}

/// A `Tensor` frame's payload (a shipped tensor starts): decode, re-encode, decode.
pub fn tensor(data: &[u8]) {
    if let Ok(m) = TensorStart::decode(data) {
        let bytes = m.encode();
        assert!(bytes.len() <= TensorStart::MAX_ENCODED);
        assert_eq!(TensorStart::decode(&bytes).unwrap(), m);
    }
}

/// A `Step` frame's payload, as a worker reads it: the first byte picks the input's encoding,
/// the model's dim (32 to 256) and its positions (1 to 64); an accepted header's input is
/// decoded into `n_tokens × dim` values (so the allocation is bounded by the positions), and
/// the header re-encodes to the same bytes.
pub fn step(data: &[u8]) {
    let Some((&which, p)) = data.split_first() else {
        return;
    };
    let w = [FloatType::F32, FloatType::F16].map(Wire)[which as usize % 2];
    let dim = 32 * (1 + (which as usize / 2) % 8);
    let max_tokens = 1 + (which as usize / 16) % 64;
    let Ok((h, input)) = StepHeader::decode(p, max_tokens) else {
        return;
    };
    assert!(h.n_tokens >= 1 && (h.pos + h.n_tokens) as usize <= max_tokens);
    let mut x = vec![0f32; h.n_tokens as usize * dim];
    let _ = w.decode(input, &mut x);
    let mut back = Vec::new();
    h.encode_into(&mut back);
    assert_eq!(back, p[..StepHeader::SIZE]);
}
