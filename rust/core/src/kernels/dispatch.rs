//! Which kernel version runs: chosen once from the CPU's features, kept in a `OnceLock`.
//!
//! `DLLAMA_KERNELS=scalar` forces the portable versions; `avx2` forces plain AVX2 on a CPU
//! that also has VNNI (for tests and measurements); `neon` forces NEON without `dotprod`.

use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

use super::block::{BlockQ40, BlockQ80};
use super::packed::{for_each_claimed, PassPlan, GROUP};
use super::scalar;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// Portable Rust, the reference.
    Scalar,
    /// x86_64 AVX2 + FMA + F16C.
    Avx2,
    /// AVX2 kernels with the Q40 × Q80 dot product on AVX-VNNI `vpdpbusd`.
    AvxVnni,
    /// AVX2 kernels with the Q40 × Q80 dot product on AVX-512 VNNI `vpdpbusd` (512-bit for
    /// packed Q40, 256-bit otherwise).
    Avx512Vnni,
    /// aarch64 NEON (Pi 4: Cortex-A72).
    Neon,
    /// aarch64 NEON with the `sdot` dot-product instructions (Pi 5: Cortex-A76).
    NeonDotprod,
}

impl KernelPath {
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Scalar => "scalar",
            KernelPath::Avx2 => "avx2",
            KernelPath::AvxVnni => "avx2+avxvnni",
            KernelPath::Avx512Vnni => "avx2+avx512vnni",
            KernelPath::Neon => "neon",
            KernelPath::NeonDotprod => "neon+dotprod",
        }
    }

    /// Every path, best first (AVX-512 VNNI before AVX-VNNI: its 512-bit packed kernel runs
    /// prefill about 2x faster; generation is at the memory bandwidth with either).
    pub const ALL: [KernelPath; 6] = [
        KernelPath::Avx512Vnni,
        KernelPath::AvxVnni,
        KernelPath::Avx2,
        KernelPath::NeonDotprod,
        KernelPath::Neon,
        KernelPath::Scalar,
    ];

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            KernelPath::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            KernelPath::AvxVnni => {
                KernelPath::Avx2.supported() && is_x86_feature_detected!("avxvnni")
            }
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512Vnni => {
                KernelPath::Avx2.supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            KernelPath::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            KernelPath::NeonDotprod => {
                std::arch::is_aarch64_feature_detected!("neon")
                    && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

impl fmt::Display for KernelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(target_arch = "x86_64")]
type Q40Q80 = unsafe fn(&[BlockQ40], &[BlockQ80], &mut [f32], usize);
#[cfg(target_arch = "x86_64")]
type PackedQ40Q80 = unsafe fn(&[u8], usize, &[BlockQ80], &mut [f32], usize);
/// Packed Q40 × one Q80 token over claimed row ranges (`Kernels::matmul_q40x8_q80_claimed`).
type PackedQ40Q80Claimed =
    unsafe fn(&[u8], usize, &[BlockQ80], *mut f32, usize, &mut dyn FnMut() -> Option<Range<usize>>);
/// Packed Q40 × one Q80 token over claimed items of pass plans
/// (`Kernels::matmul_q40x8_q80_passes`).
type PackedQ40Q80Passes = unsafe fn(
    &[u8],
    usize,
    &[BlockQ80],
    *mut f32,
    usize,
    &mut dyn FnMut() -> Option<(PassPlan, Range<usize>)>,
);

/// Kernel entry points of one path. Shapes as in `scalar`: w (n_rows, bpr or cols),
/// x (n_tokens, ...), out (n_tokens, n_rows); the last argument is n_tokens.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub path: KernelPath,
    quantize_q80: unsafe fn(&[f32], &mut [BlockQ80]),
    matmul_q40_q80: unsafe fn(&[BlockQ40], &[BlockQ80], &mut [f32], usize),
    matmul_q80_q80: unsafe fn(&[BlockQ80], &[BlockQ80], &mut [f32], usize),
    /// Packed Q40 × Q80 for one token (generation) and for several (prefill): the AVX-512
    /// VNNI path streams one 256-bit group at a time for one token, 512-bit pairs for several.
    matmul_q40x8_q80: unsafe fn(&[u8], usize, &[BlockQ80], &mut [f32], usize),
    matmul_q40x8_q80_batch: unsafe fn(&[u8], usize, &[BlockQ80], &mut [f32], usize),
    /// One token over the row ranges a claim function hands out, the input prepared once
    /// (x86, NEON); `None` (scalar): one `matmul_q40x8_q80` call per range.
    matmul_q40x8_q80_claimed: Option<PackedQ40Q80Claimed>,
    /// One token over the items of pass plans a claim function hands out (x86; see
    /// `PassPlan`); `None`: the engine hands out row ranges (`matmul_q40x8_q80_claimed`).
    matmul_q40x8_q80_passes: Option<PackedQ40Q80Passes>,
    matmul_q40_f32: unsafe fn(&[BlockQ40], &[f32], &mut [f32], usize),
    matmul_f32: unsafe fn(&[f32], &[f32], &mut [f32], usize),
    matmul_f16: unsafe fn(&[u16], &[f32], &mut [f32], usize),
    /// bf16 bits: bit for bit `matmul_f32` of the same values.
    matmul_bf16: unsafe fn(&[u16], &[f32], &mut [f32], usize),
    dot_f32: unsafe fn(&[f32], &[f32]) -> f32,
    axpy: unsafe fn(f32, &[f32], &mut [f32]),
    attn_scores: unsafe fn(&[f32], &[f32], usize, f32, &mut [f32]),
    attn_values: unsafe fn(&[f32], &[f32], usize, &mut [f32]),
    softmax: unsafe fn(&mut [f32]),
    silu_mul: unsafe fn(&mut [f32], &[f32]),
}

