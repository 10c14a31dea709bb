//! Importance matrices in llama.cpp's GGUF format (what `llama-imatrix` writes and
//! `llama-quantize --imatrix` reads): `general.type = "imatrix"`, and per weight `NAME` the tensors
//! `NAME.in_sum2` (f32, one sum of squared inputs per input column) and `NAME.counts` (f32, the
//! number of tokens summed). A quantizer weighs column `j` by `in_sum2[j] / counts`.

use std::collections::HashMap;
use std::path::Path;

use crate::format::{Gguf, TensorData, Value};
use crate::quant::dequantize;
use crate::types::GgmlType;
use crate::{GgufError, Result};

/// One weight's statistics.
pub struct Entry {
    /// The weight's GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Σ x² per input column.
    pub sums: Vec<f64>,
    /// Tokens summed.
    pub count: u64,
}

/// Writes an importance matrix. `datasets` names what it was computed on.
pub fn write(path: &Path, entries: &[Entry], datasets: &[String], chunks: u32) -> Result<()> {
    let md = vec![
        ("general.type".to_string(), Value::from("imatrix")),
        ("imatrix.datasets".to_string(), Value::Array(datasets.iter().map(|d| Value::from(d.as_str())).collect())),
        ("imatrix.chunk_count".to_string(), Value::U32(chunks)),
    ];
    let mut tensors = Vec::with_capacity(2 * entries.len());
    for e in entries {
        let sums: Vec<u8> = e.sums.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect();
        tensors.push(TensorData {
            name: format!("{}.in_sum2", e.name),
            shape: vec![1, e.sums.len()],
            ty: GgmlType::F32,
            data: sums,
        });
        tensors.push(TensorData {
            name: format!("{}.counts", e.name),
            shape: vec![1, 1],
            ty: GgmlType::F32,
            data: (e.count as f32).to_le_bytes().to_vec(),
        });
    }
    crate::convert::write_file(path, &md, &tensors)
}

/// Reads an importance matrix: per weight name, the quantization weights `in_sum2 / counts`
/// (1 for a weight that saw no tokens, as llama-quantize does).
pub fn read(path: &Path) -> Result<HashMap<String, Vec<f32>>> {
    let g = Gguf::open(path)?;
    if g.get("general.type").and_then(|v| v.as_str()) != Some("imatrix") {
        return Err(GgufError::Invalid(format!("{} is not an importance matrix (general.type)", path.display())));
    }
    let mut f = std::io::BufReader::new(
        std::fs::File::open(path).map_err(|e| GgufError::Io(format!("{}: {e}", path.display())))?,
    );
    let mut out = HashMap::new();
    for t in &g.tensors {
        let Some(name) = t.name.strip_suffix(".in_sum2") else { continue };
        let counts = g
            .tensor(&format!("{name}.counts"))
            .ok_or_else(|| GgufError::Invalid(format!("{}: `{name}` has sums but no counts", path.display())))?;
        if t.ty != GgmlType::F32 || counts.ty != GgmlType::F32 || counts.elements() != 1 {
            return Err(GgufError::Invalid(format!(
                "{}: `{name}` is not one f32 row of sums with one count (forge reads dense imatrices)",
                path.display()
            )));
        }
        let sums = dequantize(t.ty, &g.tensor_bytes(&mut f, t)?, t.elements())?;
        let count = dequantize(counts.ty, &g.tensor_bytes(&mut f, counts)?, 1)?[0];
        let weights = if count > 0.0 { sums.iter().map(|s| s / count).collect() } else { vec![1.0; sums.len()] };
        out.insert(name.to_string(), weights);
    }
    Ok(out)
}
