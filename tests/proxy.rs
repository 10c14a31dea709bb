//! `forge proxy` as the binary runs it, in front of an upstream that is a real HTTP server on
//! 127.0.0.1 (forge-fake-teacher, streaming too): captures under 32 concurrent clients, each
//! stored once; call sites named by header or field, or recognised by their template; a
//! `kill -9` mid-stream leaves a readable store; keys reach no capture, log or client.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use forge_fake_teacher::{FakeTeacher, Faults, Serving};
use forge_serve::proxy::{Capture, store};
use serde_json::{Value, json};

fn manifest(base_url: &str, key_env: Option<&str>) -> String {
    let key = key_env.map(|k| format!(" api-key-env=\"{k}\"")).unwrap_or_default();
    format!("forge 1\nteacher \"big\" kind=\"openai\" model=\"gpt-big\" base-url=\"{base_url}\"{key}\n")
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

struct Proxy {
    child: Child,
    addr: String,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn start(ws: &TestWorkspace, env: &[(&str, &str)]) -> Proxy {
        Proxy::start_with(ws, env, &[])
    }

    fn start_with(ws: &TestWorkspace, env: &[(&str, &str)], args: &[&str]) -> Proxy {
        let addr = free_addr();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(ws.file("proxy.log")).unwrap();
        let mut cmd = ws.cmd(&[&["proxy", "--addr", &addr], args].concat());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let p = Proxy { child, addr };
        let t0 = Instant::now();
        while request(&p.addr, "GET", "/v1/models", &[], "").is_none() {
            assert!(t0.elapsed() < Duration::from_secs(30), "forge proxy did not come up: {}", ws.read("proxy.log"));
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    /// `kill -9`.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn site(&self) -> String {
        self.headers
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("x-forge-site:"))
            .map(|l| l["x-forge-site:".len()..].trim().to_string())
            .unwrap_or_default()
    }

    /// The answer's text: the message of a whole answer, the deltas of a stream (which must end
    /// with `[DONE]`).
    fn content(&self) -> String {
        if self.headers.contains("text/event-stream") {
            let data: Vec<&str> = self.body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            assert_eq!(data.last(), Some(&"[DONE]"), "{}", self.body);
            data.iter()
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
                .collect()
        } else {
            let v: Value = serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("{}", self.body));
            v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
        }
    }
}

/// One HTTP/1.1 request, read to its end.
fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Option<Reply> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let (headers, body) =
        out.split_once("\r\n\r\n").map_or((out.clone(), String::new()), |(h, b)| (h.into(), b.into()));
    Some(Reply { status, headers, body })
}

fn chat(addr: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
    request(addr, "POST", "/v1/chat/completions", headers, &body.to_string()).expect("the proxy answers")
}

fn ask(system: &str, user: &str, stream: bool) -> Value {
    json!({
        "model": "whatever-the-game-says",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "stream": stream,
    })
}

/// Every site's captures, and what reading them found.
fn captures(dir: &Path) -> BTreeMap<String, (Vec<Capture>, store::ReadReport)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(site) = name.strip_suffix(".jsonl") {
            out.insert(site.to_string(), store::read(&e.path()).unwrap());
        }
    }
    out
}

