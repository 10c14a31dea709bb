//! The remote cache against a real nginx with WebDAV on 127.0.0.1 (Bazel's HTTP layout,
//! `/ac/` and `/cas/`), started by the test: a second clean workspace fetches everything and
//! builds nothing; a corrupted entry is rejected and rebuilt; a server that is down, slow or
//! answers 500 costs one warning, never the build; read-only mode writes nothing.
//!
//! nginx comes from Debian's `nginx-light` (`.ci/run` installs it); without it the test fails.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MANIFEST: &str = r#"forge 1
target "npc" {
    command "lines" {
        run "sh" "-c" "for i in 1 2 3; do echo line $i; done > {out}/lines.txt; date +%s%N > {out}/when.txt"
    }
    command "count" {
        run "sh" "-c" "wc -l < {dep:lines}/lines.txt > {out}/count.txt"
        needs "lines"
    }
}
"#;

struct Nginx {
    child: Child,
    url: String,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn nginx() -> Nginx {
    let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().find(|p| Path::new(p).exists()).expect(
        "nginx is needed for the remote-cache tests (Debian: apt-get install nginx-light; .ci/run installs it)",
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    std::fs::create_dir_all(&root).unwrap();
    // nginx's workers drop root's rights (to `nobody`): they must write the store.
    {
        use std::os::unix::fs::PermissionsExt;
        let open = |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        open(dir.path(), 0o755);
        open(&root, 0o777);
        std::fs::create_dir_all(dir.path().join("body")).unwrap();
        open(&dir.path().join("body"), 0o777);
    }
    let port = free_port();
    let d = dir.path().display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  server {{\n    listen 127.0.0.1:{port};\n    root {};\n    client_max_body_size 0;\n    location / {{\n      dav_methods PUT DELETE;\n      create_full_put_path on;\n      dav_access user:rw group:r all:r;\n    }}\n  }}\n}}\n",
        root.display()
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let child = Command::new(bin)
        .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf"), "-e", &format!("{d}/error.log")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx did not start: {}",
            std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Nginx { child, url: format!("http://127.0.0.1:{port}/forge"), root, _dir: dir }
}

/// Every file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(files(&p)) } else { out.push(p) }
    }
    out.sort();
    out
}

fn build(ws: &TestWorkspace, remote: &[&str]) -> (Run, Vec<serde_json::Value>) {
    let mut args = remote.to_vec();
    args.push("npc");
    ws.build_json(&args)
}

fn events(ev: &[serde_json::Value], kind: &str) -> Vec<String> {
    ev.iter().filter(|e| e["event"] == kind).map(|e| e["artifact"].as_str().unwrap_or_default().to_string()).collect()
}

fn warnings(ev: &[serde_json::Value]) -> Vec<String> {
    ev.iter().filter(|e| e["event"] == "warning").map(|e| e["message"].as_str().unwrap().to_string()).collect()
}

