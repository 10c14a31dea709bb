//! The code that shapes each stage's output, digested when forge was built (`code_keys.rs`,
//! `build.rs`): held in every action key of the stage, as `forge:<stage>` and the versions of
//! the external crates its code uses, so that a forge whose stage code changed rebuilds what
//! that stage made — and only that (`forge why`: "forge's adapter stage changed").

use std::collections::BTreeMap;

/// External crates and their versions.
type Crates = &'static [(&'static str, &'static str)];

include!(concat!(env!("OUT_DIR"), "/stage_code.rs"));

/// What goes in `Fingerprint.tools` for a stage of `kind` (nothing for a kind it does not know).
pub fn tools(kind: &str) -> BTreeMap<String, String> {
    let Some((_, digest, crates)) = STAGE_CODE.iter().find(|(k, _, _)| *k == kind) else {
        return BTreeMap::new();
    };
    let mut t: BTreeMap<String, String> = crates.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    t.insert(format!("forge:{kind}"), digest.to_string());
    t
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    mod keys {
        include!("../code_keys.rs");
    }

    /// The workspace's `crates/` and `Cargo.lock`, copied (sources and manifests only).
    fn copy_workspace() -> (tempfile::TempDir, PathBuf) {
        let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = tempfile::tempdir().unwrap();
        let crates = dir.path().join("crates");
        for e in std::fs::read_dir(&real).unwrap() {
            let c = e.unwrap().path();
            let name = c.file_name().unwrap();
            if !c.join("Cargo.toml").is_file() {
                continue;
            }
            std::fs::create_dir_all(crates.join(name)).unwrap();
            std::fs::copy(c.join("Cargo.toml"), crates.join(name).join("Cargo.toml")).unwrap();
            copy_tree(&c.join("src"), &crates.join(name).join("src"));
        }
        std::fs::copy(real.join("../Cargo.lock"), dir.path().join("Cargo.lock")).unwrap();
        (dir, crates)
    }

    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let p = e.unwrap().path();
            let dest = to.join(p.file_name().unwrap());
            if p.is_dir() {
                copy_tree(&p, &dest)
            } else {
                std::fs::copy(&p, &dest).unwrap();
            }
        }
    }

    fn digests(crates: &Path) -> std::collections::BTreeMap<String, String> {
        keys::stage_code(crates).unwrap().into_iter().map(|(k, c)| (k, c.digest)).collect()
    }

    fn append(path: &Path, text: &str) {
        let mut s = std::fs::read_to_string(path).unwrap();
        s.push_str(text);
        std::fs::write(path, s).unwrap();
    }

    /// The digests built into this forge are those of the sources it was built from.
    #[test]
    fn the_built_in_digests_are_the_sources_digests() {
        let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let now = digests(&real);
        for (kind, digest, _) in super::STAGE_CODE {
            assert_eq!(now.get(*kind).map(String::as_str), Some(*digest), "{kind}");
            assert_eq!(super::tools(kind)[&format!("forge:{kind}")], *digest);
        }
        assert!(super::tools("adapter").contains_key("candle-core"), "{:?}", super::tools("adapter"));
    }

    /// Editing a stage's code changes its key and not the keys of stages it does not shape;
    /// editing a comment changes nothing.
    #[test]
    fn keys_follow_the_code_of_their_stage_only() {
        let (_dir, crates) = copy_workspace();
        let before = digests(&crates);
        let stages: Vec<&str> = keys::STAGES.iter().map(|s| s.0).collect();
        let changed = |after: &std::collections::BTreeMap<String, String>| -> Vec<&str> {
            stages.iter().copied().filter(|s| before[*s] != after[*s]).collect()
        };

        append(&crates.join("forge-stages/src/report.rs"), "\n/// A note.\n// Another.\n\n");
        assert_eq!(changed(&digests(&crates)), Vec::<&str>::new(), "comments are not code");

        append(&crates.join("forge-stages/src/report.rs"), "\nfn _unused() {}\n");
        assert_eq!(changed(&digests(&crates)), ["report"]);

        let after_report = digests(&crates);
        append(&crates.join("forge-train/src/lib.rs"), "\nfn _unused_too() {}\n");
        let after = digests(&crates);
        let moved: Vec<&str> = stages.iter().copied().filter(|s| after_report[*s] != after[*s]).collect();
        for s in ["adapter", "merged", "imatrix"] {
            assert!(moved.contains(&s), "{s} is trained by forge-train: {moved:?}");
        }
        for s in ["dataset", "fetch", "command", "gguf"] {
            assert!(!moved.contains(&s), "{s} does not run forge-train: {moved:?}");
        }

        // A new version of an external crate the stage uses.
        let lock = crates.join("../Cargo.lock");
        let text = std::fs::read_to_string(&lock).unwrap();
        let bumped = text.replacen("name = \"minijinja\"\nversion = \"", "name = \"minijinja\"\nversion = \"9", 1);
        assert_ne!(bumped, text, "Cargo.lock has minijinja");
        std::fs::write(&lock, bumped).unwrap();
        let bumped = digests(&crates);
        assert_ne!(bumped["dataset"], after["dataset"], "the dataset's templates render with minijinja");
        assert_eq!(bumped["fetch"], after["fetch"]);
    }
}
