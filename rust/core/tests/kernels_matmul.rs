//! Every matmul / quantize kernel of every path this CPU runs: SIMD equal to scalar within
//! tight named limits, scalar equal to an f64 reference within a named per-format limit.

#[path = "kernels_common/mod.rs"]
mod common;

use common::*;
use dllama_core::kernels::block::{f16_to_f32, f32_to_bf16_exact, f32_to_f16};
use dllama_core::kernels::{self, matmul, BlockQ80, Input, KernelPath, Kernels, Matrix, QK};
use dllama_core::pool::{split_range, ThreadPool};
use rand::rngs::StdRng;

/// Scalar kernels against the f64 product of the same (already quantized) values, relative
/// to sum |w x|: the integer block sums are exact, only the f32 scale products and the f32
/// accumulation round.
const SCALAR_REL_Q40_Q80: f64 = 1e-5;
const SCALAR_REL_Q80_Q80: f64 = 1e-5;
const SCALAR_REL_F32: f64 = 1e-5;
const SCALAR_REL_F16: f64 = 1e-5;
/// SIMD against scalar, relative to sum |w x|: same integer sums, another f32 summation order.
const SIMD_REL: f64 = 2e-6;
/// Absolute floor for outputs whose sum |w x| is zero (all-zero rows).
const ABS_FLOOR: f64 = 1e-30;

fn scalar() -> Kernels {
    Kernels::for_path(KernelPath::Scalar).unwrap()
}

/// f32 outputs widened to f64, to serve as the `want` of a later comparison.
fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&v| v as f64).collect()
}

/// Runs `run` with the scalar kernels into a zeroed output of `n_out` values, checks it against
/// the f64 reference `want` within `rel` (named `what`), and returns it widened: the baseline
/// the SIMD paths are then held to.
fn scalar_checked(
    what: &str,
    n_out: usize,
    want: &[f64],
    mag: &[f64],
    rel: f64,
    run: impl Fn(&Kernels, &mut [f32]),
) -> Vec<f64> {
    let mut base = vec![0.0f32; n_out];
    run(&scalar(), &mut base);
    assert_close(what, &base, want, mag, rel, ABS_FLOOR);
    widen(&base)
}

/// The scalar q40×q80 product widened to f64 (checked against f64 in `q40_q80_every_path`).
fn scalar_q40_q80(
    w: &[kernels::BlockQ40],
    x: &[BlockQ80],
    n_rows: usize,
    n_tokens: usize,
) -> Vec<f64> {
    let mut base = vec![0.0f32; n_tokens * n_rows];
    scalar().matmul_q40_q80(w, x, &mut base, n_tokens);
    widen(&base)
}

/// Runs `run` on every kernel path this CPU has, each into a fresh output of `n_out` NaNs,
/// and checks the result against `want` within `rel`; failures name the path, then `what`.
fn check_every_path(
    what: &str,
    n_out: usize,
    want: &[f64],
    mag: &[f64],
    rel: f64,
    run: impl Fn(&Kernels, &mut [f32]),
) {
    for k in all_kernels() {
        let mut got = vec![f32::NAN; n_out];
        run(&k, &mut got);
        assert_close(
            &format!("{} {what}", k.path),
            &got,
            want,
            mag,
            rel,
            ABS_FLOOR,
        );
    }
}

#[test]
fn paths_available() {
    let names: Vec<&str> = all_kernels().iter().map(|k| k.path.name()).collect();
    eprintln!(
        "kernel paths tested on this CPU: {names:?}; active: {}",
        kernels::active_path()
    );
    assert!(names.contains(&"scalar"));
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        assert!(names.contains(&"avx2"));
    }
    #[cfg(target_arch = "aarch64")]
    assert!(names.contains(&"neon"));
}

/// A quantized weight format × Q80 input over `SHAPES`: the scalar kernel against the f64
/// product of the same values within `scalar_rel`, every path against scalar within `SIMD_REL`.
fn check_quant_x_q80<B>(
    seed: u64,
    name: &str,
    scalar_rel: f64,
    random: fn(&mut StdRng, usize) -> Vec<B>,
    values: fn(&[B]) -> Vec<f64>,
    kernel: fn(&Kernels, &[B], &[BlockQ80], &mut [f32], usize),
) {
    let mut rng = rng(seed);
    for &(n_rows, bpr, n_tokens) in &SHAPES {
        let w = random(&mut rng, n_rows * bpr);
        let x = random_q80(&mut rng, n_tokens * bpr);
        let (want, mag) = reference(&values(&w), &q80_values(&x), n_rows, bpr * QK, n_tokens);
        let run = |k: &Kernels, out: &mut [f32]| kernel(k, &w, &x, out, n_tokens);
        let n_out = n_tokens * n_rows;
        let what = format!("scalar {name} vs f64");
        let base = scalar_checked(&what, n_out, &want, &mag, scalar_rel, run);
        let what = format!("{name} {n_rows}x{bpr}x{n_tokens}");
        check_every_path(&what, n_out, &base, &mag, SIMD_REL, run);
    }
}

