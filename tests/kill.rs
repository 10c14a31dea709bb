//! A build killed in the middle of an action, then run again.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn wait_for(path: &std::path::Path) {
    let t0 = Instant::now();
    while std::fs::read_to_string(path).map_or(true, |s| !s.ends_with('\n')) {
        assert!(t0.elapsed() < Duration::from_secs(30), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_rebuilt_cleanly(ws: &TestWorkspace) {
    // Nothing half-written is taken as fresh.
    let status: serde_json::Value = serde_json::from_str(&ws.run(&["status", "--json", "slow"]).stdout()).unwrap();
    assert_eq!(status["artifacts"][0]["artifact"], "slow:half");
    assert_eq!(status["artifacts"][0]["status"], "stale", "{status:#}");
    assert_eq!(status["artifacts"][0]["reasons"][0]["reason"], "never-built");

    ws.write("release", "");
    let (r, ev) = ws.build_json(&["slow"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(with_event(&ev, "finish"), ["slow:half", "slow:after"]);
    let out = std::fs::read_to_string(ws.artifact_path("slow:after").join("copy.txt")).unwrap();
    assert_eq!(out, "first half\nsecond half\n");
    let tmp = std::fs::read_dir(ws.file(".forge-cache/tmp")).unwrap().count();
    assert_eq!(tmp, 0, "the killed build's staging directory is gone");
    let (_, ev) = ws.build_json(&["slow"]);
    assert!(with_event(&ev, "start").is_empty());
}

#[test]
fn sigkill_mid_action_then_rerun() {
    let ws = TestWorkspace::copy_of("lore");
    let mut child = ws.cmd(&["build", "slow"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    wait_for(&ws.file("started"));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    // The action's process dies with forge (PR_SET_PDEATHSIG): no writer is left behind.
    let pid: i32 = ws.read("started").trim().parse().unwrap();
    let t0 = Instant::now();
    // SAFETY: signal 0 only checks whether the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the action outlived forge");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_rebuilt_cleanly(&ws);
}

#[test]
fn interrupt_stops_the_build_and_records_nothing() {
    let ws = TestWorkspace::copy_of("lore");
    let child = ws.cmd(&["build", "slow"]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    wait_for(&ws.file("started"));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Failed slow:half: interrupted"), "{err}");
    assert_rebuilt_cleanly(&ws);
}
