//! A mutation fuzz test of the loader over the real manifests shipped in this repository (the
//! root demo and the examples, with the files they include): each case mutates one file (bytes
//! flipped, deleted, duplicated, or KDL punctuation and keywords spliced in) with a fixed seed, and
//! loading must return a manifest or diagnostics, each with a code and a span in a known file,
//! never panic or abort, in bounded time and memory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forge_manifest::load;

/// The workspaces whose manifests are mutated, relative to the repository root.
const WORKSPACES: &[&str] = &[".", "examples/persona-npc", "examples/openai-teacher", "examples/gemma-defame"];

/// Tokens that stress the lexer and the decoders.
const SPLICES: &[&str] = &[
    "{",
    "}",
    "\"",
    "#",
    "##\"",
    "\"\"\"",
    "/*",
    "*/",
    "//",
    "/-",
    "=",
    ";",
    "\\",
    "(",
    ")",
    "\n",
    "#true",
    "#null",
    "-1",
    "1e999",
    "0x",
    "include \"**\"",
    "include \"../x\"",
    "list \"l\" {",
    "item \"x\" w=1",
    "model \"m:x\"",
    "{{ x.y }}",
    "{% for %}",
    "#rule#",
    "\u{0}",
    "\u{feff}",
    "é",
    "🎲",
    "\r\n",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `.kdl` file of a workspace (what it includes lives beside it), relative to it.
fn kdl_files(ws: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(ws).into_iter().filter_entry(|e| {
        let name = e.file_name().to_string_lossy();
        e.depth() == 0 || !(name.starts_with('.') || name == "target" || name == "crates" || name == "examples")
    }) {
        let entry = entry.unwrap();
        if entry.file_type().is_file() && entry.path().extension().is_some_and(|e| e == "kdl") {
            out.push(entry.path().strip_prefix(ws).unwrap().to_path_buf());
        }
    }
    out.sort();
    out
}

fn mutate(rng: &mut Rng, text: &[u8]) -> Vec<u8> {
    let mut b = text.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len() + 1);
        match rng.below(5) {
            0 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] ^= 1 << rng.below(8);
            }
            1 => {
                let end = (at + 1 + rng.below(64)).min(b.len());
                b.drain(at.min(end)..end);
            }
            2 => {
                let end = (at + 1 + rng.below(256)).min(b.len());
                let piece = b[at.min(end)..end].to_vec();
                let most = if rng.below(8) == 0 { 200 } else { 3 };
                let times = 1 + rng.below(most);
                for _ in 0..times {
                    b.splice(at..at, piece.iter().copied());
                }
            }
            _ => {
                let s = SPLICES[rng.below(SPLICES.len())];
                let times = if rng.below(10) == 0 { 100 + rng.below(3000) } else { 1 };
                b.splice(at..at, s.repeat(times).into_bytes());
            }
        }
    }
    b
}

fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage writes into the struct it is given.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u.ru_maxrss as u64 * 1024
    }
}

#[test]
fn mutated_real_manifests_get_diagnostics_never_a_panic() {
    let root = repo_root();
    // FORGE_FUZZ_SECONDS runs it longer by hand (the cases per workspace grow with it).
    let seconds: u64 = std::env::var("FORGE_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let budget = Duration::from_secs(seconds);
    let started = Instant::now();
    let mut rng = Rng(0x5eed_f0e6e);
    let (mut cases, mut rejected) = (0usize, 0usize);
    'all: for ws in WORKSPACES {
        let src = root.join(ws);
        let files = kdl_files(&src);
        assert!(files.iter().any(|f| f == Path::new("forge.kdl")), "{ws} has no forge.kdl");
        for _ in 0..60 * seconds.div_ceil(8) {
            if started.elapsed() > budget {
                break 'all;
            }
            let dir = tempfile::tempdir().unwrap();
            for f in &files {
                let to = dir.path().join(f);
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                std::fs::copy(src.join(f), &to).unwrap();
            }
            let victim = &files[rng.below(files.len())];
            let mutated = mutate(&mut rng, &std::fs::read(src.join(victim)).unwrap());
            std::fs::write(dir.path().join(victim), &mutated).unwrap();
            // An abort (a stack overflow) cannot be caught: leave the input where it can be found.
            let keep = std::env::temp_dir().join("forge-fuzz-case.kdl");
            std::fs::write(&keep, &mutated).unwrap();
            let root_file = dir.path().join("forge.kdl");
            let outcome = std::panic::catch_unwind(|| load(&root_file));
            cases += 1;
            match outcome {
                Err(_) => {
                    panic!("loading {ws}/{} mutated panicked; the input is in {}", victim.display(), keep.display());
                }
                Ok(Ok(_)) => {}
                Ok(Err(errors)) => {
                    rejected += 1;
                    assert!(!errors.errors().is_empty(), "an error without diagnostics");
                    for e in errors.errors() {
                        assert!(e.code().as_str().starts_with("forge::manifest::"));
                        assert!(!e.to_string().is_empty());
                    }
                }
            }
        }
    }
    assert!(cases >= 40, "only {cases} cases ran in {budget:?}");
    assert!(rejected * 2 >= cases, "most mutations should be rejected: {rejected} of {cases}");
    let peak = peak_rss_bytes();
    assert!(peak < 1 << 30, "peak RSS {} MiB", peak >> 20);
    eprintln!("{cases} mutated manifests, {rejected} rejected, peak RSS {} MiB", peak >> 20);
}