#[test]
fn q40_q80_every_path() {
    check_quant_x_q80(
        1,
        "q40×q80",
        SCALAR_REL_Q40_Q80,
        random_q40,
        q40_values,
        Kernels::matmul_q40_q80,
    );
}

#[test]
fn q40_q80_batch_equals_one_token_at_a_time() {
    let mut rng = rng(2);
    let (n_rows, bpr, n_tokens) = (13, 9, 7);
    let w = random_q40(&mut rng, n_rows * bpr);
    let x = random_q80(&mut rng, n_tokens * bpr);
    for k in all_kernels() {
        let mut batch = vec![0.0f32; n_tokens * n_rows];
        k.matmul_q40_q80(&w, &x, &mut batch, n_tokens);
        for t in 0..n_tokens {
            let mut one = vec![0.0f32; n_rows];
            k.matmul_q40_q80(&w, &x[t * bpr..(t + 1) * bpr], &mut one, 1);
            assert_eq!(
                &batch[t * n_rows..(t + 1) * n_rows],
                &one[..],
                "{} token {t}",
                k.path
            );
        }
    }
}

#[test]
fn q80_and_packed_batch_equal_one_token_at_a_time() {
    // the multi-row (one token) and multi-token (prefill) tiles compute every output the same way
    let mut rng = rng(15);
    let (n_rows, bpr, n_tokens) = (37, 9, 6);
    let w8 = random_q80(&mut rng, n_rows * bpr);
    let w4 = random_q40(&mut rng, n_rows * bpr);
    let packed = kernels::PackedQ40::pack(&w4, n_rows, bpr * QK).unwrap();
    let cells = packed.groups(0, packed.n_groups());
    let x = random_q80(&mut rng, n_tokens * bpr);
    for k in all_kernels() {
        let run = |x: &[BlockQ80], out: &mut [f32], n: usize, which: usize| match which {
            0 => k.matmul_q80_q80(&w8, x, out, n),
            _ => k.matmul_q40x8_q80(cells, bpr, x, out, n),
        };
        for which in 0..2 {
            let mut batch = vec![0.0f32; n_tokens * n_rows];
            run(&x, &mut batch, n_tokens, which);
            for t in 0..n_tokens {
                let mut one = vec![0.0f32; n_rows];
                run(&x[t * bpr..(t + 1) * bpr], &mut one, 1, which);
                assert_eq!(
                    &batch[t * n_rows..(t + 1) * n_rows],
                    &one[..],
                    "{} {} token {t}",
                    k.path,
                    ["q80×q80", "packed q40×q80"][which]
                );
            }
        }
    }
}

#[test]
fn q80_q80_every_path() {
    check_quant_x_q80(
        3,
        "q80×q80",
        SCALAR_REL_Q80_Q80,
        random_q80,
        q80_values,
        Kernels::matmul_q80_q80,
    );
}

/// (n_rows, cols, n_tokens) of the f32-input kernels' tests: column counts that are not
/// multiples of the 8 / 32 unroll; for one token, 4 rows at a time from the 4 quarters, then
/// the rows left over, and the columns past the last multiple of 16; a MoE router's shape, 2
/// rows more, and 3 tokens.
const F32_INPUT_SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (3, 7, 1),
    (5, 33, 2),
    (9, 100, 3),
    (4, 4096, 1),
    (17, 257, 5),
    (11, 37, 1),
    (130, 2048, 1),
    (128, 2048, 3),
];

#[test]
fn f32_and_f16_every_path() {
    let mut rng = rng(4);
    for &(n_rows, cols, n_tokens) in F32_INPUT_SHAPES {
        let w = random_values(&mut rng, n_rows * cols, 1.0);
        let x = random_values(&mut rng, n_tokens * cols, 1.0);
        let w16: Vec<u16> = w.iter().map(|&v| f32_to_f16(v)).collect();
        let w16_64: Vec<f64> = w16.iter().map(|&v| f16_to_f32(v) as f64).collect();
        let x64 = widen(&x);
        let (want, mag) = reference(&widen(&w), &x64, n_rows, cols, n_tokens);
        let (want16, mag16) = reference(&w16_64, &x64, n_rows, cols, n_tokens);
        let n_out = n_tokens * n_rows;
        let run32 = |k: &Kernels, out: &mut [f32]| k.matmul_f32(&w, &x, out, n_tokens);
        let run16 = |k: &Kernels, out: &mut [f32]| k.matmul_f16(&w16, &x, out, n_tokens);
        scalar_checked(
            "scalar f32 vs f64",
            n_out,
            &want,
            &mag,
            SCALAR_REL_F32,
            run32,
        );
        scalar_checked(
            "scalar f16 vs f64",
            n_out,
            &want16,
            &mag16,
            SCALAR_REL_F16,
            run16,
        );
        // every path against the f64 reference directly, within the scalar limit
        let what = format!("f32 {n_rows}x{cols}x{n_tokens}");
        check_every_path(&what, n_out, &want, &mag, SCALAR_REL_F32, run32);
        let what = format!("f16 {n_rows}x{cols}x{n_tokens}");
        check_every_path(&what, n_out, &want16, &mag16, SCALAR_REL_F16, run16);
    }
}

