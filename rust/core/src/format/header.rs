//! The `.m` model header: int32 magic `0x0A00ABCD`, int32 header size (= 8 + 8 × pairs, the
//! offset of the first tensor), then (int32 key, int32 value) pairs. Keys and defaults follow
//! distributed-llama's `src/llm.cpp` (`loadLlmHeader`) and `converter/writer.py`.

use super::{FloatType, Layout, Reader, TensorSpec};
use crate::error::{Error, Result};
use crate::kernels::QK;

/// First int32 of a `.m` file.
pub const MODEL_MAGIC: u32 = 0x0A00_ABCD;
/// Magics of distributed-llama's first model format (a fixed struct), not supported.
const OLD_MAGICS: [u32; 2] = [0x00AB_CD00, 0x00AB_CD01];
/// Largest header accepted: far more than the 22 keys defined so far.
pub const MAX_HEADER_SIZE: usize = 8 + 8 * 128;
/// Most experts a MoE layer may have (Qwen3-30B-A3B has 128).
const MAX_EXPERTS: usize = 4096;
/// Upper bounds of the header's dimensions (see [`ModelHeader::validate`]).
pub const MAX_DIM: usize = 1 << 17;
pub const MAX_HIDDEN_DIM: usize = 1 << 20;
pub const MAX_N_LAYERS: usize = 1 << 12;
pub const MAX_N_HEADS: usize = 1 << 12;
pub const MAX_HEAD_DIM: usize = 1 << 12;
pub const MAX_VOCAB_SIZE: usize = super::tokenizer::MAX_VOCAB_SIZE;
pub const MAX_SEQ_LEN: usize = 1 << 24;
/// Largest file the header may describe (256 TiB): anything above is a corrupt header.
const MAX_FILE_SIZE: u64 = 1 << 48;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchType {
    /// Llama, Mistral (`0xABCD00`).
    Llama,
    /// Qwen3 (`0xABCD01`): Llama plus a per-head RMSNorm on q and k, NeoX (falcon) RoPE.
    Qwen3,
    /// Qwen3 MoE (`0xABCD02`): Qwen3 attention, a routed mixture of SwiGLU experts as FFN.
    Qwen3Moe,
}

impl ArchType {
    pub fn code(self) -> u32 {
        match self {
            ArchType::Llama => 0xABCD00,
            ArchType::Qwen3 => 0xABCD01,
            ArchType::Qwen3Moe => 0xABCD02,
        }
    }
    pub fn from_code(code: i64) -> Option<ArchType> {
        match code {
            0xABCD00 => Some(ArchType::Llama),
            0xABCD01 => Some(ArchType::Qwen3),
            0xABCD02 => Some(ArchType::Qwen3Moe),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ArchType::Llama => "llama",
            ArchType::Qwen3 => "qwen3",
            ArchType::Qwen3Moe => "qwen3_moe",
        }
    }
    /// Qwen3 and Qwen3-MoE normalise each head of q and k before RoPE.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, ArchType::Qwen3 | ArchType::Qwen3Moe)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HiddenAct {
    Gelu = 0,
    Silu = 1,
}

