//! `.t` and llama2.c tokenizer files: round trips, byte layout, old keys, bad files.

mod format_common;

use dllama_core::format::Tokenizer;
use dllama_core::Error;

fn sample() -> Tokenizer {
    Tokenizer {
        version: 1,
        vocab: vec![
            b"<unk>".to_vec(),
            b"<s>".to_vec(),
            b"</s>".to_vec(),
            vec![0xFF, 0xFE], // not UTF-8: raw byte tokens must survive
            " h\u{e9}llo".as_bytes().to_vec(),
            "\u{1F600}".as_bytes().to_vec(),
            b"<|eot_id|>".to_vec(),
        ],
        scores: vec![0.0, -1.0, -2.5, -1e9, 3.25, f32::MIN_POSITIVE, 7.0],
        max_token_length: 0,
        bos_id: 1,
        eos_ids: vec![2, 6],
        pad_id: 0,
        chat_eos_id: -1,
        chat_template: Some("{% for m in messages %}<|{{ m.role }}|>\u{2764}{% endfor %}".into()),
        add_bos: false,
    }
}

/// `.t` bytes packed by hand in tokenizer-writer.py's order.
fn pack(pairs: &[(i32, i32)], tail: &[u8], tokens: &[(f32, &[u8])]) -> Vec<u8> {
    let mut b = format_common::pack_pairs(0x567124, pairs);
    b.extend_from_slice(tail);
    for (score, tok) in tokens {
        b.extend_from_slice(&score.to_le_bytes());
        b.extend_from_slice(&(tok.len() as u32).to_le_bytes());
        b.extend_from_slice(tok);
    }
    b
}

fn err(bytes: &[u8]) -> String {
    match Tokenizer::parse(bytes, "tokenizer file x.t") {
        Err(Error::Format(m)) => m,
        other => panic!("expected a format error, got {other:?}"),
    }
}

const TOKS: [(f32, &[u8]); 3] = [(0.0, b"a"), (-1.0, b"bc"), (-2.0, b"def")];