/// bf16 weights give bit for bit the outputs of the same values held as f32, on every path
/// and through the pooled `matmul` (a MoE router held as bf16 routes exactly as the f32
/// one), weights rounded to bf16 first.
#[test]
fn bf16_equals_f32_of_the_same_values_every_path() {
    let mut rng = rng(14);
    for &(n_rows, cols, n_tokens) in F32_INPUT_SHAPES {
        let w: Vec<f32> = random_values(&mut rng, n_rows * cols, 1.0)
            .iter()
            .map(|&v| f32::from_bits(v.to_bits() & 0xFFFF_0000))
            .collect();
        let x = random_values(&mut rng, n_tokens * cols, 1.0);
        let wb: Vec<u16> = w.iter().map(|&v| f32_to_bf16_exact(v).unwrap()).collect();
        let n_out = n_tokens * n_rows;
        for k in all_kernels() {
            let (mut want, mut got) = (vec![f32::NAN; n_out], vec![f32::NAN; n_out]);
            k.matmul_f32(&w, &x, &mut want, n_tokens);
            k.matmul_bf16(&wb, &x, &mut got, n_tokens);
            let (want, got) = (bits(&want), bits(&got));
            assert_eq!(got, want, "{} {n_rows}x{cols}x{n_tokens}", k.path);
        }
        let mut pool = ThreadPool::new(2).unwrap();
        let (mut want, mut got) = (vec![f32::NAN; n_out], vec![f32::NAN; n_out]);
        let x_in = Input::F32(&x);
        matmul(
            &mut pool,
            Matrix::F32(&w),
            x_in,
            &mut want,
            n_rows,
            cols,
            n_tokens,
        )
        .unwrap();
        matmul(
            &mut pool,
            Matrix::Bf16(&wb),
            x_in,
            &mut got,
            n_rows,
            cols,
            n_tokens,
        )
        .unwrap();
        assert_eq!(bits(&got), bits(&want), "pooled {n_rows}x{cols}x{n_tokens}");
    }
    // only f32 values with zero low halves have a bf16 twin
    assert_eq!(f32_to_bf16_exact(1.5), Some(0x3FC0));
    assert_eq!(f32_to_bf16_exact(0.1), None);
    // and a bf16 matrix takes an f32 input only
    let mut pool = ThreadPool::new(1).unwrap();
    let xq = vec![BlockQ80::default(); 1];
    let err = matmul(
        &mut pool,
        Matrix::Bf16(&[0; 32]),
        Input::Q80(&xq),
        &mut [0.0],
        1,
        32,
        1,
    );
    assert!(err
        .unwrap_err()
        .to_string()
        .contains("bf16 weights by a q80 input"));
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn dot_and_axpy_every_path() {
    let mut rng = rng(5);
    for n in [0, 1, 7, 8, 9, 31, 32, 33, 64, 100, 128] {
        let a = random_values(&mut rng, n, 1.0);
        let b = random_values(&mut rng, n, 1.0);
        let want: f64 = a.iter().zip(&b).map(|(&p, &q)| p as f64 * q as f64).sum();
        let mag: f64 = a
            .iter()
            .zip(&b)
            .map(|(&p, &q)| (p as f64 * q as f64).abs())
            .sum();
        for k in all_kernels() {
            let got = k.dot_f32(&a, &b);
            assert_close(
                &format!("{} dot {n}", k.path),
                &[got],
                &[want],
                &[mag],
                SCALAR_REL_F32,
                ABS_FLOOR,
            );
            let mut y = b.clone();
            k.axpy(0.75, &a, &mut y);
            for i in 0..n {
                let w = b[i] as f64 + 0.75 * a[i] as f64;
                assert!(
                    (y[i] as f64 - w).abs() <= 1e-6 * (b[i].abs() as f64 + a[i].abs() as f64),
                    "{} axpy {n} at {i}",
                    k.path
                );
            }
        }
    }
}

#[test]
fn quantize_q80_every_path_bit_exact() {
    let mut rng = rng(6);
    let mut x = Vec::new();
    for scale in [1e-6f32, 0.01, 1.0, 300.0] {
        x.extend(random_values(&mut rng, 32 * 37, scale));
    }
    // a zero block, and a block of exact ties: amax 127 gives d = 1, so k + 0.5 rounds away
    x.extend([0.0f32; 32]);
    let mut ties: Vec<f32> = (0..31).map(|i| (i as f32 - 15.0) + 0.5).collect();
    ties.push(127.0);
    x.extend(ties);
    let n = x.len() / QK;
    let mut want = vec![BlockQ80::default(); n];
    scalar().quantize_q80(&x, &mut want);
    // scalar = ggml's reference quantizer (block.rs), checked against the definition
    for (b, xb) in want.iter().zip(x.chunks_exact(QK)) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_eq!(b.d, f32_to_f16(amax / 127.0));
    }
    assert_eq!(want[n - 1].qs[0], -15, "-14.5 rounds away from zero");
    assert_eq!(want[n - 1].qs[15], 1, "0.5 rounds away from zero");
    for k in all_kernels() {
        let mut got = vec![BlockQ80::default(); n];
        k.quantize_q80(&x, &mut got);
        for i in 0..n {
            assert_eq!(got[i], want[i], "{} block {i}", k.path);
        }
    }
}

