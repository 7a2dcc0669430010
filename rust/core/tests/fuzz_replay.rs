//! The fuzz targets' bodies (fuzz/harness.rs) on stable Rust: every file of the seed corpus
//! (fuzz/corpus/<target>/), then a few thousand seeded mutations of them (bit flips, bytes and
//! int32 fields set to edge values, cuts, repeats). The cargo-fuzz campaigns (nightly) explore
//! much further from the same seeds; this keeps what they taught in CI, in seconds.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// xorshift64*: a fixed sequence, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const EDGE_I32: [i32; 10] = [
    0,
    1,
    -1,
    2,
    32,
    i32::MAX,
    i32::MIN,
    1 << 30,
    1 << 24,
    0x7fff_fff0,
];

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] ^= 1 << rng.below(8);
            }
            1 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] = [0u8, 0xff, 0x7f, 0x80, 1][rng.below(5)];
            }
            2 if d.len() >= 4 => {
                // an int32 field (the formats are 4-aligned) set to an edge value
                let i = rng.below(d.len() / 4) * 4;
                d[i..i + 4].copy_from_slice(&EDGE_I32[rng.below(EDGE_I32.len())].to_le_bytes());
            }
            3 => d.truncate(rng.below(d.len() + 1)),
            4 if !d.is_empty() => {
                let a = rng.below(d.len());
                let b = (a + 1 + rng.below(64)).min(d.len());
                let chunk = d[a..b].to_vec();
                let at = rng.below(d.len() + 1);
                d.splice(at..at, chunk);
            }
            _ => {
                let at = rng.below(d.len() + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                d.splice(at..at, bytes);
            }
        }
    }
    d
}

const MUTATIONS_PER_TARGET: usize = 20_000;

#[test]
fn corpus_and_seeded_mutations() {
    for (name, body) in harness::TARGETS {
        let seeds = corpus(name);
        for s in &seeds {
            body(s);
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
        for i in 0..MUTATIONS_PER_TARGET {
            let input = mutate(&seeds[i % seeds.len()], &mut rng);
            let r = std::panic::catch_unwind(|| body(&input));
            assert!(
                r.is_ok(),
                "{name}: mutation {i} panics on input {input:02x?}"
            );
        }
    }
}
