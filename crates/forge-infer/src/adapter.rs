//! LoRA adapters applied at run time, so that many NPCs trained on one base share its weights in
//! memory: each request decodes the base with its NPC's adapter — `y = W·x + (α/r)·B·(A·x)` for
//! every adapted projection, as llama.cpp applies an adapter GGUF
//! (`llama_adapter_lora_init`). The adapter is the `gguf-adapter` artifact's `adapter.gguf`:
//! `general.type = "adapter"`, `adapter.lora.alpha`, and per adapted weight `N` the pair
//! `N.lora_a` (`[r, in]`) and `N.lora_b` (`[out, r]`).

use std::io::BufReader;
use std::path::Path;

use crate::kernels::dot_f32;
use crate::model::QModel;
use crate::{InferError, Result};

/// The projections of a layer an adapter may change, in the order of [`PROJECTIONS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

/// GGUF names of the projections.
const PROJECTIONS: [(&str, Proj); 7] = [
    ("attn_q", Proj::Q),
    ("attn_k", Proj::K),
    ("attn_v", Proj::V),
    ("attn_output", Proj::O),
    ("ffn_gate", Proj::Gate),
    ("ffn_up", Proj::Up),
    ("ffn_down", Proj::Down),
];

/// One adapted projection: `A` `[r][k]`, `B` `[n][r]`, and `α/r`.
pub(crate) struct Lora {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    k: usize,
    n: usize,
    scale: f32,
}

impl Lora {
    /// `y[i] += scale · B·(A·x[i])` for the `m` rows of `x` (`k` each) and of `y` (`n` each).
    pub(crate) fn apply(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let mut t = vec![0f32; self.r];
        for i in 0..m {
            let xi = &x[i * self.k..(i + 1) * self.k];
            for (j, t) in t.iter_mut().enumerate() {
                *t = dot_f32(&self.a[j * self.k..(j + 1) * self.k], xi);
            }
            let yi = &mut y[i * self.n..(i + 1) * self.n];
            for (o, y) in yi.iter_mut().enumerate() {
                *y += self.scale * dot_f32(&self.b[o * self.r..(o + 1) * self.r], &t);
            }
        }
    }
}

/// A LoRA adapter for one base model.
pub struct Adapter {
    /// Per layer, per projection.
    layers: Vec<[Option<Lora>; 7]>,
    bytes: usize,
    /// `general.name`, if the file has one.
    pub name: Option<String>,
}

impl Adapter {
    /// Reads an adapter GGUF for `base`, checking that it is a LoRA adapter for the base's
    /// architecture and that every pair fits the weight it adapts.
    pub fn load(path: &Path, base: &QModel) -> Result<Adapter> {
        let p = path.display();
        let file = forge_gguf::format::open_file(path)?;
        let mut r = BufReader::with_capacity(1 << 16, file);
        let g = forge_gguf::format::read(&mut r).map_err(|e| e.in_file(path))?;
        let text = |k: &str| g.get(k).and_then(|v| v.as_str()).map(str::to_string);
        if text("general.type").as_deref() != Some("adapter") || text("adapter.type").as_deref() != Some("lora") {
            return Err(InferError::Model(format!("{p} is not a LoRA adapter (general.type, adapter.type)")));
        }
        if text("general.architecture").as_deref() != Some(base.architecture()) {
            return Err(InferError::Model(format!(
                "{p} adapts a {} model, not {}",
                text("general.architecture").unwrap_or_else(|| "different".into()),
                base.architecture()
            )));
        }
        let alpha = g
            .get("adapter.lora.alpha")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| InferError::Model(format!("{p} has no adapter.lora.alpha")))? as f32;
        let mut layers: Vec<[Option<Lora>; 7]> = (0..base.blocks.len()).map(|_| Default::default()).collect();
        let mut bytes = 0;
        let mut pairs = 0;
        for t in &g.tensors {
            let Some(stem) = t.name.strip_suffix(".lora_a") else {
                if t.name.ends_with(".lora_b") {
                    continue;
                }
                return Err(InferError::Model(format!("{p}: tensor `{}` is not a LoRA pair", t.name)));
            };
            let (layer, proj) = parse_name(stem)
                .filter(|(l, _)| *l < base.blocks.len())
                .ok_or_else(|| InferError::Model(format!("{p}: `{stem}` is not a projection this decoder adapts")))?;
            let b = g
                .tensor(&format!("{stem}.lora_b"))
                .ok_or_else(|| InferError::Model(format!("{p}: `{stem}.lora_a` has no `{stem}.lora_b`")))?;
            let mat = base.blocks[layer].projection(proj);
            let (rank, k) = match t.shape[..] {
                [rank, k] => (rank, k),
                _ => return Err(InferError::Model(format!("{p}: `{}` is not a matrix", t.name))),
            };
            if k != mat.k || b.shape != [mat.n, rank] || rank == 0 {
                return Err(InferError::Model(format!(
                    "{p}: `{stem}`: A {:?} and B {:?} do not fit the base's {}×{} weight",
                    t.shape, b.shape, mat.n, mat.k
                )));
            }
            let read = |info: &forge_gguf::TensorInfo, r: &mut BufReader<std::fs::File>| -> Result<Vec<f32>> {
                let data = g.tensor_bytes(r, info)?;
                let mut v = vec![0f32; info.elements()];
                forge_gguf::quant::dequantize_into(info.ty, &data, &mut v)?;
                Ok(v)
            };
            let (a, b) = (read(t, &mut r)?, read(b, &mut r)?);
            bytes += 4 * (a.len() + b.len());
            layers[layer][proj as usize] = Some(Lora { a, b, r: rank, k, n: mat.n, scale: alpha / rank as f32 });
            pairs += 1;
        }
        if pairs == 0 {
            return Err(InferError::Model(format!("{p} holds no LoRA pairs")));
        }
        Ok(Adapter { layers, bytes, name: text("general.name") })
    }

    /// Bytes of memory the adapter takes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn get(&self, layer: usize, proj: Proj) -> Option<&Lora> {
        self.layers.get(layer).and_then(|l| l[proj as usize].as_ref())
    }
}

/// `blk.L.NAME.weight` → (L, projection).
fn parse_name(stem: &str) -> Option<(usize, Proj)> {
    let rest = stem.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let name = rest.strip_suffix(".weight")?;
    let proj = PROJECTIONS.iter().find(|(n, _)| *n == name)?.1;
    Some((layer.parse().ok()?, proj))
}