#[test]
fn quantized_matmul_close_to_float_product() {
    // end to end: quantize f32 weights to Q40 and inputs to Q80, multiply, compare with the
    // f64 product of the original values. Each Q40 value is within one step d_w of the
    // original (half a step, or a full one for the clamped +8 case), each Q80 value within d_x / 2.
    let mut rng = rng(7);
    let (n_rows, cols) = (24, 32 * 20);
    let w = random_values(&mut rng, n_rows * cols, 1.0);
    let x = random_values(&mut rng, cols, 1.0);
    let mut wq = vec![kernels::BlockQ40::default(); n_rows * cols / QK];
    kernels::quantize_q40(&w, &mut wq);
    let mut xq = vec![BlockQ80::default(); cols / QK];
    kernels::quantize_q80(&x, &mut xq).unwrap();
    let mut got = vec![0.0f32; n_rows];
    let mut pool = ThreadPool::new(1).unwrap();
    matmul(
        &mut pool,
        Matrix::Q40(&wq),
        Input::Q80(&xq),
        &mut got,
        n_rows,
        cols,
        1,
    )
    .unwrap();
    for r in 0..n_rows {
        let (mut exact, mut bound) = (0.0f64, 0.0f64);
        for c in 0..cols {
            let dw = f16_to_f32(wq[(r * cols + c) / QK].d).abs() as f64;
            let dx = f16_to_f32(xq[c / QK].d) as f64 / 2.0;
            let (a, b) = (w[r * cols + c] as f64, x[c] as f64);
            exact += a * b;
            bound += dw * b.abs() + a.abs() * dx + dw * dx;
        }
        assert!(
            (got[r] as f64 - exact).abs() <= bound * 1.001,
            "row {r}: {} vs {exact} (bound {bound})",
            got[r]
        );
    }
}

#[test]
fn threaded_matmul_equals_single_thread() {
    let mut rng = rng(8);
    let k = Kernels::get();
    for &(n_rows, bpr, n_tokens) in &[
        (1, 3, 1),
        (15, 4, 1),
        (16, 4, 1),
        (17, 4, 1),
        (100, 5, 1),
        (37, 6, 3),
        (64, 2, 5),
    ] {
        let cols = bpr * QK;
        let w = random_q40(&mut rng, n_rows * bpr);
        let x = random_q80(&mut rng, n_tokens * bpr);
        let xf = random_values(&mut rng, n_tokens * cols, 1.0);
        let wf = random_values(&mut rng, n_rows * cols, 1.0);
        let mut want = vec![0.0f32; n_tokens * n_rows];
        k.matmul_q40_q80(&w, &x, &mut want, n_tokens);
        let mut want_f = vec![0.0f32; n_tokens * n_rows];
        k.matmul_f32(&wf, &xf, &mut want_f, n_tokens);
        for threads in [1, 2, 3, 4] {
            let mut pool = ThreadPool::new(threads).unwrap();
            let mut got = vec![f32::NAN; n_tokens * n_rows];
            matmul(
                &mut pool,
                Matrix::Q40(&w),
                Input::Q80(&x),
                &mut got,
                n_rows,
                cols,
                n_tokens,
            )
            .unwrap();
            assert_eq!(
                got, want,
                "q40 {n_rows}x{bpr}x{n_tokens} on {threads} threads"
            );
            matmul(
                &mut pool,
                Matrix::F32(&wf),
                Input::F32(&xf),
                &mut got,
                n_rows,
                cols,
                n_tokens,
            )
            .unwrap();
            assert_eq!(
                got, want_f,
                "f32 {n_rows}x{cols}x{n_tokens} on {threads} threads"
            );
        }
    }
}