#[test]
fn round_trip() {
    let t = sample();
    let bytes = t.to_bytes().unwrap();
    let back = Tokenizer::parse(&bytes, "t").unwrap();
    assert_eq!(
        back,
        Tokenizer {
            max_token_length: 10,
            ..t.clone()
        }
    );
    // through a file
    let path = std::env::temp_dir().join(format!("dllama-tok-{}.t", std::process::id()));
    t.write(&path).unwrap();
    assert_eq!(Tokenizer::read(&path).unwrap(), back);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn bytes_follow_tokenizer_writer_py() {
    let t = Tokenizer {
        vocab: TOKS.iter().map(|(_, b)| b.to_vec()).collect(),
        scores: TOKS.iter().map(|(s, _)| *s).collect(),
        bos_id: 0,
        eos_ids: vec![2, 1],
        chat_template: Some("T\u{e9}".into()),
        ..Tokenizer::default()
    };
    let mut tail = "T\u{e9}".as_bytes().to_vec();
    tail.extend_from_slice(&2i32.to_le_bytes());
    tail.extend_from_slice(&1i32.to_le_bytes());
    let expected = pack(
        &[(3, 0), (0, 1), (1, 3), (2, 3), (7, 3), (9, 2), (10, 1)],
        &tail,
        &TOKS,
    );
    assert_eq!(t.to_bytes().unwrap(), expected);
}

#[test]
fn old_keys_eos_chat_eos_and_chat_stop() {
    // eos_id (4), chat_eos_id (6), pad (5), chat template then chat stop bytes, no eos list
    let mut tail = b"TPL".to_vec();
    tail.extend_from_slice(b"STOP!");
    let b = pack(
        &[
            (0, 1),
            (1, 3),
            (2, 3),
            (3, 0),
            (4, 2),
            (5, 1),
            (6, 1),
            (7, 3),
            (8, 5),
        ],
        &tail,
        &TOKS,
    );
    let t = Tokenizer::parse(&b, "t").unwrap();
    assert_eq!(t.eos_ids, vec![2, 1]);
    assert_eq!(t.chat_eos_id, 1);
    assert_eq!(t.pad_id, 1);
    assert_eq!(t.chat_template.as_deref(), Some("TPL"));
    assert!(t.add_bos, "add_bos defaults to true when absent");
    assert_eq!(t.vocab[2], b"def");
    // written back, every eos id lands in the list and chat_eos_id is not repeated
    let back = Tokenizer::parse(&t.to_bytes().unwrap(), "t").unwrap();
    assert_eq!(back.eos_ids, vec![2, 1]);
    assert_eq!(back.chat_eos_id, -1);
    assert_eq!((back.vocab, back.scores), (t.vocab, t.scores));
}

#[test]
fn llama2c_tokenizer_bin() {
    let mut b = 3i32.to_le_bytes().to_vec();
    for (s, tok) in TOKS {
        b.extend_from_slice(&s.to_le_bytes());
        b.extend_from_slice(&(tok.len() as i32).to_le_bytes());
        b.extend_from_slice(tok);
    }
    let t = Tokenizer::parse(&b, "tokenizer.bin").unwrap();
    assert_eq!(t.version, 0);
    assert_eq!(
        t.vocab,
        vec![b"a".to_vec(), b"bc".to_vec(), b"def".to_vec()]
    );
    assert_eq!(t.scores, vec![0.0, -1.0, -2.0]);
    assert_eq!(
        (t.bos_id, t.eos_ids.clone(), t.max_token_length),
        (1, vec![2], 3)
    );
    // and it converts to .t
    let t2 = Tokenizer::parse(&t.to_bytes().unwrap(), "t").unwrap();
    assert_eq!(t2.version, 1);
    assert_eq!(t2.vocab, t.vocab);
    // cut inside the last token: neither format
    let m = err(&b[..b.len() - 1]);
    assert!(
        m.contains("neither a .t tokenizer") && m.contains("truncated"),
        "{m}"
    );
}

#[test]
fn wrong_version() {
    for v in [0, 2, -1] {
        let m = err(&pack(&[(0, v), (1, 3), (2, 3)], &[], &TOKS));
        assert!(
            m.contains(&format!("tokenizer version {v} is not supported")),
            "{m}"
        );
    }
    let m = err(&pack(&[(1, 3), (2, 3)], &[], &TOKS));
    assert!(m.contains("no version"), "{m}");
}

#[test]
fn wrong_magic() {
    let mut b = pack(&[(0, 1), (1, 3), (2, 3)], &[], &TOKS);
    b[..4].copy_from_slice(&0xDEADBEEFu32.to_le_bytes());
    let m = err(&b);
    assert!(
        m.contains("neither a .t tokenizer") && m.contains("0xdeadbeef"),
        "{m}"
    );
    b[..4].copy_from_slice(&0x567123u32.to_le_bytes());
    assert!(err(&b).contains("old tokenizer format"));
    assert!(err(&[1, 2]).contains("too short"));
}

#[test]
fn truncated_anywhere() {
    let full = sample().to_bytes().unwrap();
    for cut in [5, 8, 20, 60, 100, full.len() - 1] {
        let m = err(&full[..cut]);
        assert!(m.contains("truncated"), "{cut}: {m}");
    }
}

#[test]
fn absurd_sizes() {
    for size in [4i32, 9, -16, 1 << 20] {
        let mut b = pack(&[(0, 1), (1, 3), (2, 3)], &[], &TOKS);
        b[4..8].copy_from_slice(&size.to_le_bytes());
        assert!(err(&b).contains("absurd header size"), "{size}");
    }
    let m = err(&pack(&[(0, 1), (1, i32::MAX), (2, 3)], &[], &TOKS));
    assert!(m.contains("absurd vocab_size"), "{m}");
    let m = err(&pack(&[(0, 1), (1, 1 << 20), (2, 3)], &[], &TOKS));
    assert!(
        m.contains("truncated") && m.contains("vocab_size 1048576"),
        "{m}"
    );
    let m = err(&pack(&[(0, 1), (1, 3), (2, -3)], &[], &TOKS));
    assert!(m.contains("absurd max_token_length"), "{m}");
    let m = err(&pack(&[(0, 1), (1, 3), (2, 3), (7, 1 << 30)], &[], &TOKS));
    assert!(m.contains("absurd chat_template"), "{m}");
    let m = err(&pack(&[(0, 1), (1, 3), (2, 2)], &[], &TOKS));
    assert!(
        m.contains("token 2 is 3 bytes, longer than max_token_length 2"),
        "{m}"
    );
}

#[test]
fn other_bad_files() {
    let m = err(&pack(&[(0, 1), (1, 3), (2, 3), (11, 0)], &[], &TOKS));
    assert!(m.contains("unknown tokenizer header key 11"), "{m}");
    let m = err(&pack(&[(0, 1), (1, 3), (2, 3), (1, 3)], &[], &TOKS));
    assert!(m.contains("appears twice"), "{m}");
    let mut b = pack(&[(0, 1), (1, 3), (2, 3)], &[], &TOKS);
    b.extend_from_slice(b"xyz");
    assert!(err(&b).contains("3 extra bytes"));
    let m = err(&pack(&[(0, 1), (1, 3), (2, 3), (3, 3)], &[], &TOKS));
    assert!(m.contains("bos_id 3 is outside"), "{m}");
    let m = err(&pack(
        &[(0, 1), (1, 3), (2, 3), (9, 1)],
        &7i32.to_le_bytes(),
        &TOKS,
    ));
    assert!(m.contains("eos id 7 is outside"), "{m}");
    let m = err(&pack(
        &[(0, 1), (1, 3), (2, 3), (7, 2)],
        &[0xC3, 0x28],
        &TOKS,
    ));
    assert!(m.contains("not valid UTF-8"), "{m}");
}

#[test]
fn writer_rejects_bad_tokenizers() {
    let bad = |t: Tokenizer| match t.to_bytes() {
        Err(Error::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    };
    let cases = [
        (Tokenizer::default(), "has 0"),
        (
            Tokenizer {
                scores: vec![0.0],
                ..sample()
            },
            "7 tokens but 1 scores",
        ),
        (
            Tokenizer {
                max_token_length: 3,
                ..sample()
            },
            "less than the longest",
        ),
        (
            Tokenizer {
                eos_ids: vec![70],
                ..sample()
            },
            "eos id 70",
        ),
        (
            Tokenizer {
                version: 2,
                ..sample()
            },
            "version 2",
        ),
    ];
    for (t, want) in cases {
        let msg = bad(t);
        assert!(msg.contains(want), "expected {want:?} in {msg:?}");
    }
    // a chat_eos_id not in eos_ids is kept as an eos id
    let t = Tokenizer {
        chat_eos_id: 5,
        ..sample()
    };
    assert_eq!(
        Tokenizer::parse(&t.to_bytes().unwrap(), "t")
            .unwrap()
            .eos_ids,
        vec![2, 6, 5]
    );
}