#[test]
fn a_second_workspace_fetches_everything_and_a_corrupt_entry_is_rebuilt() {
    let server = nginx();
    let remote = ["--remote-cache", server.url.as_str()];

    let a = TestWorkspace::with_manifest(MANIFEST);
    let (r, ev) = build(&a, &remote);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(events(&ev, "finish"), ["npc:lines", "npc:count"]);
    assert!(warnings(&ev).is_empty(), "{ev:#?}");
    let stored = files(&server.root);
    assert_eq!(stored.iter().filter(|p| p.to_string_lossy().contains("/ac/")).count(), 2, "{stored:?}");
    assert_eq!(stored.iter().filter(|p| p.to_string_lossy().contains("/cas/")).count(), 3, "{stored:?}");

    // A clean workspace (another machine) fetches both and runs nothing.
    let b = TestWorkspace::with_manifest(MANIFEST);
    let (r, ev) = build(&b, &remote);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(events(&ev, "fetched"), ["npc:lines", "npc:count"], "{ev:#?}");
    let done = ev.iter().find(|e| e["event"] == "done").unwrap();
    assert_eq!((done["built"].as_u64(), done["fetched"].as_u64()), (Some(2), Some(2)), "{done}");
    assert_eq!(
        std::fs::read(a.artifact_path("npc:lines").join("when.txt")).unwrap(),
        std::fs::read(b.artifact_path("npc:lines").join("when.txt")).unwrap(),
        "b has a's output, not a rerun's"
    );
    assert_eq!(b.run(&["cache", "verify"]).code(), 0);

    // Damage the stored lines file: the next clean workspace rejects the entry and builds.
    let lines = files(&server.root.join("forge/cas"))
        .into_iter()
        .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.starts_with("line 1")))
        .expect("lines.txt is stored");
    std::fs::write(&lines, "line 1\nline 2\nline X\n").unwrap();
    let c = TestWorkspace::with_manifest(MANIFEST);
    let (r, ev) = build(&c, &remote);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(events(&ev, "fetched"), Vec::<String>::new(), "{ev:#?}");
    let w = warnings(&ev);
    assert!(w.len() == 1 && w[0].contains("rejected") && w[0].contains("npc:lines"), "{w:?}");
    assert_eq!(
        std::fs::read_to_string(c.artifact_path("npc:lines").join("lines.txt")).unwrap(),
        "line 1\nline 2\nline 3\n"
    );
    assert_eq!(std::fs::read_to_string(c.artifact_path("npc:count").join("count.txt")).unwrap().trim(), "3");

    // Read-only: a new artifact is built and nothing is written to the server.
    let before = files(&server.root);
    let d = TestWorkspace::with_manifest(&MANIFEST.replace("1 2 3", "1 2 3 4"));
    let (r, ev) = build(&d, &["--remote-cache", server.url.as_str(), "--remote-read-only"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(events(&ev, "finish"), ["npc:lines", "npc:count"]);
    assert_eq!(files(&server.root), before, "read-only mode uploaded");
}

/// A server that answers every request with `status`, or with nothing at all (`None`).
fn bad_server(status: Option<u16>) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/forge", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        listener.set_nonblocking(false).unwrap();
        let mut held = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        for s in listener.incoming() {
            let Ok(mut s) = s else { break };
            match status {
                Some(code) => {
                    let mut buf = [0u8; 4096];
                    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                    let _ = s.read(&mut buf);
                    let _ = write!(s, "HTTP/1.1 {code} Oops\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                }
                // Accept and never answer.
                None => held.push(s),
            }
            if Instant::now() > deadline {
                break;
            }
        }
    });
    (url, handle)
}

#[test]
fn a_remote_that_is_down_slow_or_failing_costs_a_warning_not_the_build() {
    let closed = format!("http://127.0.0.1:{}/forge", free_port());
    let (failing, _h1) = bad_server(Some(500));
    let (slow, _h2) = bad_server(None);
    for (what, url) in [("down", closed), ("500", failing), ("slow", slow)] {
        let ws = TestWorkspace::with_manifest(MANIFEST);
        let t0 = Instant::now();
        let (r, ev) = build(&ws, &["--remote-cache", url.as_str(), "--remote-timeout", "1"]);
        assert_eq!(r.code(), 0, "{what}: {r:?}");
        assert_eq!(events(&ev, "finish"), ["npc:lines", "npc:count"], "{what}");
        let w = warnings(&ev);
        assert_eq!(w.len(), 1, "{what}: one warning: {w:?}");
        assert!(w[0].contains("cannot be used") && w[0].contains("building locally"), "{what}: {w:?}");
        assert!(t0.elapsed() < Duration::from_secs(20), "{what}: {:?}", t0.elapsed());
    }
}