#[test]
fn q40_and_q80_by_f32_input_match_reference() {
    let mut rng = rng(9);
    let (n_rows, bpr, n_tokens) = (7, 5, 3);
    let cols = bpr * QK;
    let w = random_q40(&mut rng, n_rows * bpr);
    let x = random_values(&mut rng, n_tokens * cols, 1.0);
    let x64 = widen(&x);
    let (want, mag) = reference(&q40_values(&w), &x64, n_rows, cols, n_tokens);
    let mut pool = ThreadPool::new(2).unwrap();
    let mut got = vec![0.0f32; n_tokens * n_rows];
    matmul(
        &mut pool,
        Matrix::Q40(&w),
        Input::F32(&x),
        &mut got,
        n_rows,
        cols,
        n_tokens,
    )
    .unwrap();
    assert_close(
        "q40 × f32",
        &got,
        &want,
        &mag,
        SCALAR_REL_Q40_Q80,
        ABS_FLOOR,
    );
    let w8 = random_q80(&mut rng, n_rows * bpr);
    let (want8, mag8) = reference(&q80_values(&w8), &x64, n_rows, cols, n_tokens);
    matmul(
        &mut pool,
        Matrix::Q80(&w8),
        Input::F32(&x),
        &mut got,
        n_rows,
        cols,
        n_tokens,
    )
    .unwrap();
    assert_close(
        "q80 × f32",
        &got,
        &want8,
        &mag8,
        SCALAR_REL_Q80_Q80,
        ABS_FLOOR,
    );
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let mut pool = ThreadPool::new(2).unwrap();
    let w = vec![kernels::BlockQ40::default(); 4];
    let x = vec![BlockQ80::default(); 2];
    let xf = vec![0.0f32; 64];
    let mut out = [0.0f32; 2];
    let cases: Vec<(Matrix, Input, usize, usize, usize, usize)> = vec![
        (Matrix::Q40(&w), Input::Q80(&x), 2, 64, 1, 2),  // ok
        (Matrix::Q40(&w), Input::Q80(&x), 3, 64, 1, 2),  // weights too short
        (Matrix::Q40(&w), Input::Q80(&x), 2, 64, 2, 2),  // input too short
        (Matrix::Q40(&w), Input::Q80(&x), 2, 64, 0, 2),  // no tokens
        (Matrix::Q40(&w), Input::Q80(&x), 2, 64, 1, 1),  // output too short
        (Matrix::Q40(&w), Input::Q80(&x), 4, 33, 1, 2),  // cols not a block multiple
        (Matrix::F32(&xf), Input::Q80(&x), 1, 64, 1, 1), // unsupported pair
    ];
    for (i, (wt, inp, rows, cols, toks, out_len)) in cases.into_iter().enumerate() {
        let r = matmul(&mut pool, wt, inp, &mut out[..out_len], rows, cols, toks);
        if i == 0 {
            assert!(r.is_ok());
        } else {
            let msg = r.expect_err("bad shape accepted").to_string();
            assert!(msg.starts_with("matmul:"), "case {i}: {msg}");
        }
    }
    let mut q = vec![BlockQ80::default(); 1];
    assert!(kernels::quantize_q80(&[0.0; 33], &mut q).is_err());
}

#[test]
fn forced_path_env_values() {
    // DLLAMA_KERNELS is read once per process (Kernels::get); its parsing is Kernels::choose
    let best = Kernels::choose(None).unwrap().path;
    assert_eq!(Kernels::choose(Some("auto")).unwrap().path, best);
    assert_eq!(
        best,
        KernelPath::ALL.into_iter().find(|p| p.supported()).unwrap()
    );
    assert_eq!(
        Kernels::choose(Some("scalar")).unwrap().path,
        KernelPath::Scalar
    );
    let avx2 = if KernelPath::Avx2.supported() {
        KernelPath::Avx2
    } else {
        KernelPath::Scalar
    };
    assert_eq!(Kernels::choose(Some("avx2")).unwrap().path, avx2);
    let neon = if KernelPath::Neon.supported() {
        KernelPath::Neon
    } else {
        KernelPath::Scalar
    };
    assert_eq!(Kernels::choose(Some(" neon ")).unwrap().path, neon);
    let err = Kernels::choose(Some("fast"))
        .map(|k| k.path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("DLLAMA_KERNELS") && err.contains("scalar"),
        "{err}"
    );
    if let Ok(v) = std::env::var("DLLAMA_KERNELS") {
        assert_eq!(
            kernels::active_path(),
            Kernels::choose(Some(&v)).unwrap().path
        );
    }
}

