//! `forge serve` on a built workspace, as the `forge` binary runs it: it serves the target's
//! GGUF file, follows a rebuild that publishes a new one (hot reload), and refuses bad arguments.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// One HTTP/1.1 request; the status and the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    Some((status, body))
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(ws: &TestWorkspace, args: &[&str], addr: &str) -> Server {
    let mut all = vec!["serve", "--addr", addr];
    all.extend_from_slice(args);
    let child = ws.cmd(&all).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let server = Server(child);
    let t0 = Instant::now();
    while http(addr, "GET", "/health", "").is_none_or(|(s, _)| s != 200) {
        assert!(t0.elapsed() < Duration::from_secs(30), "forge serve did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

fn served_file(addr: &str) -> String {
    let (status, body) = http(addr, "GET", "/list", "").unwrap();
    assert_eq!(status, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    list["npcs"][0]["file"].as_str().unwrap().to_string()
}

/// A rebuild that publishes a new `tiny:gguf:q8_0` is served within seconds, with no restart.
#[test]
fn forge_serve_follows_a_rebuild() {
    let ws = TestWorkspace::copy_of("tiny-model");
    let r = ws.run(&["build", "tiny:gguf:q8_0"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let addr = free_addr();
    let _server = serve(&ws, &["tiny", "--level", "q8_0"], &addr);
    let before = served_file(&addr);
    let chat = r#"{"model": "tiny", "messages": [{"role": "user", "content": "Target: Maud. Intel: fears geese."}], "max_tokens": 16}"#;
    let (status, body) = http(&addr, "POST", "/v1/chat/completions", chat).unwrap();
    assert_eq!(status, 200, "{body}");

    // One more epoch: a new adapter, merged model and GGUF file.
    ws.write("forge.kdl", &ws.read("forge.kdl").replace("epochs=3", "epochs=4"));
    let r = ws.run(&["build", "tiny:gguf:q8_0"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let t0 = Instant::now();
    while served_file(&addr) == before {
        assert!(t0.elapsed() < Duration::from_secs(30), "the rebuilt file is not served");
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = served_file(&addr);
    assert!(after.ends_with("model.gguf") && std::path::Path::new(&after).is_file(), "{after}");
    let (status, body) = http(&addr, "POST", "/v1/chat/completions", chat).unwrap();
    assert_eq!(status, 200, "{body}");
    let (_, metrics) = http(&addr, "GET", "/metrics", "").unwrap();
    assert!(metrics.contains("forge_model_reloads_total 1"), "{metrics}");
}

/// Bad arguments are usage errors (exit 2) that say what is wrong, before anything listens.
#[test]
fn forge_serve_refuses_bad_arguments() {
    let ws = TestWorkspace::copy_of("tiny-model");
    for (args, says) in [
        (vec!["serve", "--level", "q9_9"], "not a level"),
        (vec!["serve", "nobody"], "no target named `nobody`"),
        (vec!["serve", "--model", "noequals"], "NAME=FILE"),
        (vec!["serve", "--model", "a=/no/such/file.gguf"], "file.gguf"),
        (vec!["serve", "--model", "a=x.gguf", "tiny"], "not both"),
        (vec!["serve", "tiny", "--level", "q8_0", "--memory", "lots"], "--memory"),
        (vec!["serve", "--addr", "nowhere", "--model", "a=forge.kdl"], "--addr nowhere"),
        (vec!["serve", "--model", "a=forge.kdl"], "not a GGUF"),
    ] {
        let r = ws.run(&args);
        assert_eq!(r.code(), 2, "{args:?}: {r:?}");
        assert!(r.stderr().contains(says), "{args:?}: {r:?}");
    }
}
