//! `forge-fake-teacher [--port P] [--latency-ms MS] [--slots N] [--advertise-slots]`: the fake
//! teacher as a process, for benchmarks (e.g. bench/teacher.py) and hand-run checks. Prints its
//! base URL, serves until killed, then prints how many requests it received, answered and saw
//! cancelled. With `--slots N` it serves N requests at once and queues the rest (as llama.cpp's
//! server does); `--advertise-slots` says so at `GET /props` and `GET /slots`.

use std::time::Duration;

fn main() {
    let mut port = 0u16;
    let mut latency = 0u64;
    let mut serving = forge_fake_teacher::Serving::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().and_then(|v| v.parse().ok()).expect("--port N"),
            "--latency-ms" => latency = args.next().and_then(|v| v.parse().ok()).expect("--latency-ms N"),
            "--slots" => serving.slots = Some(args.next().and_then(|v| v.parse().ok()).expect("--slots N")),
            "--advertise-slots" => serving.advertise_slots = true,
            _ => {
                eprintln!("usage: forge-fake-teacher [--port P] [--latency-ms MS] [--slots N] [--advertise-slots]");
                std::process::exit(2);
            }
        }
    }
    let faults = forge_fake_teacher::Faults { latency: Duration::from_millis(latency), ..Default::default() };
    let server = forge_fake_teacher::FakeTeacher::bind_with(
        &format!("127.0.0.1:{port}"),
        faults,
        serving,
        std::sync::Arc::new(forge_fake_teacher::default_answer),
    )
    .expect("bind");
    println!("{}", server.base_url());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    eprintln!(
        "received {} requests, answered {}, cancelled {}",
        server.received(),
        server.answered(),
        server.cancelled()
    );
}