#[test]
fn packed_q40_every_path() {
    let mut rng = rng(10);
    // row counts around the group of 8 and the row split of 16
    for &(n_rows, bpr, n_tokens) in &[
        (1, 1, 1),
        (7, 3, 1),
        (9, 5, 4),
        (17, 3, 9),
        (8, 33, 5),
        (8, 2, 1),
        (9, 5, 2),
        (16, 1, 3),
        (23, 7, 1),
        (40, 129, 2),
        (64, 344, 1),
        // one token over 4, 5, 6, 7 groups: one pass of 4 streams and what is left after it
        // (1, 2, 3 groups one at a time), the last group padded or not, large groups and
        // small ones
        (32, 29, 1),
        (40, 33, 1),
        (48, 30, 1),
        (53, 64, 1),
        (32, 9, 1),
        (33, 4, 1),
        (48, 24, 1),
        (56, 3, 1),
        // 4 parts of 2 and more groups, and the groups left over cut again, the last group
        // padded in the last part or among those left over
        (31, 5, 1),
        (75, 12, 1),
        (95, 7, 1),
        (96, 18, 1),
        (2043, 24, 1),
        (2048, 12, 1),
        // long parts (4 of 13 groups of 49536 bytes), then 1 group alone, padded
        (421, 344, 1),
        // one token in several chunks per thread (`split_rows_claimed`), the last group
        // padded
        (512, 64, 1),
        (1000, 40, 1),
    ] {
        let cols = bpr * QK;
        let w = random_q40(&mut rng, n_rows * bpr);
        let x = random_q80(&mut rng, n_tokens * bpr);
        let packed = kernels::PackedQ40::pack(&w, n_rows, cols).unwrap();
        for threads in [2, 3] {
            let mut pool = ThreadPool::new(threads).unwrap();
            let again = kernels::PackedQ40::pack_with(&mut pool, &w, n_rows, cols).unwrap();
            assert!(
                again.groups(0, again.n_groups()) == packed.groups(0, packed.n_groups()),
                "pack_with on {threads} threads"
            );
        }
        let mut row = vec![kernels::BlockQ40::default(); bpr];
        for r in 0..n_rows {
            packed.unpack_row(r, &mut row);
            assert_eq!(&row[..], &w[r * bpr..(r + 1) * bpr], "unpack row {r}");
        }
        let (_, mag) = reference(&q40_values(&w), &q80_values(&x), n_rows, cols, n_tokens);
        let base64 = scalar_q40_q80(&w, &x, n_rows, n_tokens);
        let all = packed.groups(0, packed.n_groups());
        check_every_path(
            &format!("packed q40×q80 {n_rows}x{bpr}x{n_tokens}"),
            n_tokens * n_rows,
            &base64,
            &mag,
            SIMD_REL,
            |k, out| k.matmul_q40x8_q80(all, bpr, &x, out, n_tokens),
        );
        if n_tokens == 1 {
            // the claimed entry over ranges of 1, 2, 3, 5, 9, ... groups, handed out last first
            let mut bounds = vec![0];
            let mut g = 0;
            for size in [1, 2, 3, 5, 9].iter().cycle() {
                g += size;
                if g * 8 >= n_rows {
                    break;
                }
                bounds.push(g * 8);
            }
            bounds.push(n_rows);
            check_every_path(
                &format!("claimed packed q40×q80 {n_rows}x{bpr}"),
                n_rows,
                &base64,
                &mag,
                SIMD_REL,
                |k, out| {
                    let mut ranges = bounds.windows(2).map(|b| b[0]..b[1]).rev();
                    // SAFETY: `out` holds n_rows values; one thread
                    unsafe {
                        k.matmul_q40x8_q80_claimed(
                            all,
                            bpr,
                            &x,
                            out.as_mut_ptr(),
                            n_rows,
                            &mut || ranges.next(),
                        )
                    }
                },
            );
        }
        if n_tokens == 1 {
            // the passes entry: the groups cut into 1, 2 or 3 shares (`PassPlan`), their
            // items handed out a few at a time, the shares interleaved, the last items first
            for shares in [1, 2, 3] {
                let n_groups = packed.n_groups();
                let plans: Vec<kernels::PassPlan> = (0..shares)
                    .map(|i| kernels::PassPlan::new(split_range(n_groups, i, shares, 1)))
                    .collect();
                let mut claims = Vec::new();
                for (i, p) in plans.iter().enumerate() {
                    let cuts: Vec<usize> =
                        (0..p.items()).step_by(2 + i).chain([p.items()]).collect();
                    claims.extend(cuts.windows(2).map(|c| (*p, c[0]..c[1])));
                }
                claims.sort_by_key(|(p, r)| std::cmp::Reverse((r.start, p.g0)));
                check_every_path(
                    &format!("passes packed q40×q80 {n_rows}x{bpr}, {shares} shares"),
                    n_rows,
                    &base64,
                    &mag,
                    SIMD_REL,
                    |k, out| {
                        let mut it = claims.iter().cloned();
                        // SAFETY: `out` holds n_rows values; one thread
                        unsafe {
                            k.matmul_q40x8_q80_passes(
                                all,
                                bpr,
                                &x,
                                out.as_mut_ptr(),
                                n_rows,
                                &mut || it.next(),
                            )
                        }
                    },
                );
            }
        }
        for threads in [1, 2, 3] {
            let mut pool = ThreadPool::new(threads).unwrap();
            let mut got = vec![f32::NAN; n_tokens * n_rows];
            matmul(
                &mut pool,
                Matrix::Q40Packed(&packed),
                Input::Q80(&x),
                &mut got,
                n_rows,
                cols,
                n_tokens,
            )
            .unwrap();
            assert_close(
                &format!("matmul packed {n_rows}x{bpr}x{n_tokens} on {threads}"),
                &got,
                &base64,
                &mag,
                SIMD_REL,
                ABS_FLOOR,
            );
        }
    }
    let w = random_q40(&mut rng, 6);
    assert!(kernels::PackedQ40::pack(&w, 2, 100).is_err());
    let packed = kernels::PackedQ40::pack(&w, 2, 96).unwrap();
    let mut pool = ThreadPool::new(1).unwrap();
    let x = random_q80(&mut rng, 3);
    let mut out = [0.0f32; 3];
    assert!(matmul(
        &mut pool,
        Matrix::Q40Packed(&packed),
        Input::Q80(&x),
        &mut out,
        3,
        96,
        1
    )
    .is_err());
    let xf = vec![0.0f32; 96];
    assert!(matmul(
        &mut pool,
        Matrix::Q40Packed(&packed),
        Input::F32(&xf),
        &mut out[..2],
        2,
        96,
        1
    )
    .is_err());
}

