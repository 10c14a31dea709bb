//! Manifests written to break the loader: each test is named after a failure that hostile
//! testing found, and asserts the clear diagnostic that replaced it. (Malformed manifests with a
//! fixed text are fixtures in `fixtures/bad`; these are generated, large, or need a file tree.)

use std::path::Path;

use forge_manifest::{Code, ManifestErrors, load};

fn workspace(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (rel, text) in files {
        let p = dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    dir
}

fn errors(root: &Path) -> ManifestErrors {
    match load(&root.join("forge.kdl")) {
        Ok(_) => panic!("{} should not load", root.display()),
        Err(e) => e,
    }
}

fn codes(e: &ManifestErrors) -> Vec<Code> {
    e.errors().iter().map(|d| d.code()).collect()
}

/// A recipe and a model around a lore list given as KDL.
fn with_lore(list: &str) -> String {
    format!(
        "forge 1\nteacher \"offline\" kind=\"grammar\"\n{list}\nrecipe \"r\" {{\n    choice \"x\" from=\"l\"\n    \
         grammar \"g\" {{ rule \"origin\" \"#x#\" }}\n    input \"{{{{ x }}}}\"\n    prompt \"p\" grammar=\"g\"\n}}\n\
         model \"m\" recipe=\"r\" {{ dataset samples=10 eval=2 teacher=\"offline\" }}\n"
    )
}

#[test]
fn two_thousand_nested_braces_in_8_kb_get_a_diagnostic_not_a_stack_overflow() {
    let text = format!("forge 1\nlist \"l\" {}", "{".repeat(2000));
    let ws = workspace(&[("forge.kdl", &text)]);
    let e = errors(ws.path());
    assert_eq!(codes(&e), [Code::Limit]);
    let d = &e.errors()[0];
    assert_eq!(d.snippet(), "{");
    assert!(d.to_string().contains("64 levels"), "{d}");
}

/// Found by the fuzz test: after a syntax error the parser resumes where braces that the
/// nesting scan saw inside strings open blocks, 4,000 deep in a 16 KB file.
#[test]
fn braces_the_parser_reads_after_a_syntax_error_do_not_overflow_its_stack() {
    let text = format!("forge 1\nforglist \"l{}", "\"a\"{".repeat(4000));
    let ws = workspace(&[("forge.kdl", &text)]);
    let e = errors(ws.path());
    assert!(codes(&e).iter().all(|c| *c == Code::Syntax), "{:?}", codes(&e));
    // Past the bound on braces per file, the parser is not run at all.
    let text = format!("forge 1\nforglist \"l{}", "\"a\"{".repeat(forge_manifest::limits::MAX_BLOCKS + 1));
    let ws = workspace(&[("forge.kdl", &text)]);
    assert_eq!(codes(&errors(ws.path())), [Code::Limit]);
}

#[test]
fn a_valid_lore_tree_1000_levels_deep_gets_a_diagnostic_not_a_stack_overflow() {
    let mut list = String::from("list \"l\" ");
    for i in 0..1000 {
        list.push_str(&format!("{{ item \"e{i}\" {{ list \"sub\" "));
    }
    list.push_str("{ items \"leaf\" }");
    list.push_str(&" } }".repeat(1000));
    let ws = workspace(&[("forge.kdl", &with_lore(&list))]);
    assert_eq!(codes(&errors(ws.path())), [Code::Limit]);
    // Just inside the bound, the same shape loads.
    let mut list = String::from("list \"l\" ");
    for i in 0..30 {
        list.push_str(&format!("{{ item \"e{i}\" {{ list \"sub\" "));
    }
    list.push_str("{ items \"leaf\" }");
    list.push_str(&" } }".repeat(30));
    let ws = workspace(&[("forge.kdl", &with_lore(&list))]);
    load(&ws.path().join("forge.kdl")).unwrap();
}

/// 80,000 entries took 42 s (a linear scan per entry for duplicates); 200,000 would take minutes.
#[test]
fn large_lore_lists_check_in_linear_time() {
    let n = 200_000;
    let mut list = String::with_capacity(n * 12);
    list.push_str("list \"l\" {\n");
    for i in 0..n {
        list.push_str(&format!("    item \"e{i}\"\n"));
    }
    list.push_str("    item \"e7\"\n}");
    let ws = workspace(&[("forge.kdl", &with_lore(&list))]);
    let e = errors(ws.path());
    assert_eq!(codes(&e), [Code::DuplicateName]);
    assert_eq!(e.errors()[0].snippet(), "\"e7\"");
}

#[test]
fn a_colon_in_a_model_name_is_reported_not_dropped() {
    let text = with_lore("list \"l\" { items \"a\" }").replace("model \"m\"", "model \"de:fame\"");
    let ws = workspace(&[("forge.kdl", &text)]);
    let e = errors(ws.path());
    assert_eq!(codes(&e), [Code::InvalidValue]);
    assert!(e.errors()[0].to_string().contains("not a valid model name"), "{}", e.errors()[0]);
}

#[cfg(unix)]
#[test]
fn a_symlink_in_the_workspace_that_leads_out_is_refused_and_not_read() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("passwd");
    std::fs::write(&secret, "root:x:0:0:root:/root:/bin/bash\n").unwrap();
    let ws = workspace(&[
        ("forge.kdl", "forge 1\ninclude \"worlds/*.kdl\"\n"),
        ("worlds/ok.kdl", "list \"l\" { items \"a\" }\n"),
    ]);
    std::os::unix::fs::symlink(&secret, ws.path().join("worlds/x.kdl")).unwrap();
    let e = errors(ws.path());
    assert_eq!(codes(&e), [Code::InvalidPath]);
    let mut rendered = String::new();
    miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
        .render_report(&mut rendered, &e)
        .unwrap();
    assert!(rendered.contains("worlds/x.kdl") && rendered.contains("outside the workspace"), "{rendered}");
    assert!(!rendered.contains("root:x"), "the linked file's contents leaked: {rendered}");
}

#[cfg(unix)]
#[test]
fn base_paths_that_leave_the_workspace_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("model.gguf"), "GGUF").unwrap();
    let ws = workspace(&[(
        "forge.kdl",
        "forge 1\nbase \"linked\" kind=\"gguf\" path=\"models/model.gguf\"\n\
         base \"dir\" kind=\"hf\" path=\"hf/llama\"\nbase \"inside\" kind=\"gguf\" path=\"local/x.gguf\"\n",
    )]);
    std::fs::create_dir_all(ws.path().join("local")).unwrap();
    std::os::unix::fs::symlink(outside.path(), ws.path().join("models")).unwrap();
    std::os::unix::fs::symlink("/etc", ws.path().join("hf")).unwrap();
    let e = errors(ws.path());
    assert_eq!(codes(&e), [Code::InvalidPath, Code::InvalidPath]);
    let snippets: Vec<&str> = e.errors().iter().map(|d| d.snippet()).collect();
    assert_eq!(snippets, ["path=\"models/model.gguf\"", "path=\"hf/llama\""]);
}

#[test]
fn a_directory_as_an_included_file_is_an_io_error() {
    let ws =
        workspace(&[("forge.kdl", "forge 1\ninclude \"worlds\"\n"), ("worlds/a.kdl", "list \"l\" { items \"a\" }\n")]);
    // A directory names the files below it…
    load(&ws.path().join("forge.kdl")).unwrap();
    // …but the root manifest itself must be a file.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("forge.kdl")).unwrap();
    let e = errors(dir.path());
    assert_eq!(codes(&e), [Code::Io]);
    assert!(e.errors()[0].to_string().contains("directory"), "{}", e.errors()[0]);
}