#[test]
fn captures_under_32_concurrent_clients_are_each_stored_once_per_site() {
    let teacher = FakeTeacher::start(Faults {
        latency: Duration::from_millis(20),
        stream_delay: Duration::from_millis(1),
        ..Faults::default()
    });
    let ws = TestWorkspace::with_manifest(&manifest(&teacher.base_url(), None));
    let proxy = Proxy::start(&ws, &[]);
    let addr = Arc::new(proxy.addr.clone());
    let threads: Vec<_> = (0..32)
        .map(|t| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                (0..6)
                    .map(|i| {
                        let stream = (t + i) % 2 == 0;
                        let user = format!("client {t} call {i}");
                        let reply = match i % 3 {
                            0 => {
                                chat(&addr, &[("X-Forge-Site", "level-gen")], &ask("You design levels.", &user, stream))
                            }
                            1 => {
                                let mut body = ask("You write quests.", &user, stream);
                                body["forge_site"] = json!("quests");
                                chat(&addr, &[], &body)
                            }
                            _ => chat(&addr, &[], &ask("You write tavern gossip.", &user, stream)),
                        };
                        assert_eq!(reply.status, 200, "{}", reply.body);
                        (reply.site(), reply.content())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut answered: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for t in threads {
        for (site, content) in t.join().unwrap() {
            assert!(answered.entry(site).or_default().insert(content), "answers are unique per request");
        }
    }
    proxy.kill();
    let stored = captures(&ws.file("captures"));
    let gossip = answered.keys().find(|s| s.starts_with("site-")).expect("the unnamed site got a name").clone();
    assert_eq!(
        stored.keys().cloned().collect::<BTreeSet<_>>(),
        ["level-gen".to_string(), "quests".into(), gossip.clone()].into()
    );
    let mut ids = BTreeSet::new();
    for (site, (caps, report)) in &stored {
        assert_eq!(*report, store::ReadReport::default(), "{site}");
        assert_eq!(caps.len(), 64, "{site}: 32 clients × 2 calls, each stored once");
        let contents: BTreeSet<String> = caps.iter().map(|c| c.response.content.clone()).collect();
        assert_eq!(&contents, &answered[site], "{site}: what was stored is what the clients got");
        for c in caps {
            assert!(ids.insert(c.id.clone()), "ids are unique");
            assert_eq!((c.site.as_str(), c.upstream.as_str()), (site.as_str(), "big"));
            assert_eq!(c.request["model"], "gpt-big", "the manifest's model went upstream");
            assert!(c.request.get("forge_site").is_none());
            assert_eq!(c.response.finish_reason.as_deref(), Some("stop"));
        }
        assert_eq!(caps.iter().filter(|c| c.stream).count(), 32, "{site}: half of them streamed");
    }
    assert_eq!(teacher.received(), 192, "one upstream call per client call");
    assert!(teacher.requests().iter().all(|s| s.body.get("forge_site").is_none()), "the field never went upstream");
}

#[test]
fn kill_9_mid_stream_leaves_a_readable_store_and_a_restart_appends_to_it() {
    let words = "word ".repeat(60);
    let teacher = FakeTeacher::with_responder(
        Faults { stream_delay: Duration::from_millis(25), ..Faults::default() },
        Arc::new(move |_| words.trim().to_string()),
    );
    let ws = TestWorkspace::with_manifest(&manifest(&teacher.base_url(), None));
    let proxy = Proxy::start(&ws, &[]);
    for i in 0..3 {
        let r = chat(&proxy.addr, &[("X-Forge-Site", "level-gen")], &ask("s", &format!("u{i}"), false));
        assert_eq!(r.status, 200);
    }
    // Four streams under way (60 pieces, 25 ms apart); kill the proxy once one has begun.
    let streams: Vec<_> = (0..4)
        .map(|i| {
            let addr = proxy.addr.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).unwrap();
                let body = json!({
                    "messages": [{"role": "user", "content": format!("stream {i}")}],
                    "stream": true,
                })
                .to_string();
                write!(
                    s,
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Forge-Site: level-gen\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                let mut lines = BufReader::new(s).lines();
                let mut data = 0;
                while let Some(Ok(l)) = lines.next() {
                    data += l.starts_with("data: ") as usize;
                }
                data
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    proxy.kill();
    for s in streams {
        let events = s.join().unwrap();
        assert!(events > 0 && events < 60, "the stream began and was cut off ({events} events)");
    }
    let file = ws.file("captures/level-gen.jsonl");
    let (caps, report) = store::read(&file).unwrap();
    assert_eq!((caps.len(), report), (3, store::ReadReport::default()), "the answered calls, whole; no torn stream");

    // A write cut short by a kill leaves half a line: the reader skips it, a restart cuts it.
    let mut f = std::fs::OpenOptions::new().append(true).open(&file).unwrap();
    f.write_all(b"{\"sum\":\"0123\",\"capture\":{\"id\":\"x").unwrap();
    drop(f);
    let (caps, report) = store::read(&file).unwrap();
    assert_eq!((caps.len(), report.torn, report.damaged), (3, true, 0));
    let proxy = Proxy::start(&ws, &[]);
    let r = chat(&proxy.addr, &[("X-Forge-Site", "level-gen")], &ask("s", "after the restart", true));
    assert_eq!(r.status, 200, "{}", r.body);
    let (caps, report) = store::read(&file).unwrap();
    assert_eq!((caps.len(), report), (4, store::ReadReport::default()));
    assert_eq!(caps[3].response.content, r.content());
}

/// `key` in none of `texts`, nor any encoding or 12-character piece of it.
fn assert_no_key(what: &str, text: &str, key: &str) {
    let r = forge_teacher::Redactor::new([key]);
    assert_eq!(r.redact(text), text, "{what} holds the key (or an encoding of it): {text}");
}

fn all_files(dir: &Path) -> String {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()).into_owned())
        .collect()
}

#[test]
fn keys_reach_no_capture_log_or_client_even_when_the_upstream_echoes_them() {
    // The upstream's key (from the manifest's api-key-env), echoed in a 401 by the server.
    let upstream_key = "sk-upstream-Secret+key/0123456789abcdef";
    let echo = FakeTeacher::serving(
        Faults::default(),
        Serving { echo_authorization: Some(401), ..Serving::default() },
        Arc::new(forge_fake_teacher::default_answer),
    );
    let ws = TestWorkspace::with_manifest(&manifest(&echo.base_url(), Some("FORGE_PROXY_TEST_KEY")));
    let proxy = Proxy::start(&ws, &[("FORGE_PROXY_TEST_KEY", upstream_key)]);
    let r = chat(&proxy.addr, &[("X-Forge-Site", "level-gen")], &ask("s", "u", false));
    assert_eq!(r.status, 401, "the upstream's refusal is passed back");
    assert_eq!(echo.requests()[0].authorization.as_deref(), Some(format!("Bearer {upstream_key}").as_str()));
    proxy.kill();
    assert_no_key("the reply", &format!("{}{}", r.headers, r.body), upstream_key);
    assert_no_key("the log", &ws.read("proxy.log"), upstream_key);
    assert!(ws.read("proxy.log").contains("upstream answered 401"), "{}", ws.read("proxy.log"));
    assert!(captures(&ws.file("captures")).values().all(|(c, _)| c.is_empty()), "a failed call is not captured");

    // No key in the manifest: the client's own goes upstream. It reaches no capture or log even
    // when the request and the answer repeat it.
    let client_key = "sk-client-Secret+key/abcdef0123456789";
    let teacher = FakeTeacher::start(Faults::default());
    let ws = TestWorkspace::with_manifest(&manifest(&teacher.base_url(), None));
    let proxy = Proxy::start(&ws, &[]);
    let bearer = format!("Bearer {client_key}");
    for stream in [false, true] {
        let body = ask("You design levels.", &format!("my key is {client_key} ok"), stream);
        let r = chat(&proxy.addr, &[("Authorization", &bearer), ("X-Forge-Site", "level-gen")], &body);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert!(teacher.requests().iter().all(|s| s.authorization.as_deref() == Some(bearer.as_str())));
    assert!(teacher.requests()[0].body.to_string().contains(client_key), "the request went upstream as sent");
    proxy.kill();
    let (caps, _) = &captures(&ws.file("captures"))["level-gen"];
    assert_eq!(caps.len(), 2);
    assert!(
        caps[0].response.content.contains("my key is") && caps[0].response.content.contains("[redacted]"),
        "{caps:?}"
    );
    assert_no_key("the captures", &all_files(&ws.file("captures")), client_key);
    assert_no_key("the log", &ws.read("proxy.log"), client_key);
}

#[test]
fn bad_requests_and_an_unreachable_upstream_get_clear_errors() {
    let closed = format!("http://{}/v1", free_addr());
    let ws = TestWorkspace::with_manifest(&manifest(&closed, None));
    let proxy = Proxy::start(&ws, &[]);
    let r = request(&proxy.addr, "POST", "/v1/chat/completions", &[], "{not json").unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    let r = chat(&proxy.addr, &[("X-Forge-Site", "../../etc/passwd")], &ask("s", "u", false));
    assert_eq!(r.status, 400);
    assert!(r.body.contains("cannot name a call site"), "{}", r.body);
    let r = chat(&proxy.addr, &[], &ask("s", "u", false));
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("the upstream `big` cannot be reached"), "{}", r.body);
    assert!(!ws.file("captures/passwd.jsonl").exists() && !ws.file("etc").exists());

    let none = TestWorkspace::with_manifest("forge 1\n");
    let r = none.run(&["proxy"]);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr().contains("no OpenAI-compatible teacher"), "{r:?}");
    let keyless = TestWorkspace::with_manifest(&manifest(&closed, Some("FORGE_PROXY_TEST_UNSET")));
    let r = keyless.run(&["proxy"]);
    assert!(r.stderr().contains("FORGE_PROXY_TEST_UNSET is not set"), "{r:?}");
}

/// Two sites, each distilled by its own model target: captures become each site's dataset (the
/// checks filter them, `min-new` batches them), and new captures make only their site stale —
/// until `min-new` of them arrived, not even the stages after its dataset.
#[test]
fn captures_become_their_sites_dataset_and_only_that_site_goes_stale() {
    let teacher = FakeTeacher::start(Faults::default());
    let quests = ask("You write quests.", "x", false);
    let fingerprint = forge_serve::proxy::site::fingerprint(&quests);
    let ws = TestWorkspace::with_manifest(&format!(
        r#"{}
site "level-gen" upstream="big" {{
    validate {{
        banned "REJECTME"
    }}
}}
site "quests" {{
    fingerprint "{fingerprint}"
}}
model "levels" site="level-gen" {{
    dataset from="captures" eval=2 seed=7 min-new=5
    command "count" {{
        run "sh" "-c" "wc -l < {{dep:dataset}}/train.jsonl > {{out}}/n"
        needs "dataset"
    }}
}}
model "quests" site="quests" {{
    dataset from="captures" eval=2 min-new=5
}}
"#,
        manifest(&teacher.base_url(), None)
    ));
    let r = ws.run(&["check"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let proxy = Proxy::start(&ws, &[]);
    let level = |i: usize| {
        let user = if i == 2 { "a level REJECTME please".to_string() } else { format!("level {i}") };
        let r =
            chat(&proxy.addr, &[("X-Forge-Site", "level-gen")], &ask("You design levels.", &user, i.is_multiple_of(2)));
        assert_eq!((r.status, r.site()), (200, "level-gen".to_string()), "{}", r.body);
    };
    (0..7).for_each(level);
    for i in 0..6 {
        // Recognised by its template, captured as the site that claims that fingerprint.
        let r = chat(&proxy.addr, &[], &ask("You write quests.", &format!("quest {i}"), false));
        assert_eq!(r.site(), "quests");
    }
    let (r, ev) = ws.build_json(&[]);
    assert_eq!(r.code(), 0, "{r:?}");
    let finished = |ev: &[Value]| with_event(ev, "finish").into_iter().collect::<BTreeSet<String>>();
    assert_eq!(finished(&ev), ["levels:count".to_string(), "levels:dataset".into(), "quests:dataset".into()].into());
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(ws.artifact_path("levels:dataset").join("meta.json")).unwrap())
            .unwrap();
    assert_eq!((meta["candidates"].as_u64(), meta["samples"].as_u64()), (Some(5), Some(4)), "{meta:#}");
    assert_eq!(meta["rejected"], json!({"banned": 1}), "{meta:#}");
    let n = |ws: &TestWorkspace| std::fs::read_to_string(ws.artifact_path("levels:count").join("n")).unwrap();
    assert_eq!(n(&ws).trim(), "2", "4 samples: 2 train, 2 eval");
    let train = std::fs::read_to_string(ws.artifact_path("levels:dataset").join("train.jsonl")).unwrap();
    let first: Value = serde_json::from_str(train.lines().next().unwrap()).unwrap();
    assert!(first["input"].as_str().unwrap().starts_with("level "), "{first}");
    assert_eq!(first["system"], "You design levels.");

    // Two more level captures: its dataset is stale, rebuilt the same (5 of 9 taken), and its
    // count stays fresh by early cutoff; the quests site is not touched.
    (7..9).for_each(level);
    let r = ws.run(&["status"]);
    assert!(
        r.stdout().contains("site `level-gen`: 9 captures, the first 5 taken (1 more until the dataset next changes)"),
        "{r:?}"
    );
    assert!(r.stdout().contains("fresh   quests:dataset"), "{r:?}");
    let (_, ev) = ws.build_json(&[]);
    assert_eq!(with_event(&ev, "finish"), ["levels:dataset"]);
    assert!(ev.iter().any(|e| e["event"] == "finish" && e["unchanged"] == true), "{ev:#?}");
    assert!(
        ev.iter().any(|e| e["event"] == "fresh" && e["artifact"] == "levels:count" && e["cutoff"] == true),
        "{ev:#?}"
    );

    // The tenth: 10 taken, and what follows the dataset rebuilds.
    level(9);
    let (_, ev) = ws.build_json(&[]);
    assert_eq!(finished(&ev), ["levels:count".to_string(), "levels:dataset".into()].into());
    assert_eq!(n(&ws).trim(), "7", "9 samples of 10: 7 train, 2 eval");

    // `train-on="passing"`: the quests model trains only on answers its site's judge passes (a
    // command verifier, whose script is an input: editing it rebuilds the dataset); the
    // held-out captures stay as they are.
    ws.write("judge.sh", "grep -q 'quest [0-2]\\.' && echo pass || echo fail\n");
    let kdl = ws.read("forge.kdl").replace(
        "site \"quests\" {\n",
        "site \"quests\" {\n    judge {\n        command \"sh\" \"judge.sh\" name=\"early\"\n    }\n",
    );
    ws.write(
        "forge.kdl",
        &kdl.replace(
            "dataset from=\"captures\" eval=2 min-new=5",
            "dataset from=\"captures\" eval=2 min-new=5 train-on=\"passing\"",
        ),
    );
    let (r, ev) = ws.build_json(&["quests:dataset"]);
    assert_eq!((r.code(), with_event(&ev, "finish")), (0, vec!["quests:dataset".to_string()]), "{r:?}");
    let dir = ws.artifact_path("quests:dataset");
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let train = std::fs::read_to_string(dir.join("train.jsonl")).unwrap();
    let judged = meta["rejected"]["judge:early"].as_u64().unwrap_or(0);
    assert_eq!((meta["eval"].as_u64(), meta["train"].as_u64().unwrap() + judged), (Some(2), 3), "{meta:#}");
    for line in train.lines() {
        let out = serde_json::from_str::<Value>(line).unwrap()["output"].as_str().unwrap().to_string();
        assert!(["quest 0.", "quest 1.", "quest 2."].iter().any(|q| out.ends_with(q)), "{out}");
    }
    ws.write("judge.sh", "echo pass\n");
    let (_, ev) = ws.build_json(&["quests:dataset"]);
    assert_eq!(with_event(&ev, "finish"), ["quests:dataset"], "an edited verifier rebuilds");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(ws.artifact_path("quests:dataset").join("meta.json")).unwrap())
            .unwrap();
    assert_eq!(meta["train"].as_u64(), Some(3), "{meta:#}");
    proxy.kill();
}

#[test]
fn forge_check_rejects_sites_and_capture_datasets_it_could_not_build() {
    let base = manifest("http://127.0.0.1:9/v1", None);
    for (text, said) in [
        ("model \"m\" site=\"nowhere\" {\n    dataset from=\"captures\"\n}\n", "no site named `nowhere`"),
        ("model \"m\" {\n    dataset from=\"captures\"\n}\n", "learns from captures but names no site"),
        (
            "site \"s\"\nmodel \"m\" site=\"s\" {\n    dataset from=\"elsewhere\"\n}\n",
            "a dataset cannot come from `elsewhere`",
        ),
        ("site \"s\" upstream=\"huge\"\n", "no teacher named `huge`"),
        ("site \"../s\"\n", "is not a valid site name"),
        (
            "recipe \"r\" {\n    input \"i\"\n    prompt \"p\"\n}\nsite \"s\"\nmodel \"m\" recipe=\"r\" site=\"s\"\n",
            "a recipe or from a site, not both",
        ),
    ] {
        let ws = TestWorkspace::with_manifest(&format!("{base}{text}"));
        let r = ws.run(&["check"]);
        assert_ne!(r.code(), 0, "{text}: {r:?}");
        assert!(r.stderr().contains(said), "{text}: expected `{said}`: {}", r.stderr());
    }
}

/// A site distilled into a tiny model: promoted on measured parity, then answered locally; a
/// version whose answers fail the verifiers falls back to the upstream and is rolled back by
/// itself over its window; manual promotion and rollback; a worse candidate is rejected.
#[test]
fn a_promoted_site_is_answered_locally_falls_back_and_rolls_back() {
    let teacher = FakeTeacher::start(Faults::default());
    let site = |judge: &str| lines_site(&teacher.base_url(), judge, "rollback below=0.5 window=3");
    // Any answer passes this judge; only the upstream's pass the second.
    let (lenient, strict) = (
        "max-chars 100000",
        r#"regex "^Hear ye, good folk of the realm! Answer [0-9a-f]{16} concerning: line [0-9]+\\.$""#,
    );
    let ws = TestWorkspace::with_manifest(&site(lenient));
    let proxy = Proxy::start(&ws, &[]);
    let call = |p: &Proxy, i: usize| {
        chat(&p.addr, &[("X-Forge-Site", "lines")], &ask("You write lines.", &format!("line {i}"), false))
    };
    for i in 0..12 {
        assert_eq!(call(&proxy, i).status, 200);
    }
    let r = ws.run(&["build", "lines:gguf:q8_0"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let r = ws.run(&["site", "promote", "lines"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stderr().contains("Promote") && r.stderr().contains("v1 is live"), "{r:?}");

    // Promoted: the proxy answers from the local model, without the upstream.
    let before = teacher.received();
    let r = call(&proxy, 100);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.headers.to_ascii_lowercase().contains("x-forge-served: local v1"), "{}", r.headers);
    assert_eq!(teacher.received(), before, "the upstream was not asked");
    let status = ws.run(&["site", "status", "--json"]);
    let v: Value = serde_json::from_str(&status.stdout()).unwrap();
    let s = &v["sites"][0];
    assert_eq!(
        (s["captures"].as_u64(), s["local"].as_u64(), s["live"]["version"].as_u64()),
        (Some(12), Some(1), Some(1)),
        "{v:#}"
    );
    proxy.kill();

    // A judge only the upstream passes: each local answer fails, the upstream answers instead
    // (and is captured), and after a window of 3 failures the site is rolled back by itself.
    ws.write("forge.kdl", &site(strict));
    let proxy = Proxy::start(&ws, &[]);
    for i in 0..3 {
        let before = teacher.received();
        let r = call(&proxy, 200 + i);
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(!r.headers.to_ascii_lowercase().contains("x-forge-served"), "{}", r.headers);
        assert!(r.content().starts_with("Hear ye"), "the upstream's answer");
        assert_eq!(teacher.received(), before + 1);
    }
    let live: Value = serde_json::from_str(&ws.read("sites/lines/live.json")).unwrap();
    assert_eq!(live["version"], Value::Null, "{live}");
    assert!(
        live["reason"].as_str().unwrap().starts_with("automatic rollback: v1 passed 0% of its last 3 calls"),
        "{live}"
    );
    assert!(ws.read("proxy.log").contains("automatic rollback"), "{}", ws.read("proxy.log"));
    let served = ws.read("sites/lines/served.jsonl");
    assert_eq!(served.matches("\"fallback\"").count(), 3, "{served}");
    let (caps, _) = &captures(&ws.file("captures"))["lines"];
    assert_eq!(caps.len(), 15, "the fallbacks' answers were captured");

    // By hand: back to v1, and rolled back again; a candidate the strict judge fails is rejected.
    let r = ws.run(&["site", "promote", "lines", "--to", "v1"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let before = teacher.received();
    let r = call(&proxy, 300);
    assert_eq!(
        (r.status, teacher.received()),
        (200, before + 1),
        "v1 is live again and fails, so the upstream answers"
    );
    let r = ws.run(&["site", "rollback", "lines"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stderr().contains("the upstream is live"), "{r:?}");
    // New captures made the dataset stale; below min-new it is rebuilt the same, and the model
    // stays what it was (early cutoff).
    let (r, ev) = ws.build_json(&["lines:gguf:q8_0"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(with_event(&ev, "finish"), ["lines:dataset"], "{ev:#?}");
    let r = ws.run(&["site", "promote", "lines"]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr().contains("Reject"), "{r:?}");
    assert_eq!(ws.run(&["site", "status", "--json"]).stdout().matches("\"number\"").count(), 1, "no new version");
    proxy.kill();
}

/// A site `lines` graded by `judge` (and `policy` lines), distilled into a tiny scratch model
/// 12 captures at a time, 4 of them held out.
fn lines_site(base_url: &str, judge: &str, policy: &str) -> String {
    format!(
        r#"{}
base "tiny" kind="scratch" layers=2 hidden=64 heads=4 kv-heads=2 ffn=128 vocab=320 context=128 seed=1
site "lines" {{
    judge {{
        {judge}
    }}
    promote min-samples=4 attempts=2
    {policy}
}}
model "lines" site="lines" {{
    dataset from="captures" eval=4 seed=1 min-new=12
    adapter base="tiny" rank=8 alpha=16 lr=5e-3 epochs=1 batch=4 seq-len=64 seed=2
    quantize "q8_0"
}}
"#,
        manifest(base_url, None)
    )
}

/// Waits up to `secs` for `done`, showing the proxy's log when it does not come.
fn wait_for(ws: &TestWorkspace, secs: u64, what: &str, done: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "{what} did not happen: {}", ws.read("proxy.log"));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_proxy_distils_in_the_background_and_promotion_asks_the_upstream_its_llm_criteria() {
    // The upstream answers proclamations, and as a judge says YES only to a proclamation.
    const EVALUATOR: &str = "You are a strict evaluator";
    let responder: forge_fake_teacher::Responder = Arc::new(|body: &Value| {
        let system = body["messages"][0]["content"].as_str().unwrap_or("");
        if !system.starts_with(EVALUATOR) {
            return forge_fake_teacher::default_answer(body);
        }
        let user = body["messages"][1]["content"].as_str().unwrap_or("");
        let text = user.split("The text:\n").nth(1).and_then(|t| t.split("\n\nQuestion:").next()).unwrap_or("");
        // Exactly an upstream answer: "Hear ye, good folk of the realm! Answer <16 hex> concerning: line N."
        let proclaimed = text
            .strip_prefix("Hear ye, good folk of the realm! Answer ")
            .and_then(|t| t.split_at_checked(16))
            .is_some_and(|(hex, rest)| {
                hex.chars().all(|c| c.is_ascii_hexdigit())
                    && rest
                        .strip_prefix(" concerning: line ")
                        .and_then(|r| r.strip_suffix('.'))
                        .is_some_and(|n| n.parse::<u32>().is_ok())
            });
        (if proclaimed { "YES" } else { "NO" }).to_string()
    });
    let teacher = FakeTeacher::with_responder(Faults::default(), responder);
    let judged = || teacher.requests().iter().filter(|r| r.body.to_string().contains(EVALUATOR)).count();
    let site = |judge: &str| lines_site(&teacher.base_url(), judge, "");
    let ws = TestWorkspace::with_manifest(&site("max-chars 100000"));
    let proxy = Proxy::start_with(&ws, &[], &["--train"]);
    let call = |p: &Proxy, i: usize| {
        chat(&p.addr, &[("X-Forge-Site", "lines")], &ask("You write lines.", &format!("line {i}"), false))
    };
    for i in 0..11 {
        assert_eq!(call(&proxy, i).status, 200);
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(!ws.file("sites/lines/decisions.jsonl").exists(), "11 captures are below min-new: nothing is trained");
    assert_eq!(call(&proxy, 11).status, 200);

    // The twelfth capture: the proxy rebuilds the site's model and promotes it by itself (any
    // answer passes this judge), and answers the site locally from then on.
    let live = || {
        std::fs::read_to_string(ws.file("sites/lines/live.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["version"].as_u64())
    };
    wait_for(&ws, 300, "a background promotion", || live() == Some(1));
    let log = ws.read("proxy.log");
    assert!(log.contains("lines: 12 captures taken; rebuilding lines:gguf:q8_0 and grading it"), "{log}");
    let before = teacher.received();
    let r = call(&proxy, 100);
    assert!(r.headers.to_ascii_lowercase().contains("x-forge-served: local v1"), "{}", r.headers);
    assert_eq!(teacher.received(), before);
    let decisions = ws.read("sites/lines/decisions.jsonl");
    assert_eq!(decisions.lines().count(), 1, "{decisions}");
    assert!(decisions.contains("\"verdict\":\"promote\"") && decisions.contains("\"version\":1"), "{decisions}");
    assert_eq!(judged(), 0, "no llm criterion, no judge calls");

    // An `llm` criterion, asked of the upstream, about the candidate's answers and about the
    // upstream's fresh answers to the same held-out inputs (asked again, not captured).
    ws.write("forge.kdl", &site(r#"llm "proclaims" "Is the text a proclamation to the folk of the realm?""#));
    let (captured, before) = (captures(&ws.file("captures"))["lines"].0.len(), teacher.received());
    // The captures changed since the build (here a damaged line, which readers skip): the
    // model is stale, and its last build is still the one graded.
    std::fs::OpenOptions::new()
        .append(true)
        .open(ws.file("captures/lines.jsonl"))
        .unwrap()
        .write_all(b"junk\n")
        .unwrap();
    let r = ws.run(&["site", "promote", "lines", "--ask-upstream"]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr().contains("lines:gguf:q8_0 is pending") && r.stderr().contains("using its last build"), "{r:?}");
    assert!(r.stderr().contains("the upstream's fresh answers on 4 held-out captures"), "{r:?}");
    assert!(r.stderr().contains("the candidate passes 0.0%") && r.stderr().contains("the upstream 100.0%"), "{r:?}");
    assert!(r.stderr().contains("Reject") && r.stderr().contains("the candidate failed: proclaims ×4"), "{r:?}");
    // 4 fresh answers, and 8 questions: the candidate's 4 answers and the upstream's 4.
    assert_eq!((teacher.received() - before, judged()), (12, 8));
    assert_eq!(captures(&ws.file("captures"))["lines"].0.len(), captured, "fresh answers are not captures");
    assert_eq!(live(), Some(1), "a rejected grading switches nothing");
    // Graded already under this judge: `--if-new` asks nothing.
    let before = teacher.received();
    let r = ws.run(&["site", "promote", "lines", "--ask-upstream", "--if-new"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stderr().contains("was graded already under this judge and policy: reject"), "{r:?}");
    assert_eq!(teacher.received(), before);
    assert_eq!(ws.read("sites/lines/decisions.jsonl").lines().count(), 2);
    let st = ws.run(&["site", "status"]).stdout();
    assert!(
        st.contains("last grading: lines:gguf:q8_0")
            && st.contains("reject (the candidate 0%, the upstream 100%, n = 4)"),
        "{st}"
    );
    proxy.kill();
}