#[test]
fn packed_q40_extreme_values_every_path() {
    // every nibble 0 or 15 against inputs ±127 (the quantizer's range): the largest integer
    // sums a packed kernel's lanes hold (the int16 sums of the NEON kernel without sdot and
    // of the AVX2 one), on 11 rows (a padded last group) and 3 tokens (a two-token tile and a
    // one-token tile), and on 37 rows and 1 token (the one-token kernels: a 4-group pass and
    // a padded group after it, with groups of 4 KiB or more and with smaller ones)
    for (n_rows, bpr, n_tokens) in [(11, 4, 3), (37, 32, 1), (37, 4, 1)] {
        extreme_values_every_path(n_rows, bpr, n_tokens);
    }
}

fn extreme_values_every_path(n_rows: usize, bpr: usize, n_tokens: usize) {
    let patterns = [0x00u8, 0xFF, 0x0F, 0xF0, 0x88, 0x7F];
    let w: Vec<kernels::BlockQ40> = (0..n_rows * bpr)
        .map(|i| kernels::BlockQ40 {
            d: f32_to_f16(if i % 3 == 0 { -0.031 } else { 0.017 }),
            qs: [patterns[(i / bpr + i) % patterns.len()]; 16],
        })
        .collect();
    let x: Vec<BlockQ80> = (0..n_tokens * bpr)
        .map(|i| {
            let mut b = BlockQ80 {
                d: f32_to_f16(0.009),
                qs: [0; 32],
            };
            for (j, q) in b.qs.iter_mut().enumerate() {
                *q = match i % 3 {
                    0 => 127,
                    1 => -127,
                    _ => [127, -127][(j / 4) % 2],
                };
            }
            b
        })
        .collect();
    let cols = bpr * QK;
    let (want, mag) = reference(&q40_values(&w), &q80_values(&x), n_rows, cols, n_tokens);
    let base = scalar_q40_q80(&w, &x, n_rows, n_tokens);
    let got: Vec<f32> = base.iter().map(|&v| v as f32).collect();
    assert_close(
        "scalar q40×q80 extremes vs f64",
        &got,
        &want,
        &mag,
        SCALAR_REL_Q40_Q80,
        ABS_FLOOR,
    );
    let packed = kernels::PackedQ40::pack(&w, n_rows, cols).unwrap();
    let cells = packed.groups(0, packed.n_groups());
    check_every_path(
        &format!("packed q40×q80 extremes {n_rows}x{bpr}x{n_tokens}"),
        n_tokens * n_rows,
        &base,
        &mag,
        SIMD_REL,
        |k, out| k.matmul_q40x8_q80(cells, bpr, &x, out, n_tokens),
    );
}

/// Kernels the dispatcher does not pick on every CPU with their path (the EVEX-encoded
/// 256-bit VNNI ones run only where AVX-VNNI is missing): called directly when the CPU can.
#[cfg(target_arch = "x86_64")]
#[test]
fn evex_vnni_kernels_match_scalar() {
    use dllama_core::kernels::{avx2_vnni, avx512};
    if !KernelPath::Avx512Vnni.supported() {
        eprintln!("no AVX-512 VNNI on this CPU: skipped");
        return;
    }
    let mut rng = rng(11);
    for &(n_rows, bpr, n_tokens) in &[(1, 1, 1), (5, 3, 1), (17, 11, 2), (33, 129, 1), (24, 7, 5)] {
        let cols = bpr * QK;
        let w = random_q40(&mut rng, n_rows * bpr);
        let x = random_q80(&mut rng, n_tokens * bpr);
        let (_, mag) = reference(&q40_values(&w), &q80_values(&x), n_rows, cols, n_tokens);
        let base64 = scalar_q40_q80(&w, &x, n_rows, n_tokens);
        let packed = kernels::PackedQ40::pack(&w, n_rows, cols).unwrap();
        let cells = packed.groups(0, packed.n_groups());
        let mut got = vec![f32::NAN; n_tokens * n_rows];
        // SAFETY: the CPU has AVX-512 F/BW/VL/VNNI (checked above), hence AVX2/FMA/F16C
        unsafe { avx2_vnni::avx512vnni::matmul_q40_q80(&w, &x, &mut got, n_tokens) };
        assert_close("evex q40", &got, &base64, &mag, SIMD_REL, ABS_FLOOR);
        got.fill(f32::NAN);
        unsafe { avx2_vnni::avx512vnni::matmul_q40x8_q80(cells, bpr, &x, &mut got, n_tokens) };
        assert_close("evex packed", &got, &base64, &mag, SIMD_REL, ABS_FLOOR);
        got.fill(f32::NAN);
        unsafe { avx512::matmul_q40x8_q80_zmm(cells, bpr, &x, &mut got, n_tokens) };
        assert_close("zmm packed", &got, &base64, &mag, SIMD_REL, ABS_FLOOR);
    }
}

