//! Digests the code that shapes each stage's output (`code_keys.rs`) into `stage_code.rs`, which
//! `src/code.rs` includes: every action key of a stage holds its stage's digest.

use std::fmt::Write as _;

include!("code_keys.rs");

fn main() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let code = stage_code(&crates).unwrap_or_else(|e| panic!("digesting the stages' code: {e}"));
    let mut out = String::from("/// Per stage kind: its code's digest and the external crates' versions.\n");
    out.push_str("pub const STAGE_CODE: &[(&str, &str, Crates)] = &[\n");
    for (stage, c) in &code {
        let crates: Vec<String> = c.crates.iter().map(|(n, v)| format!("({n:?}, {v:?})")).collect();
        let _ = writeln!(out, "    ({stage:?}, {:?}, &[{}]),", c.digest, crates.join(", "));
        for p in &c.read {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    out.push_str("];\n");
    println!("cargo:rerun-if-changed={}", crates.join("../Cargo.lock").display());
    println!("cargo:rerun-if-changed=code_keys.rs");
    let dest = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("stage_code.rs");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("{}: {e}", dest.display()));
}
