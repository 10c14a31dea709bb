//! Quantization levels: what `quantize "q4_k_m"` names, shared by the manifest (which parses
//! and validates level names) and the GGUF writer (which knows what each level stores), so that
//! neither depends on the other.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Quantization levels a GGUF artifact can be written at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantLevel {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4KM,
    Q5KM,
    Q6K,
}

impl QuantLevel {
    pub const ALL: [QuantLevel; 11] = [
        QuantLevel::F32,
        QuantLevel::F16,
        QuantLevel::Bf16,
        QuantLevel::Q8_0,
        QuantLevel::Q4_0,
        QuantLevel::Q4_1,
        QuantLevel::Q5_0,
        QuantLevel::Q5_1,
        QuantLevel::Q4KM,
        QuantLevel::Q5KM,
        QuantLevel::Q6K,
    ];

    /// Whether an importance matrix can change this level's blocks (llama.cpp ignores it for
    /// float types and for `q8_0`).
    pub fn uses_imatrix(self) -> bool {
        !matches!(self, QuantLevel::F32 | QuantLevel::F16 | QuantLevel::Bf16 | QuantLevel::Q8_0)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QuantLevel::F32 => "f32",
            QuantLevel::F16 => "f16",
            QuantLevel::Bf16 => "bf16",
            QuantLevel::Q8_0 => "q8_0",
            QuantLevel::Q4_0 => "q4_0",
            QuantLevel::Q4_1 => "q4_1",
            QuantLevel::Q5_0 => "q5_0",
            QuantLevel::Q5_1 => "q5_1",
            QuantLevel::Q4KM => "q4_k_m",
            QuantLevel::Q5KM => "q5_k_m",
            QuantLevel::Q6K => "q6_k",
        }
    }

    /// Parses a level name, ignoring case (`Q4_K_M` and `q4_k_m` are the same level).
    pub fn parse(s: &str) -> Option<QuantLevel> {
        let lower = s.to_ascii_lowercase();
        QuantLevel::ALL.into_iter().find(|l| l.as_str() == lower)
    }
}

impl fmt::Display for QuantLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