#[test]
fn attention_kernels_every_path() {
    let mut rng = rng(12);
    for &(hd, stride, n_pos) in &[
        (1, 1, 1),
        (7, 9, 3),
        (64, 192, 17),
        (128, 128, 33),
        (12, 36, 1),
        // 8 positions at a time with a head_dim tail; 64 outputs at a time plus a tail
        (12, 20, 9),
        (100, 104, 16),
        (192, 192, 10),
    ] {
        let q = random_values(&mut rng, hd, 1.0);
        let k = random_values(&mut rng, (n_pos - 1) * stride + hd, 1.0);
        let att = random_values(&mut rng, n_pos, 1.0);
        let scale = 0.125f32;
        let (mut want_s, mut mag_s) = (vec![0.0f64; n_pos], vec![0.0f64; n_pos]);
        for p in 0..n_pos {
            for i in 0..hd {
                let v = q[i] as f64 * k[p * stride + i] as f64 * scale as f64;
                want_s[p] += v;
                mag_s[p] += v.abs();
            }
        }
        let (mut want_v, mut mag_v) = (vec![0.5f64; hd], vec![0.5f64; hd]);
        for p in 0..n_pos {
            for i in 0..hd {
                let v = att[p] as f64 * k[p * stride + i] as f64;
                want_v[i] += v;
                mag_v[i] += v.abs();
            }
        }
        for kern in all_kernels() {
            let mut scores = vec![f32::NAN; n_pos];
            kern.attn_scores(&q, &k, stride, scale, &mut scores);
            assert_close(
                &format!("{} attn_scores {hd}/{stride}/{n_pos}", kern.path),
                &scores,
                &want_s,
                &mag_s,
                SCALAR_REL_F32,
                ABS_FLOOR,
            );
            let mut out = vec![0.5f32; hd];
            kern.attn_values(&att, &k, stride, &mut out);
            assert_close(
                &format!("{} attn_values {hd}/{stride}/{n_pos}", kern.path),
                &out,
                &want_v,
                &mag_v,
                SCALAR_REL_F32,
                ABS_FLOOR,
            );
        }
    }
}

#[test]
fn softmax_every_path() {
    let mut rng = rng(14);
    for n in [1, 3, 8, 9, 31, 64, 1000] {
        // scores spread over ~100: the smallest weights underflow
        let mut x = random_values(&mut rng, n, 50.0);
        x[n / 2] = 30.0;
        let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let e: Vec<f64> = x.iter().map(|&v| (v as f64 - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        let want: Vec<f64> = e.iter().map(|v| v / sum).collect();
        for kern in all_kernels() {
            let mut got = x.clone();
            kern.softmax(&mut got);
            let what = format!("{} softmax of {n}", kern.path);
            assert_close(&what, &got, &want, &want, SCALAR_REL_F32, ABS_FLOOR);
            let mut nan = x.clone();
            nan[0] = f32::NAN;
            kern.softmax(&mut nan);
            assert!(nan[0].is_nan(), "{what}: a NaN score must not vanish");
        }
        let mut empty: Vec<f32> = Vec::new();
        for kern in all_kernels() {
            kern.softmax(&mut empty);
        }
    }
}

/// SiLU(gate) · up: every path against the f64 value, relative to |gate · up| (an exp, a
/// division and two products in f32, a few ulp).
const SILU_REL: f64 = 1e-6;

#[test]
fn silu_mul_every_path() {
    let mut rng = rng(15);
    for n in [1, 3, 8, 9, 15, 16, 17, 33, 1000] {
        let mut gate = random_values(&mut rng, n, 20.0);
        // where exp(-v) over- or underflows in f32, and 0
        for (i, v) in [-100.0, 100.0, -88.5, 88.5, -87.0, 0.0]
            .into_iter()
            .enumerate()
        {
            if i < n && n > 8 {
                gate[n - 1 - i] = v;
            }
        }
        let up = random_values(&mut rng, n, 2.0);
        let want: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(&v, &u)| v as f64 / (1.0 + (-(v as f64)).exp()) * u as f64)
            .collect();
        let mag: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(&v, &u)| (v * u).abs() as f64)
            .collect();
        for kern in all_kernels() {
            let mut got = gate.clone();
            kern.silu_mul(&mut got, &up);
            let what = format!("{} silu_mul of {n}", kern.path);
            assert_close(&what, &got, &want, &mag, SILU_REL, ABS_FLOOR);
            // only the shorter length is written
            let mut longer = gate.clone();
            longer.push(7.0);
            kern.silu_mul(&mut longer, &up);
            assert_eq!(longer[n], 7.0, "{what}: wrote past the shorter length");
            let mut nan = gate.clone();
            nan[0] = f32::NAN;
            kern.silu_mul(&mut nan, &up);
            assert!(nan[0].is_nan(), "{what}: a NaN must not vanish");
        }
    }
    for kern in all_kernels() {
        kern.silu_mul(&mut [], &[]);
    }
}

#[test]
fn q40_f32_every_path() {
    let mut rng = rng(13);
    for &(n_rows, bpr, n_tokens) in &SHAPES {
        let cols = bpr * QK;
        let w = random_q40(&mut rng, n_rows * bpr);
        let x = random_values(&mut rng, n_tokens * cols, 1.0);
        let (want, mag) = reference(&q40_values(&w), &widen(&x), n_rows, cols, n_tokens);
        check_every_path(
            &format!("q40×f32 {n_rows}x{bpr}x{n_tokens}"),
            n_tokens * n_rows,
            &want,
            &mag,
            SCALAR_REL_Q40_Q80,
            |k, out| k.matmul_q40_f32(&w, &x, out, n_tokens),
        );
    }
}