#[test]
fn the_manifest_names_the_remote_and_bad_urls_are_diagnostics() {
    let server = nginx();
    let text =
        MANIFEST.replace("forge 1\n", &format!("forge 1\nworkspace {{\n    cache remote=\"{}\"\n}}\n", server.url));
    let a = TestWorkspace::with_manifest(&text);
    let (r, _) = a.build_json(&[]);
    assert_eq!(r.code(), 0, "{r:?}");
    let b = TestWorkspace::with_manifest(&text);
    let (r, ev) = b.build_json(&[]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(events(&ev, "fetched"), ["npc:lines", "npc:count"], "{ev:#?}");

    let bad = TestWorkspace::with_manifest(
        &MANIFEST.replace("forge 1\n", "forge 1\nworkspace {\n    cache remote=\"ftp://x\"\n}\n"),
    );
    let r = bad.run(&["check"]);
    assert_ne!(r.code(), 0, "{r:?}");
    assert!(r.stderr().contains("a remote cache is an `http://` or `https://` URL"), "{r:?}");
}

/// A dataset asking an OpenAI-compatible teacher (a real HTTP server on 127.0.0.1).
fn dataset_manifest(teacher: &str, samples: u32, remote: &str, teacher_calls: bool) -> String {
    format!(
        r#"forge 1
workspace {{
    cache remote="{remote}" teacher-calls=#{teacher_calls}
}}
list "heroes" {{
    items "Alaric" "Berengar" "Cedric" "Dunstan" "Edric" "Fulk" "Godwin" "Hamund" "Ivo" "Jocelin"
}}
list "places" {{
    items "Highmere" "Saltreach" "Kaldmark" "Greywater" "Mirewish"
}}
recipe "posters" {{
    choice "hero" from="heroes"
    choice "place" from="places"
    input "{{{{ hero }}}} of {{{{ place }}}}"
    prompt "Write a short poster about {{{{ hero }}}} of {{{{ place }}}}."
}}
teacher "t" kind="openai" model="fake-4o" base-url="{teacher}"
model "npc" recipe="posters" {{
    dataset samples={samples} eval=2 seed=7 teacher="t"
}}
"#
    )
}

#[test]
fn teacher_answers_are_shared_between_machines_and_a_corrupt_one_is_asked_again() {
    let server = nginx();
    let teacher = forge_fake_teacher::FakeTeacher::start(forge_fake_teacher::Faults::default());
    let manifest = |samples, calls| dataset_manifest(&teacher.base_url(), samples, &server.url, calls);
    let built = |ws: &TestWorkspace| {
        let (r, ev) = ws.build_json(&["npc:dataset"]);
        assert_eq!(r.code(), 0, "{r:?}");
        (events(&ev, "finish"), warnings(&ev))
    };

    let a = TestWorkspace::with_manifest(&manifest(10, true));
    assert_eq!(built(&a).0, ["npc:dataset"]);
    assert_eq!(teacher.received(), 10);

    // Another machine wants 14 samples: a new dataset, whose first 10 answers were paid for.
    let b = TestWorkspace::with_manifest(&manifest(14, true));
    let r = b.run(&["status", "npc:dataset"]);
    assert!(r.stdout().contains("4 of 14 samples to generate"), "the estimate reads the remote too: {r:?}");
    let (finished, w) = built(&b);
    assert_eq!((finished, w), (vec!["npc:dataset".to_string()], vec![]));
    assert_eq!(teacher.received(), 14, "only the 4 new samples were asked");
    let log = b.read(".forge-cache/logs-v1/npc--dataset.log");
    // (The estimate kept the answers it read from the remote: the build found them here.)
    assert!(log.contains("teacher calls: 4 made, 10 answered from the cache\n"), "{log}");
    let train =
        |ws: &TestWorkspace| std::fs::read_to_string(ws.artifact_path("npc:dataset").join("train.jsonl")).unwrap();
    let (a_train, b_train) = (train(&a), train(&b));
    assert!(b_train.starts_with(a_train.lines().next().unwrap()), "b's samples are a's answers");

    // An answer damaged on the server is rejected (one warning) and asked again.
    let call = files(&server.root.join("forge/ac"))
        .into_iter()
        .find(|p| std::fs::read_to_string(p).is_ok_and(|t| !t.starts_with('{') && t.contains("\"sample\":3,")))
        .expect("sample 3's answer is stored");
    let text = std::fs::read_to_string(&call).unwrap();
    std::fs::write(&call, text.replace("Hear ye", "Hear me")).unwrap();
    let c = TestWorkspace::with_manifest(&manifest(13, true));
    let (_, w) = built(&c);
    assert!(w.len() == 1 && w[0].contains("teacher call was rejected"), "{w:?}");
    assert_eq!(teacher.received(), 15, "the damaged answer alone was asked again");
    assert!(!train(&c).contains("Hear me"));
    let log = c.read(".forge-cache/logs-v1/npc--dataset.log");
    assert!(
        log.contains("teacher calls: 1 made, 12 answered from the cache (12 of them from the remote cache)"),
        "{log}"
    );

    // `teacher-calls=#false`: answers stay on the machine that paid for them.
    let before = files(&server.root).len();
    let d = TestWorkspace::with_manifest(&manifest(15, false));
    built(&d);
    assert_eq!(teacher.received(), 30, "nothing was fetched");
    assert_eq!(files(&server.root).len(), before + 4, "the artifact was uploaded (its entry and 3 files), no answer");

    // Read-only: answers are fetched, and neither they nor the artifact are uploaded.
    let before = files(&server.root);
    let e = TestWorkspace::with_manifest(&manifest(16, true));
    let (r, _) = e.build_json(&["--remote-read-only", "npc:dataset"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(teacher.received(), 32, "samples 14 and 15 are new to the remote");
    assert_eq!(files(&server.root), before, "read-only mode uploaded");
}
