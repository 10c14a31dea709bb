//! Manifest fixtures.
//!
//! `fixtures/good/*.kdl` must load. Each `fixtures/bad/*` (a `.kdl` file, or a directory with a
//! `forge.kdl` and the files it includes) starts with `// expect CODE "SNIPPET"` lines: the
//! diagnostics it must produce, in order, each with its code and the exact text its primary
//! span covers. The rendered report is pinned with an insta snapshot.

use std::path::{Path, PathBuf};

use forge_manifest::{ManifestErrors, load};

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(kind);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    out.sort();
    out
}

fn root_of(fixture: &Path) -> PathBuf {
    if fixture.is_dir() { fixture.join("forge.kdl") } else { fixture.to_path_buf() }
}

fn expectations(root: &Path) -> Vec<(String, String)> {
    // Lossy: one fixture is not UTF-8 on purpose.
    let text = String::from_utf8_lossy(&std::fs::read(root).unwrap()).into_owned();
    text.lines()
        .filter_map(|l| l.strip_prefix("// expect "))
        .map(|l| {
            let (code, snippet) = l.split_once(' ').expect("`// expect CODE \"SNIPPET\"`");
            let snippet = snippet.trim();
            let snippet = snippet.strip_prefix('"').and_then(|s| s.strip_suffix('"')).expect("quoted snippet");
            (code.to_string(), snippet.replace("\\n", "\n").replace("\\\"", "\""))
        })
        .collect()
}

fn render(errors: &ManifestErrors) -> String {
    let handler = miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor()).with_width(100);
    let mut out = String::new();
    handler.render_report(&mut out, errors).unwrap();
    out
}

#[test]
fn good_fixtures_load() {
    for f in fixtures("good") {
        if let Err(e) = load(&root_of(&f)) {
            panic!("{} should load:\n{}", f.display(), render(&e));
        }
    }
}

#[test]
fn bad_fixtures_report_their_diagnostics() {
    let bad = fixtures("bad");
    assert!(bad.len() >= 20, "at least 20 malformed-manifest fixtures, found {}", bad.len());
    let mut failures = Vec::new();
    let mut rendered = Vec::new();
    for f in bad {
        let root = root_of(&f);
        let expected = expectations(&root);
        assert!(!expected.is_empty(), "{} has no `// expect` lines", f.display());
        let errors = match load(&root) {
            Ok(_) => {
                failures.push(format!("{}: loaded without errors", f.display()));
                continue;
            }
            Err(e) => e,
        };
        let got: Vec<(String, String)> =
            errors.errors().iter().map(|e| (e.code().to_string(), e.snippet().to_string())).collect();
        if got != expected {
            failures.push(format!(
                "{}:\n  expected {expected:?}\n  got      {got:?}\n{}",
                f.display(),
                render(&errors)
            ));
        }
        let name = f.file_stem().unwrap().to_string_lossy().into_owned();
        rendered.push((name, render(&errors)));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    for (name, report) in rendered {
        insta::with_settings!({ snapshot_suffix => name, prepend_module_to_snapshot => false }, {
            insta::assert_snapshot!("bad", report);
        });
    }
}