// Each table is built only by `Kernels::for_path`, which checks the CPU supports it, so the
// target-feature functions it points to are safe to call through it.
impl Kernels {
    /// The kernels of `path`, or `None` when this CPU (or build target) cannot run them.
    pub fn for_path(path: KernelPath) -> Option<Kernels> {
        if !path.supported() {
            return None;
        }
        match path {
            KernelPath::Scalar => Some(Kernels::scalar()),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 | KernelPath::AvxVnni | KernelPath::Avx512Vnni => {
                use super::avx2;
                use super::avx2_vnni::{avx512vnni, avxvnni, maddubs};
                // the 256-bit kernels' dot product: the VEX vpdpbusd (AVX-VNNI) measured
                // faster than the EVEX one on Zen 5, so the AVX-512 VNNI path takes it too
                // when the CPU has both
                let vex = KernelPath::AvxVnni.supported();
                #[rustfmt::skip]
                let (q40, q40x8, claimed, passes): (Q40Q80, PackedQ40Q80, PackedQ40Q80Claimed, PackedQ40Q80Passes) = match path
                {
                    KernelPath::AvxVnni => (
                        avxvnni::matmul_q40_q80,
                        avxvnni::matmul_q40x8_q80,
                        avxvnni::matmul_q40x8_q80_claimed,
                        avxvnni::matmul_q40x8_q80_passes,
                    ),
                    KernelPath::Avx512Vnni if vex => (
                        avxvnni::matmul_q40_q80,
                        avxvnni::matmul_q40x8_q80,
                        avxvnni::matmul_q40x8_q80_claimed,
                        avxvnni::matmul_q40x8_q80_passes,
                    ),
                    KernelPath::Avx512Vnni => (
                        avx512vnni::matmul_q40_q80,
                        avx512vnni::matmul_q40x8_q80,
                        avx512vnni::matmul_q40x8_q80_claimed,
                        avx512vnni::matmul_q40x8_q80_passes,
                    ),
                    _ => (
                        maddubs::matmul_q40_q80,
                        maddubs::matmul_q40x8_q80,
                        maddubs::matmul_q40x8_q80_claimed,
                        maddubs::matmul_q40x8_q80_passes,
                    ),
                };
                // several tokens: the 512-bit kernel (16 rows per register) is about 2x faster;
                // one token is memory-bound and the 256-bit one streams better there
                let q40x8_batch: PackedQ40Q80 = match path {
                    KernelPath::Avx512Vnni => super::avx512::matmul_q40x8_q80_zmm,
                    _ => q40x8,
                };
                Some(Kernels {
                    path,
                    quantize_q80: avx2::quantize_q80,
                    matmul_q40_q80: q40,
                    matmul_q80_q80: avx2::matmul_q80_q80,
                    matmul_q40x8_q80: q40x8,
                    matmul_q40x8_q80_batch: q40x8_batch,
                    matmul_q40x8_q80_claimed: Some(claimed),
                    matmul_q40x8_q80_passes: Some(passes),
                    matmul_q40_f32: super::avx2_vnni::matmul_q40_f32,
                    matmul_f32: avx2::matmul_f32,
                    matmul_f16: avx2::matmul_f16,
                    matmul_bf16: avx2::matmul_bf16,
                    dot_f32: avx2::dot_f32,
                    axpy: avx2::axpy,
                    attn_scores: avx2::attn_scores,
                    attn_values: avx2::attn_values,
                    softmax: avx2::softmax,
                    silu_mul: avx2::silu_mul,
                })
            }
            #[cfg(target_arch = "aarch64")]
            KernelPath::Neon | KernelPath::NeonDotprod => {
                use super::neon;
                let q40: unsafe fn(&[BlockQ40], &[BlockQ80], &mut [f32], usize) = match path {
                    KernelPath::NeonDotprod => neon::dotprod::matmul_q40_q80,
                    _ => neon::plain::matmul_q40_q80,
                };
                let q80: unsafe fn(&[BlockQ80], &[BlockQ80], &mut [f32], usize) = match path {
                    KernelPath::NeonDotprod => neon::dotprod::matmul_q80_q80,
                    _ => neon::plain::matmul_q80_q80,
                };
                let q40x8: unsafe fn(&[u8], usize, &[BlockQ80], &mut [f32], usize) = match path {
                    KernelPath::NeonDotprod => neon::dotprod::matmul_q40x8_q80,
                    _ => neon::plain::matmul_q40x8_q80,
                };
                let claimed: PackedQ40Q80Claimed = match path {
                    KernelPath::NeonDotprod => neon::dotprod::matmul_q40x8_q80_claimed,
                    _ => neon::plain::matmul_q40x8_q80_claimed,
                };
                Some(Kernels {
                    path,
                    quantize_q80: neon::quantize_q80,
                    matmul_q40_q80: q40,
                    matmul_q80_q80: q80,
                    matmul_q40x8_q80: q40x8,
                    matmul_q40x8_q80_batch: q40x8,
                    matmul_q40x8_q80_claimed: Some(claimed),
                    matmul_q40x8_q80_passes: None,
                    matmul_q40_f32: scalar::matmul_q40_f32,
                    matmul_f32: neon::matmul_f32,
                    matmul_f16: neon::matmul_f16,
                    matmul_bf16: neon::matmul_bf16,
                    dot_f32: neon::dot_f32,
                    axpy: neon::axpy,
                    attn_scores: neon::attn_scores,
                    attn_values: neon::attn_values,
                    softmax: neon::softmax,
                    silu_mul: neon::silu_mul,
                })
            }
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The kernels for a `DLLAMA_KERNELS` value: `None` or "auto" is the best path of this
    /// CPU; "scalar", "avx2" and "neon" force that path (falling back to scalar where the CPU
    /// lacks it). Any other value is an error naming the accepted ones.
    pub fn choose(forced: Option<&str>) -> Result<Kernels> {
        let wanted: &[KernelPath] = match forced.map(str::trim) {
            None | Some("") | Some("auto") => &KernelPath::ALL,
            Some("scalar") => &[KernelPath::Scalar],
            Some("avx2") => &[KernelPath::Avx2, KernelPath::Scalar],
            Some("neon") => &[KernelPath::Neon, KernelPath::Scalar],
            Some(other) => {
                return Err(Error::invalid(format!(
                    "DLLAMA_KERNELS={other:?} is not one of auto, scalar, avx2, neon"
                )))
            }
        };
        Ok(wanted
            .iter()
            .find_map(|&p| Kernels::for_path(p))
            .unwrap_or_else(Kernels::scalar))
    }

    fn scalar() -> Kernels {
        Kernels {
            path: KernelPath::Scalar,
            quantize_q80: scalar::quantize_q80,
            matmul_q40_q80: scalar::matmul_q40_q80,
            matmul_q80_q80: scalar::matmul_q80_q80,
            matmul_q40x8_q80: scalar::matmul_q40x8_q80,
            matmul_q40x8_q80_batch: scalar::matmul_q40x8_q80,
            matmul_q40x8_q80_claimed: None,
            matmul_q40x8_q80_passes: None,
            matmul_q40_f32: scalar::matmul_q40_f32,
            matmul_f32: scalar::matmul_f32,
            matmul_f16: scalar::matmul_f16,
            matmul_bf16: scalar::matmul_bf16,
            dot_f32: scalar::dot_f32,
            axpy: scalar::axpy,
            attn_scores: scalar::attn_scores,
            attn_values: scalar::attn_values,
            softmax: scalar::softmax,
            silu_mul: scalar::silu_mul,
        }
    }

    /// The kernels chosen for this process (decided on first use).
    pub fn get() -> &'static Kernels {
        static CHOSEN: OnceLock<Kernels> = OnceLock::new();
        CHOSEN.get_or_init(|| {
            let forced = std::env::var("DLLAMA_KERNELS").ok();
            Kernels::choose(forced.as_deref()).unwrap_or_else(|e| {
                // read once, deep inside the first matmul: warn and run the best path
                eprintln!("dllama: {e}; using the best kernels of this CPU");
                Kernels::choose(None).unwrap_or_else(|_| Kernels::scalar())
            })
        })
    }

    // Checked shapes are the caller's (`kernels::matmul`) business; the kernels assert them too.

    pub fn quantize_q80(&self, x: &[f32], out: &mut [BlockQ80]) {
        // SAFETY: see the impl comment.
        unsafe { (self.quantize_q80)(x, out) }
    }
    pub fn matmul_q40_q80(&self, w: &[BlockQ40], x: &[BlockQ80], out: &mut [f32], n_tokens: usize) {
        unsafe { (self.matmul_q40_q80)(w, x, out, n_tokens) }
    }
    /// Packed Q40 (`PackedQ40::groups` of these rows, `bpr` blocks per row) × Q80.
    pub fn matmul_q40x8_q80(
        &self,
        cells: &[u8],
        bpr: usize,
        x: &[BlockQ80],
        out: &mut [f32],
        n_tokens: usize,
    ) {
        if n_tokens == 1 {
            unsafe { (self.matmul_q40x8_q80)(cells, bpr, x, out, n_tokens) }
        } else {
            unsafe { (self.matmul_q40x8_q80_batch)(cells, bpr, x, out, n_tokens) }
        }
    }
    /// Packed Q40 (`cells`: all the groups of a matrix of `n_rows` rows, `bpr` blocks per
    /// row) × one Q80 token, over the row ranges `claim` hands out until it returns `None`
    /// (each starting on a multiple of 8): out[r] for the rows r of those ranges.
    ///
    /// # Safety
    /// `out` holds `n_rows` values, and no other thread touches the rows `claim` gives this
    /// one while the call runs.
    pub unsafe fn matmul_q40x8_q80_claimed(
        &self,
        cells: &[u8],
        bpr: usize,
        x: &[BlockQ80],
        out: *mut f32,
        n_rows: usize,
        claim: &mut dyn FnMut() -> Option<Range<usize>>,
    ) {
        if let Some(f) = self.matmul_q40x8_q80_claimed {
            return f(cells, bpr, x, out, n_rows, claim);
        }
        for_each_claimed(cells, bpr, n_rows, claim, |cells, r| {
            let out = std::slice::from_raw_parts_mut(out.add(r.start), r.len());
            (self.matmul_q40x8_q80)(cells, bpr, x, out, 1);
        });
    }
    /// Whether this path multiplies one token by the items of pass plans
    /// (`matmul_q40x8_q80_passes`); else the engine hands out row ranges.
    pub fn has_passes(&self) -> bool {
        self.matmul_q40x8_q80_passes.is_some()
    }
    /// Packed Q40 (`cells`: all the groups of a matrix of `n_rows` rows, `bpr` blocks per
    /// row) × one Q80 token, over the items of the pass plans `claim` hands out until it
    /// returns `None`: out[r] for the rows r of those items' groups. On a path without
    /// such a kernel (`has_passes`), the items' groups as row ranges, one by one.
    ///
    /// # Safety
    /// `out` holds `n_rows` values, and no other thread touches the rows of the items
    /// `claim` gives this one while the call runs.
    pub unsafe fn matmul_q40x8_q80_passes(
        &self,
        cells: &[u8],
        bpr: usize,
        x: &[BlockQ80],
        out: *mut f32,
        n_rows: usize,
        claim: &mut dyn FnMut() -> Option<(PassPlan, Range<usize>)>,
    ) {
        if let Some(f) = self.matmul_q40x8_q80_passes {
            return f(cells, bpr, x, out, n_rows, claim);
        }
        // the claimed items' groups as row ranges, one by one, through one call (the input
        // prepared once)
        let (mut groups, mut next) = (Vec::new(), 0);
        let mut rows = || {
            while next == groups.len() {
                let (plan, items) = claim()?;
                groups.clear();
                next = 0;
                plan.groups_of(items, &mut groups);
            }
            next += 1;
            let g = groups[next - 1];
            Some(g * GROUP..((g + 1) * GROUP).min(n_rows))
        };
        self.matmul_q40x8_q80_claimed(cells, bpr, x, out, n_rows, &mut rows);
    }
    /// Q40 weights × f32 input (the f32-buffer mode).
    pub fn matmul_q40_f32(&self, w: &[BlockQ40], x: &[f32], out: &mut [f32], n_tokens: usize) {
        unsafe { (self.matmul_q40_f32)(w, x, out, n_tokens) }
    }
    pub fn matmul_q80_q80(&self, w: &[BlockQ80], x: &[BlockQ80], out: &mut [f32], n_tokens: usize) {
        unsafe { (self.matmul_q80_q80)(w, x, out, n_tokens) }
    }
    pub fn matmul_f32(&self, w: &[f32], x: &[f32], out: &mut [f32], n_tokens: usize) {
        unsafe { (self.matmul_f32)(w, x, out, n_tokens) }
    }
    pub fn matmul_f16(&self, w: &[u16], x: &[f32], out: &mut [f32], n_tokens: usize) {
        unsafe { (self.matmul_f16)(w, x, out, n_tokens) }
    }
    /// bf16 weights (bits) × f32 input: bit for bit `matmul_f32` of the same values.
    pub fn matmul_bf16(&self, w: &[u16], x: &[f32], out: &mut [f32], n_tokens: usize) {
        unsafe { (self.matmul_bf16)(w, x, out, n_tokens) }
    }
    /// sum a[i] * b[i] over the shorter length.
    pub fn dot_f32(&self, a: &[f32], b: &[f32]) -> f32 {
        unsafe { (self.dot_f32)(a, b) }
    }
    /// y += a * x over the shorter length.
    pub fn axpy(&self, a: f32, x: &[f32], y: &mut [f32]) {
        unsafe { (self.axpy)(a, x, y) }
    }
    /// scores[p] = (q · k[p·stride ..][..q.len()]) · scale for every p (panics when k is short).
    pub fn attn_scores(&self, q: &[f32], k: &[f32], stride: usize, scale: f32, scores: &mut [f32]) {
        unsafe { (self.attn_scores)(q, k, stride, scale, scores) }
    }
    /// out += sum_p att[p] · v[p·stride ..][..out.len()] (panics when v is short).
    pub fn attn_values(&self, att: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
        unsafe { (self.attn_values)(att, v, stride, out) }
    }
    /// x = exp(x - max x) / sum, in place (empty: unchanged).
    pub fn softmax(&self, x: &mut [f32]) {
        unsafe { (self.softmax)(x) }
    }
    /// gate = silu(gate) · up, in place, over the shorter length.
    pub fn silu_mul(&self, gate: &mut [f32], up: &[f32]) {
        unsafe { (self.silu_mul)(gate, up) }
    }
}

/// The name of the active kernel path (the engine prints it).
pub fn active_path() -> KernelPath {
    Kernels::get().path
}