impl HiddenAct {
    pub fn code(self) -> u32 {
        self as u32
    }
    pub fn from_code(code: i64) -> Option<HiddenAct> {
        match code {
            0 => Some(HiddenAct::Gelu),
            1 => Some(HiddenAct::Silu),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeType {
    /// Rotates interleaved pairs (2i, 2i+1): Meta's order.
    Llama = 0,
    /// Rotates halves (i, i + head_dim/2): GPT-NeoX / Falcon order.
    Falcon = 1,
    /// Llama order with Llama 3.1 frequency scaling (`rope_scaling_*`).
    Llama31 = 2,
}

impl RopeType {
    pub fn code(self) -> u32 {
        self as u32
    }
    pub fn from_code(code: i64) -> Option<RopeType> {
        match code {
            0 => Some(RopeType::Llama),
            1 => Some(RopeType::Falcon),
            2 => Some(RopeType::Llama31),
            _ => None,
        }
    }
}

/// Header keys, as in distributed-llama's `LlmHeaderKey`.
mod key {
    pub const VERSION: i32 = 0;
    pub const ARCH_TYPE: i32 = 1;
    pub const DIM: i32 = 2;
    pub const HIDDEN_DIM: i32 = 3;
    pub const N_LAYERS: i32 = 4;
    pub const N_HEADS: i32 = 5;
    pub const N_KV_HEADS: i32 = 6;
    pub const N_EXPERTS: i32 = 7;
    pub const N_ACTIVE_EXPERTS: i32 = 8;
    pub const VOCAB_SIZE: i32 = 9;
    pub const MAX_SEQ_LEN: i32 = 10;
    pub const HIDDEN_ACT: i32 = 11;
    pub const ROPE_THETA: i32 = 12;
    pub const WEIGHTS_FLOAT_TYPE: i32 = 13;
    pub const ROPE_SCALING_FACTOR: i32 = 14;
    pub const ROPE_SCALING_LOW_FREQ_FACTOR: i32 = 15;
    pub const ROPE_SCALING_HIGH_FREQ_FACTOR: i32 = 16;
    pub const ROPE_SCALING_ORIG_MAX_SEQ_LEN: i32 = 17;
    pub const ROPE_TYPE: i32 = 18;
    pub const HEAD_DIM: i32 = 19;
    pub const NORM_EPSILON: i32 = 20;
    pub const MOE_HIDDEN_DIM: i32 = 21;
    /// dllama's extension (not in distributed-llama, which always renormalises): 0 when the
    /// top-k router weights are used as the softmax gives them. Written only when 0, so a
    /// file distributed-llama cannot compute correctly is one it refuses to read.
    pub const NORM_TOPK_PROB: i32 = 22;
}

pub use super::header_fields::{FieldValue, FIELD_NAMES};

/// Every key of the `.m` header, typed. Enumerations keep their codes via `code()`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelHeader {
    pub version: u32,
    pub arch_type: ArchType,
    pub dim: usize,
    pub hidden_dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub n_experts: usize,
    pub n_active_experts: usize,
    pub vocab_size: usize,
    pub max_seq_len: usize,
    pub hidden_act: HiddenAct,
    /// Stored as an int32 in the file.
    pub rope_theta: u32,
    pub weights_float_type: FloatType,
    /// Llama 3.1 RoPE scaling; int32 in the file (distributed-llama's converter writes
    /// `int(factor)`), used only when `rope_type` is [`RopeType::Llama31`].
    pub rope_scaling_factor: u32,
    pub rope_scaling_low_freq_factor: u32,
    /// Key 16, named `rope_scaling_high_freq_factory` in distributed-llama.
    pub rope_scaling_high_freq_factor: u32,
    pub rope_scaling_orig_max_seq_len: usize,
    pub rope_type: RopeType,
    /// Resolved: `dim / n_heads` when the file does not give it.
    pub head_dim: usize,
    /// 1e-5 or 1e-6 (stored as 5 or 6).
    pub norm_epsilon: f32,
    pub moe_hidden_dim: usize,
    /// MoE: renormalise the top-k router probabilities to sum to 1 (distributed-llama always
    /// does; key 22, absent = true).
    pub norm_topk_prob: bool,
    /// Size of the header in the file this was parsed from (its key set may differ from the one
    /// [`ModelHeader::to_bytes`] writes); `None` for a header made in code.
    pub file_header_size: Option<usize>,
}

impl Default for ModelHeader {
    /// distributed-llama's defaults for absent keys; the dimensions are 0 (invalid) and the
    /// weights type F32.
    fn default() -> Self {
        ModelHeader {
            version: 0,
            arch_type: ArchType::Llama,
            dim: 0,
            hidden_dim: 0,
            n_layers: 0,
            n_heads: 0,
            n_kv_heads: 0,
            n_experts: 0,
            n_active_experts: 0,
            vocab_size: 0,
            max_seq_len: 0,
            hidden_act: HiddenAct::Silu,
            rope_theta: 10000,
            weights_float_type: FloatType::F32,
            rope_scaling_factor: 1,
            rope_scaling_low_freq_factor: 0,
            rope_scaling_high_freq_factor: 0,
            rope_scaling_orig_max_seq_len: 0,
            rope_type: RopeType::Llama,
            head_dim: 0,
            norm_epsilon: 1e-5,
            moe_hidden_dim: 0,
            norm_topk_prob: true,
            file_header_size: None,
        }
    }
}

fn norm_epsilon_code(eps: f32) -> Option<i32> {
    if eps == 1e-5 {
        Some(5)
    } else if eps == 1e-6 {
        Some(6)
    } else {
        None
    }
}

impl ModelHeader {
    // -----------------------------------------------------------------------------------------
    // Reading
    // -----------------------------------------------------------------------------------------

    /// Parses and validates the header at the start of `bytes` (at least the header; the whole
    /// file is fine).
    pub fn parse(bytes: &[u8]) -> Result<ModelHeader> {
        Self::parse_named(bytes, "model header")
    }

    /// As [`parse`](Self::parse); `what` names the source in messages ("model file /a/b.m").
    pub fn parse_named(bytes: &[u8], what: &str) -> Result<ModelHeader> {
        let mut r = Reader::new(bytes, what);
        if bytes.len() < 8 {
            return Err(Error::format(format!(
                "{what} is {} bytes: too short for a .m header (magic and header size take 8)",
                bytes.len()
            )));
        }
        let magic = r.i32("magic")? as u32;
        if OLD_MAGICS.contains(&magic) {
            return Err(Error::format(format!(
                "{what} uses distributed-llama's old model format (magic {magic:#x}), which is \
                 not supported: convert the model again"
            )));
        }
        if magic != MODEL_MAGIC {
            return Err(Error::format(format!(
                "{what} is not a distributed-llama .m model: magic {magic:#010x}, expected {MODEL_MAGIC:#010x}"
            )));
        }
        let size = r.i32("header size")?;
        if size < 8 || (size - 8) % 8 != 0 || size as usize > MAX_HEADER_SIZE {
            return Err(Error::format(format!(
                "{what} has an absurd header size {size}: expected 8 + 8 × (number of key/value \
                 pairs), at most {MAX_HEADER_SIZE}"
            )));
        }
        let size = size as usize;
        let n_pairs = (size - 8) / 8;
        let mut h = ModelHeader {
            file_header_size: Some(size),
            ..ModelHeader::default()
        };
        let mut seen = [false; FIELD_NAMES.len()];
        let mut head_dim_given = false;
        let mut weights_given = false;
        for i in 0..n_pairs {
            let k = r.i32("header key")?;
            let v = r.i32("header value")?;
            let bad = |msg: String| Error::format(format!("{what}: {msg}"));
            if !(0..FIELD_NAMES.len() as i32).contains(&k) {
                return Err(bad(format!(
                    "unknown header key {k} (value {v}) in pair {i}; known keys are 0..={}",
                    FIELD_NAMES.len() - 1
                )));
            }
            let name = FIELD_NAMES[k as usize];
            if std::mem::replace(&mut seen[k as usize], true) {
                return Err(bad(format!("header key {k} ({name}) appears twice")));
            }
            let count = |v: i32| -> Result<usize> {
                usize::try_from(v).map_err(|_| bad(format!("{name} = {v} is negative")))
            };
            match k {
                key::VERSION => h.version = count(v)? as u32,
                key::ARCH_TYPE => {
                    h.arch_type = ArchType::from_code(v as i64).ok_or_else(|| {
                        bad(format!(
                            "unknown arch_type {v:#x} (known: 0xabcd00 llama, 0xabcd01 qwen3, \
                             0xabcd02 qwen3_moe)"
                        ))
                    })?
                }
                key::DIM => h.dim = count(v)?,
                key::HIDDEN_DIM => h.hidden_dim = count(v)?,
                key::N_LAYERS => h.n_layers = count(v)?,
                key::N_HEADS => h.n_heads = count(v)?,
                key::N_KV_HEADS => h.n_kv_heads = count(v)?,
                key::N_EXPERTS => h.n_experts = count(v)?,
                key::N_ACTIVE_EXPERTS => h.n_active_experts = count(v)?,
                key::VOCAB_SIZE => h.vocab_size = count(v)?,
                key::MAX_SEQ_LEN => h.max_seq_len = count(v)?,
                key::HIDDEN_ACT => {
                    h.hidden_act = HiddenAct::from_code(v as i64).ok_or_else(|| {
                        bad(format!("unknown hidden_act {v} (known: 0 gelu, 1 silu)"))
                    })?
                }
                key::ROPE_THETA => h.rope_theta = count(v)? as u32,
                key::WEIGHTS_FLOAT_TYPE => {
                    weights_given = true;
                    h.weights_float_type = FloatType::from_code(v as i64).ok_or_else(|| {
                        bad(format!(
                            "unknown weights_float_type {v} (known: 0 f32, 1 f16, 2 q40, 3 q80)"
                        ))
                    })?
                }
                key::ROPE_SCALING_FACTOR => h.rope_scaling_factor = count(v)? as u32,
                key::ROPE_SCALING_LOW_FREQ_FACTOR => {
                    h.rope_scaling_low_freq_factor = count(v)? as u32
                }
                key::ROPE_SCALING_HIGH_FREQ_FACTOR => {
                    h.rope_scaling_high_freq_factor = count(v)? as u32
                }
                key::ROPE_SCALING_ORIG_MAX_SEQ_LEN => h.rope_scaling_orig_max_seq_len = count(v)?,
                key::ROPE_TYPE => {
                    h.rope_type = RopeType::from_code(v as i64).ok_or_else(|| {
                        bad(format!(
                            "unknown rope_type {v} (known: 0 llama, 1 falcon, 2 llama3.1)"
                        ))
                    })?
                }
                key::HEAD_DIM => {
                    head_dim_given = true;
                    h.head_dim = count(v)?
                }
                key::NORM_EPSILON => {
                    h.norm_epsilon = match v {
                        5 => 1e-5,
                        6 => 1e-6,
                        _ => {
                            return Err(bad(format!(
                                "unknown norm_epsilon code {v} (known: 5 = 1e-5, 6 = 1e-6)"
                            )))
                        }
                    }
                }
                key::MOE_HIDDEN_DIM => h.moe_hidden_dim = count(v)?,
                key::NORM_TOPK_PROB => {
                    h.norm_topk_prob = match v {
                        0 => false,
                        1 => true,
                        _ => return Err(bad(format!("norm_topk_prob = {v} (expected 0 or 1)"))),
                    }
                }
                _ => unreachable!("key range checked above"),
            }
        }
        if !weights_given {
            return Err(Error::format(format!(
                "{what} does not give weights_float_type (key 13)"
            )));
        }
        if !head_dim_given {
            h.resolve_head_dim()
                .map_err(|m| Error::format(format!("{what}: {m}")))?;
        }
        // as distributed-llama's loadLlmHeader: Qwen3 rotates halves whatever the key says
        if h.arch_type.has_qk_norm() {
            h.rope_type = RopeType::Falcon;
        }
        h.resolve_rope_scaling();
        h.check()
            .map_err(|m| Error::format(format!("{what}: {m}")))?;
        Ok(h)
    }

    /// Sets `head_dim = dim / n_heads` (what distributed-llama does when the key is absent).
    pub(crate) fn resolve_head_dim(&mut self) -> std::result::Result<(), String> {
        if self.n_heads == 0 || self.dim == 0 {
            return Ok(()); // check() reports the zero dimension
        }
        if !self.dim.is_multiple_of(self.n_heads) {
            return Err(format!(
                "dim {} is not divisible by n_heads {} (and no head_dim is given)",
                self.dim, self.n_heads
            ));
        }
        self.head_dim = self.dim / self.n_heads;
        Ok(())
    }

    /// Reads the rope scaling keys as distributed-llama does. Its RoPE scales the frequencies
    /// whenever `rope_scaling_factor != 1`, whatever `rope_type` says (Falcon aside), so a llama
    /// header with another factor is Llama 3.1 scaling. Factor 0 with llama rope is what earlier
    /// dllama converters wrote for "no scaling" (the C++ computes 0/0 there): read as 1.
    pub(crate) fn resolve_rope_scaling(&mut self) {
        if self.rope_type == RopeType::Llama {
            match self.rope_scaling_factor {
                0 => self.rope_scaling_factor = 1,
                1 => {}
                _ => self.rope_type = RopeType::Llama31,
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Validation
    // -----------------------------------------------------------------------------------------

    /// Checks that the header describes a model dllama can lay out and run.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(Error::invalid)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.version != 0 {
            return Err(format!(
                "unsupported .m version {} (expected 0)",
                self.version
            ));
        }
        for (name, v) in [
            ("dim", self.dim),
            ("hidden_dim", self.hidden_dim),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("vocab_size", self.vocab_size),
            ("max_seq_len", self.max_seq_len),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(format!("{name} is missing or zero"));
            }
            if v > i32::MAX as usize {
                return Err(format!("{name} = {v} does not fit an int32"));
            }
        }
        // Far above every published model (126 layers, head_dim 256, 128k vocabulary, dim
        // 16384, 10M context): a larger value is a corrupt or hostile header, refused before
        // anything is sized from it.
        for (name, v, max) in [
            ("dim", self.dim, MAX_DIM),
            ("hidden_dim", self.hidden_dim, MAX_HIDDEN_DIM),
            ("n_layers", self.n_layers, MAX_N_LAYERS),
            ("n_heads", self.n_heads, MAX_N_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            ("vocab_size", self.vocab_size, MAX_VOCAB_SIZE),
            ("max_seq_len", self.max_seq_len, MAX_SEQ_LEN),
        ] {
            if v > max {
                return Err(format!(
                    "{name} = {v} is beyond what dllama accepts (at most {max})"
                ));
            }
        }
        if self.n_kv_heads > self.n_heads || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!(
                "n_kv_heads {} does not divide n_heads {}",
                self.n_kv_heads, self.n_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {} is odd: RoPE rotates pairs",
                self.head_dim
            ));
        }
        if self.arch_type == ArchType::Qwen3Moe {
            let (e, k, h) = (self.n_experts, self.n_active_experts, self.moe_hidden_dim);
            if e == 0 || k == 0 || k > e || h == 0 {
                return Err(format!(
                    "qwen3_moe needs 0 < n_active_experts <= n_experts and moe_hidden_dim > 0; \
                     got n_experts {e}, n_active_experts {k}, moe_hidden_dim {h}"
                ));
            }
            if e > MAX_EXPERTS || h > i32::MAX as usize {
                return Err(format!(
                    "n_experts {e} (at most {MAX_EXPERTS}) or moe_hidden_dim {h} is absurd"
                ));
            }
        } else if self.n_experts > 0 || self.n_active_experts > 0 {
            return Err(format!(
                "arch_type {} has no experts, but n_experts = {}, n_active_experts = {} \
                 (mixture-of-experts Llama models such as Mixtral are not supported)",
                self.arch_type.name(),
                self.n_experts,
                self.n_active_experts
            ));
        }
        if self.arch_type.has_qk_norm() && self.rope_type != RopeType::Falcon {
            return Err(format!(
                "arch_type {} rotates halves: rope_type must be 1 (falcon)",
                self.arch_type.name()
            ));
        }
        if self.rope_theta == 0 {
            return Err("rope_theta is zero".into());
        }
        if self.rope_type == RopeType::Llama31 {
            let (f, lo, hi, orig) = (
                self.rope_scaling_factor,
                self.rope_scaling_low_freq_factor,
                self.rope_scaling_high_freq_factor,
                self.rope_scaling_orig_max_seq_len,
            );
            if f == 0 || lo == 0 || hi <= lo || orig == 0 {
                return Err(format!(
                    "llama3.1 RoPE scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor \
                     and orig_max_seq_len > 0; got factor {f}, low {lo}, high {hi}, orig {orig}"
                ));
            }
        }
        if norm_epsilon_code(self.norm_epsilon).is_none() {
            return Err(format!(
                "norm_epsilon {:e} cannot be stored: the format knows 1e-5 and 1e-6",
                self.norm_epsilon
            ));
        }
        let ft = self.weights_float_type;
        if ft.block_values() > 1 {
            for (name, v) in [
                ("dim", self.dim),
                ("n_heads × head_dim", self.q_dim()),
                ("hidden_dim", self.ffn_hidden_dim()),
            ] {
                if v % QK != 0 {
                    return Err(format!(
                        "{name} = {v} is not a multiple of {QK}, which {ft} weights need \
                         (blocks run along the input dimension)"
                    ));
                }
            }
        }
        if let Some(hs) = self.file_header_size {
            if hs < 8 || (hs - 8) % 8 != 0 || hs > MAX_HEADER_SIZE {
                return Err(format!("absurd header size {hs}"));
            }
        }
        // Sizes in u128 so that no product can overflow before the comparison.
        let (d, v, hd) = (
            self.dim as u128,
            self.vocab_size as u128,
            self.ffn_hidden_dim() as u128 * (self.n_experts.max(1) as u128),
        );
        let (q, kv, l) = (
            self.q_dim() as u128,
            self.kv_dim() as u128,
            self.n_layers as u128,
        );
        let router = self.n_experts as u128 * d;
        let weights = v * d * 2 + l * (2 * q * d + 2 * kv * d + 3 * hd * d + router);
        let bytes = weights * 4 + l * 2 * d * 4;
        if bytes > MAX_FILE_SIZE as u128 {
            return Err(format!(
                "the dimensions describe a model of {bytes} bytes: absurd"
            ));
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Derived sizes
    // -----------------------------------------------------------------------------------------

    /// n_heads × head_dim: rows of q, columns of wo.
    pub fn q_dim(&self) -> usize {
        self.n_heads.saturating_mul(self.head_dim)
    }

    /// n_kv_heads × head_dim: rows of k and v.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads.saturating_mul(self.head_dim)
    }

    /// Hidden units of one FFN: `moe_hidden_dim` per expert for qwen3_moe, else `hidden_dim`.
    pub fn ffn_hidden_dim(&self) -> usize {
        if self.arch_type == ArchType::Qwen3Moe {
            self.moe_hidden_dim
        } else {
            self.hidden_dim
        }
    }

    /// Bytes before the first tensor: the file's header size for a parsed header, else the size
    /// of [`to_bytes`](Self::to_bytes).
    pub fn header_size(&self) -> usize {
        self.file_header_size
            .unwrap_or_else(|| 8 + 8 * self.pairs().len())
    }

    /// Appends layer `i`'s tensors in file order, as distributed-llama's `loadLlmNetWeight`
    /// reads them: qwen3_moe layers hold the router (`moe_gate`, F32) then w1, w2, w3 of each
    /// expert in place of the FFN; qwen3 and qwen3_moe add `q_norm` and `k_norm` (head_dim
    /// each, F32) before the block norms.
    fn push_layer(&self, t: &mut Layout, i: usize) {
        let (wt, f32) = (self.weights_float_type, FloatType::F32);
        let (dim, hidden) = (self.dim, self.ffn_hidden_dim());
        let (q_dim, kv_dim, hd) = (self.q_dim(), self.kv_dim(), self.head_dim);
        t.push(format!("layers.{i}.q"), q_dim, dim, wt);
        t.push(format!("layers.{i}.k"), kv_dim, dim, wt);
        t.push(format!("layers.{i}.v"), kv_dim, dim, wt);
        t.push(format!("layers.{i}.wo"), dim, q_dim, wt);
        if self.arch_type == ArchType::Qwen3Moe {
            t.push(format!("layers.{i}.moe_gate"), self.n_experts, dim, f32);
            for e in 0..self.n_experts {
                t.push(format!("layers.{i}.experts.{e}.w1"), hidden, dim, wt);
                t.push(format!("layers.{i}.experts.{e}.w2"), dim, hidden, wt);
                t.push(format!("layers.{i}.experts.{e}.w3"), hidden, dim, wt);
            }
        } else {
            t.push(format!("layers.{i}.w1"), hidden, dim, wt);
            t.push(format!("layers.{i}.w2"), dim, hidden, wt);
            t.push(format!("layers.{i}.w3"), hidden, dim, wt);
        }
        if self.arch_type.has_qk_norm() {
            t.push(format!("layers.{i}.q_norm"), 1, hd, f32);
            t.push(format!("layers.{i}.k_norm"), 1, hd, f32);
        }
        t.push(format!("layers.{i}.attn_norm"), 1, dim, f32);
        t.push(format!("layers.{i}.ffn_norm"), 1, dim, f32);
    }

    /// Every tensor in file order, with offsets (see docs/DESIGN.md for names and shapes).
    /// Builds a list as long as the header says: check the file size against
    /// [`file_size`](Self::file_size) first.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let (wt, f32) = (self.weights_float_type, FloatType::F32);
        let (dim, vocab) = (self.dim, self.vocab_size);
        let mut t = Layout::new(self.header_size() as u64);
        t.push("embedding".into(), vocab, dim, f32);
        for i in 0..self.n_layers {
            self.push_layer(&mut t, i);
        }
        t.push("norm".into(), 1, dim, f32);
        t.push("wcls".into(), vocab, dim, wt);
        t.tensors
    }

    /// The exact size of the file: header plus every tensor (one layer is laid out and
    /// multiplied, no list of every layer is built).
    pub fn file_size(&self) -> u64 {
        let (wt, f32) = (self.weights_float_type, FloatType::F32);
        let (dim, vocab) = (self.dim, self.vocab_size);
        let mut one = Layout::new(0);
        self.push_layer(&mut one, 0);
        (self.header_size() as u64)
            .saturating_add(Layout::nbytes(vocab, dim, f32))
            .saturating_add(one.offset.saturating_mul(self.n_layers as u64))
            .saturating_add(Layout::nbytes(1, dim, f32))
            .saturating_add(Layout::nbytes(vocab, dim, wt))
    }

    // -----------------------------------------------------------------------------------------
    // Writing
    // -----------------------------------------------------------------------------------------

    /// The (key, value) pairs [`to_bytes`](Self::to_bytes) writes, in the order of
    /// distributed-llama's `convert-hf.py`. head_dim, rope_theta, rope_type and norm_epsilon
    /// are always written; the rope scaling keys when rope_type is llama3.1 or they differ from
    /// the defaults; moe_hidden_dim when non-zero.
    fn pairs(&self) -> Vec<(i32, i32)> {
        let i = |v: usize| v as i32;
        let mut p = vec![
            (key::VERSION, self.version as i32),
            (key::ARCH_TYPE, self.arch_type.code() as i32),
            (key::HIDDEN_ACT, self.hidden_act.code() as i32),
            (key::DIM, i(self.dim)),
            (key::HIDDEN_DIM, i(self.hidden_dim)),
            (key::N_LAYERS, i(self.n_layers)),
            (key::N_HEADS, i(self.n_heads)),
            (key::N_KV_HEADS, i(self.n_kv_heads)),
            (
                key::WEIGHTS_FLOAT_TYPE,
                self.weights_float_type.code() as i32,
            ),
            (key::MAX_SEQ_LEN, i(self.max_seq_len)),
            (key::VOCAB_SIZE, i(self.vocab_size)),
            (key::HEAD_DIM, i(self.head_dim)),
            (key::N_EXPERTS, i(self.n_experts)),
            (key::N_ACTIVE_EXPERTS, i(self.n_active_experts)),
            (key::ROPE_THETA, self.rope_theta as i32),
        ];
        let default = ModelHeader::default();
        if self.rope_type == RopeType::Llama31
            || self.rope_scaling_factor != default.rope_scaling_factor
            || self.rope_scaling_low_freq_factor != 0
            || self.rope_scaling_high_freq_factor != 0
            || self.rope_scaling_orig_max_seq_len != 0
        {
            p.push((key::ROPE_SCALING_FACTOR, self.rope_scaling_factor as i32));
            p.push((
                key::ROPE_SCALING_LOW_FREQ_FACTOR,
                self.rope_scaling_low_freq_factor as i32,
            ));
            p.push((
                key::ROPE_SCALING_HIGH_FREQ_FACTOR,
                self.rope_scaling_high_freq_factor as i32,
            ));
            p.push((
                key::ROPE_SCALING_ORIG_MAX_SEQ_LEN,
                i(self.rope_scaling_orig_max_seq_len),
            ));
        }
        p.push((key::ROPE_TYPE, self.rope_type.code() as i32));
        p.push((
            key::NORM_EPSILON,
            norm_epsilon_code(self.norm_epsilon).unwrap_or(5),
        ));
        if self.moe_hidden_dim != 0 {
            p.push((key::MOE_HIDDEN_DIM, i(self.moe_hidden_dim)));
        }
        if !self.norm_topk_prob {
            p.push((key::NORM_TOPK_PROB, 0));
        }
        p
    }

    /// The header bytes (magic, size, pairs). Call [`validate`](Self::validate) first on a
    /// header made in code: values that the format cannot hold are not representable here.
    pub fn to_bytes(&self) -> Vec<u8> {
        let pairs = self.pairs();
        let size = 8 + 8 * pairs.len();
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(&MODEL_MAGIC.to_le_bytes());
        out.extend_from_slice(&(size as i32).to_le_bytes());
        for (k, v) in pairs {
            out.extend_from_slice(&k.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }
}
