//! The `.m` header as named fields: the binding's `dict[str, int | float]`.

use super::header::{ArchType, HiddenAct, ModelHeader, RopeType};
use super::FloatType;
use crate::error::{Error, Result};

/// Field names, indexed by header key (the Python dict keys).
pub const FIELD_NAMES: [&str; 23] = [
    "version",
    "arch_type",
    "dim",
    "hidden_dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "n_experts",
    "n_active_experts",
    "vocab_size",
    "max_seq_len",
    "hidden_act",
    "rope_theta",
    "weights_float_type",
    "rope_scaling_factor",
    "rope_scaling_low_freq_factor",
    "rope_scaling_high_freq_factor",
    "rope_scaling_orig_max_seq_len",
    "rope_type",
    "head_dim",
    "norm_epsilon",
    "moe_hidden_dim",
    "norm_topk_prob",
];

/// A header field value as the binding sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FieldValue {
    Int(i64),
    Float(f64),
}

impl ModelHeader {
    /// Every field by name, enumerations as their codes.
    pub fn fields(&self) -> Vec<(&'static str, FieldValue)> {
        use FieldValue::{Float, Int};
        let n = |v: usize| Int(v as i64);
        vec![
            ("version", Int(self.version as i64)),
            ("arch_type", Int(self.arch_type.code() as i64)),
            ("dim", n(self.dim)),
            ("hidden_dim", n(self.hidden_dim)),
            ("n_layers", n(self.n_layers)),
            ("n_heads", n(self.n_heads)),
            ("n_kv_heads", n(self.n_kv_heads)),
            ("n_experts", n(self.n_experts)),
            ("n_active_experts", n(self.n_active_experts)),
            ("vocab_size", n(self.vocab_size)),
            ("max_seq_len", n(self.max_seq_len)),
            ("hidden_act", Int(self.hidden_act.code() as i64)),
            ("rope_theta", Int(self.rope_theta as i64)),
            (
                "weights_float_type",
                Int(self.weights_float_type.code() as i64),
            ),
            ("rope_scaling_factor", Int(self.rope_scaling_factor as i64)),
            (
                "rope_scaling_low_freq_factor",
                Int(self.rope_scaling_low_freq_factor as i64),
            ),
            (
                "rope_scaling_high_freq_factor",
                Int(self.rope_scaling_high_freq_factor as i64),
            ),
            (
                "rope_scaling_orig_max_seq_len",
                n(self.rope_scaling_orig_max_seq_len),
            ),
            ("rope_type", Int(self.rope_type.code() as i64)),
            ("head_dim", n(self.head_dim)),
            // 1e-5 / 1e-6 as the nearest f64, not the f32 widened
            (
                "norm_epsilon",
                Float(if self.norm_epsilon == 1e-6 {
                    1e-6
                } else if self.norm_epsilon == 1e-5 {
                    1e-5
                } else {
                    self.norm_epsilon as f64
                }),
            ),
            ("moe_hidden_dim", n(self.moe_hidden_dim)),
            ("norm_topk_prob", Int(self.norm_topk_prob as i64)),
        ]
    }

    /// Builds and validates a header from named fields (absent ones take distributed-llama's
    /// defaults; `head_dim` absent or 0 means `dim / n_heads`). `header_size` sets the offset of
    /// the first tensor (as read from a file); `file_size`, if given, must match. Errors are
    /// [`Error::Invalid`] naming the field.
    pub fn from_fields(fields: &[(String, FieldValue)]) -> Result<ModelHeader> {
        let mut h = ModelHeader::default();
        let mut file_size = None;
        for (name, value) in fields {
            let int = || -> Result<i64> {
                match *value {
                    FieldValue::Int(v) => Ok(v),
                    FieldValue::Float(f) if f.is_finite() && f.fract() == 0.0 => Ok(f as i64),
                    FieldValue::Float(f) => Err(Error::invalid(format!(
                        "header field {name} must be an integer, got {f}"
                    ))),
                }
            };
            let count = || -> Result<usize> {
                let v = int()?;
                if !(0..=i32::MAX as i64).contains(&v) {
                    return Err(Error::invalid(format!(
                        "header field {name} = {v} is out of range (0..=2147483647)"
                    )));
                }
                Ok(v as usize)
            };
            let code_err = |known: &str| {
                Error::invalid(format!("unknown {name} code {value:?} (known: {known})"))
            };
            match name.as_str() {
                "version" => h.version = count()? as u32,
                "arch_type" => {
                    h.arch_type = ArchType::from_code(int()?).ok_or_else(|| {
                        code_err("0xabcd00 llama, 0xabcd01 qwen3, 0xabcd02 qwen3_moe")
                    })?
                }
                "dim" => h.dim = count()?,
                "hidden_dim" => h.hidden_dim = count()?,
                "n_layers" => h.n_layers = count()?,
                "n_heads" => h.n_heads = count()?,
                "n_kv_heads" => h.n_kv_heads = count()?,
                "n_experts" => h.n_experts = count()?,
                "n_active_experts" => h.n_active_experts = count()?,
                "vocab_size" => h.vocab_size = count()?,
                "max_seq_len" => h.max_seq_len = count()?,
                "hidden_act" => {
                    h.hidden_act =
                        HiddenAct::from_code(int()?).ok_or_else(|| code_err("0 gelu, 1 silu"))?
                }
                "rope_theta" => h.rope_theta = count()? as u32,
                "weights_float_type" => {
                    h.weights_float_type = FloatType::from_code(int()?)
                        .ok_or_else(|| code_err("0 f32, 1 f16, 2 q40, 3 q80"))?
                }
                "rope_scaling_factor" => h.rope_scaling_factor = count()? as u32,
                "rope_scaling_low_freq_factor" => h.rope_scaling_low_freq_factor = count()? as u32,
                "rope_scaling_high_freq_factor" => {
                    h.rope_scaling_high_freq_factor = count()? as u32
                }
                "rope_scaling_orig_max_seq_len" => h.rope_scaling_orig_max_seq_len = count()?,
                "rope_type" => {
                    h.rope_type = RopeType::from_code(int()?)
                        .ok_or_else(|| code_err("0 llama, 1 falcon, 2 llama3.1"))?
                }
                "head_dim" => h.head_dim = count()?,
                "norm_epsilon" => {
                    h.norm_epsilon = match *value {
                        FieldValue::Float(f) => f as f32,
                        FieldValue::Int(v) => v as f32,
                    }
                }
                "moe_hidden_dim" => h.moe_hidden_dim = count()?,
                "norm_topk_prob" => {
                    h.norm_topk_prob = match int()? {
                        0 => false,
                        1 => true,
                        _ => return Err(code_err("0 false, 1 true")),
                    }
                }
                "header_size" => h.file_header_size = Some(count()?),
                "file_size" => file_size = Some(int()?),
                _ => {
                    return Err(Error::invalid(format!(
                        "unknown model header field {name:?} (known: {}, header_size, file_size)",
                        FIELD_NAMES.join(", ")
                    )))
                }
            }
        }
        if h.head_dim == 0 {
            h.resolve_head_dim().map_err(Error::invalid)?;
        }
        if h.arch_type.has_qk_norm() {
            h.rope_type = RopeType::Falcon; // as a parsed header (and distributed-llama) has it
        }
        h.resolve_rope_scaling();
        h.validate()?;
        if let Some(fs) = file_size {
            if fs as u64 != h.file_size() {
                return Err(Error::invalid(format!(
                    "file_size {fs} does not match the {} bytes these fields describe",
                    h.file_size()
                )));
            }
        }
        Ok(h)
    }
}
