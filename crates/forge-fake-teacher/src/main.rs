//! `forge-fake-teacher [--port P] [--latency-ms MS]`: the fake teacher as a process, for
//! benchmarks (e.g. bench/teacher.py). Prints its base URL, serves until killed, then prints
//! how many requests it answered.

use std::time::Duration;

fn main() {
    let mut port = 0u16;
    let mut latency = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().and_then(|v| v.parse().ok()).expect("--port N"),
            "--latency-ms" => latency = args.next().and_then(|v| v.parse().ok()).expect("--latency-ms N"),
            _ => {
                eprintln!("usage: forge-fake-teacher [--port P] [--latency-ms MS]");
                std::process::exit(2);
            }
        }
    }
    let faults = forge_fake_teacher::Faults { latency: Duration::from_millis(latency), ..Default::default() };
    let server = forge_fake_teacher::FakeTeacher::bind(
        &format!("127.0.0.1:{port}"),
        faults,
        std::sync::Arc::new(forge_fake_teacher::default_answer),
    )
    .expect("bind");
    println!("{}", server.base_url());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    eprintln!("answered {} requests", server.answered());
}
