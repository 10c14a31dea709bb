//! `forge inspect FILE.gguf`.

use crate::Failure;
use crate::args::InspectArgs;
use crate::output::{Color, Output};

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

pub fn inspect(out: &Output, a: InspectArgs) -> Result<(), Failure> {
    let g = forge_gguf::Gguf::open(&a.file).map_err(|e| {
        // The error names the file.
        eprintln!("{}: {e}", out.paint("error", Color::Red));
        Failure::Failed
    })?;
    let report = forge_gguf::inspect::report(&g);
    let problems = forge_gguf::inspect::problems(&g);
    if a.json {
        crate::outln!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        crate::outln!(
            "{}: GGUF v{}, {}, {} tensors, {} parameters, {:.2} bits per weight",
            a.file.display(),
            g.version,
            human(g.file_size),
            g.tensors.len(),
            report["parameters"],
            report["bits_per_weight"].as_f64().unwrap_or(0.0)
        );
        crate::outln!("{}", out.paint("metadata:", Color::Dim));
        for (k, v) in &g.metadata {
            let shown = match v.as_array() {
                Some(items) if items.len() > 8 => format!("[{} × {}]", items.len(), items[0].type_name()),
                _ => {
                    let s = v.to_json(true).to_string();
                    if s.len() > 100 {
                        let cut = (0..=97).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                        format!("{}… ({} chars)", &s[..cut], s.len())
                    } else {
                        s
                    }
                }
            };
            crate::outln!("  {k:<48} {:<7} {shown}", v.type_name());
        }
        crate::outln!("{}", out.paint("types:", Color::Dim));
        if let Some(types) = report["types"].as_object() {
            for (t, v) in types {
                crate::outln!("  {t:<8} {:>5} tensors  {}", v["tensors"], human(v["bytes"].as_u64().unwrap_or(0)));
            }
        }
        crate::outln!("{}", out.paint("tensors:", Color::Dim));
        let n = g.tensors.len();
        for (i, t) in g.tensors.iter().enumerate() {
            if !a.all && n > 12 && (6..n - 4).contains(&i) {
                if i == 6 {
                    crate::outln!("  ... {} more (--all shows them)", n - 10);
                }
                continue;
            }
            crate::outln!(
                "  {:<40} {:<6} {:<18} {}",
                t.name,
                t.ty.to_string(),
                format!("{:?}", t.shape),
                human(t.bytes)
            );
        }
        if problems.is_empty() {
            crate::outln!("{} llama.cpp has what it needs to load this file", out.paint("ok:", Color::Green));
        } else {
            crate::outln!("{} llama.cpp would not load this file as it is:", out.paint("problems:", Color::Red));
            for p in &problems {
                crate::outln!("  - {p}");
            }
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(Failure::Failed) }
}
