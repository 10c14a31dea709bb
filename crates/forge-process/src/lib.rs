//! Child processes that cannot outlive forge.
//!
//! Every program forge runs — a `command` stage, a `command` verifier, a quantizer — goes
//! through [`run`]: it starts in its own process group, which is killed as a whole (the program
//! and anything it started) on timeout or cancellation, and on Linux it gets `SIGKILL` when
//! forge itself dies (`PR_SET_PDEATHSIG`), so a killed build leaves no writer behind. Input is
//! written and output read on threads, so a child that ignores its stdin or fills a pipe cannot
//! deadlock forge, and captured output is capped.

use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How to run a child.
#[derive(Default)]
pub struct Options<'a> {
    /// Killed (with its group) after this long.
    pub timeout: Option<Duration>,
    /// Polled while the child runs; `true` kills it.
    pub cancelled: Option<&'a (dyn Fn() -> bool + Sync)>,
    /// Written to the child's stdin (then closed). Without it stdin is whatever `cmd` says.
    pub stdin: Option<Vec<u8>>,
    /// Capture stdout and stderr, at most this many bytes of each (the rest is read and
    /// dropped). Without it they are whatever `cmd` says.
    pub capture: Option<usize>,
}

/// How a child ended.
#[derive(Debug)]
pub enum Ended {
    Exited(ExitStatus),
    /// Killed after running this long.
    TimedOut(Duration),
    Cancelled,
}

#[derive(Debug)]
pub struct Finished {
    pub ended: Ended,
    /// Captured output (empty unless [`Options::capture`]).
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Puts `cmd` in its own process group and, on Linux, ties it to forge's life.
pub fn contain(cmd: &mut Command) {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// Runs `cmd` contained (see [`contain`]) and waits for it within `opts`. `Err` only when it
/// cannot be started or waited for.
pub fn run(cmd: &mut Command, opts: Options<'_>) -> std::io::Result<Finished> {
    contain(cmd);
    if opts.stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    if opts.capture.is_some() {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    let mut child = cmd.spawn()?;
    let writer = opts.stdin.map(|body| {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        // A child may exit without reading its input: a broken pipe is not an error.
        std::thread::spawn(move || drop(stdin.write_all(&body)))
    });
    let readers = opts.capture.map(|cap| {
        let read = |pipe: Box<dyn Read + Send>| std::thread::spawn(move || drain(pipe, cap));
        (
            read(Box::new(child.stdout.take().expect("stdout is piped"))),
            read(Box::new(child.stderr.take().expect("stderr is piped"))),
        )
    });
    let started = Instant::now();
    let ended = loop {
        if let Some(status) = child.try_wait()? {
            break Ended::Exited(status);
        }
        if opts.cancelled.is_some_and(|c| c()) {
            kill_group(&mut child);
            break Ended::Cancelled;
        }
        if opts.timeout.is_some_and(|t| started.elapsed() > t) {
            kill_group(&mut child);
            break Ended::TimedOut(started.elapsed());
        }
        // Short children are noticed at once; long ones are polled every 50 ms at most.
        std::thread::sleep((started.elapsed() / 4).clamp(Duration::from_millis(1), Duration::from_millis(50)));
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let (stdout, stderr) = match readers {
        Some((out, err)) => (out.join().unwrap_or_default(), err.join().unwrap_or_default()),
        None => (Vec::new(), Vec::new()),
    };
    Ok(Finished { ended, stdout, stderr })
}

/// Reads `pipe` to its end, keeping the first `cap` bytes.
fn drain(mut pipe: Box<dyn Read + Send>, cap: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let _ = pipe.by_ref().take(cap as u64).read_to_end(&mut kept);
    let _ = std::io::copy(&mut pipe, &mut std::io::sink());
    kept
}

fn kill_group(child: &mut Child) {
    #[cfg(unix)]
    // SAFETY: kill(2) on the child's own process group, which `contain` created.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// How a process that did not succeed ended: "exited with status 3", "was killed by signal 9".
pub fn how_it_ended(status: &ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("was killed by signal {sig}");
        }
    }
    format!("failed ({status})")
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn captures_output_and_feeds_input() {
        let f = run(
            &mut sh("cat; echo err >&2; exit 3"),
            Options { stdin: Some(b"hello".to_vec()), capture: Some(1 << 20), ..Options::default() },
        )
        .unwrap();
        assert!(matches!(&f.ended, Ended::Exited(s) if s.code() == Some(3)), "{f:?}");
        assert_eq!((f.stdout.as_slice(), f.stderr.as_slice()), (&b"hello"[..], &b"err\n"[..]));
        let Ended::Exited(s) = f.ended else { unreachable!() };
        assert_eq!(how_it_ended(&s), "exited with status 3");
    }

    #[test]
    fn capture_is_capped_and_a_flood_cannot_block() {
        let f =
            run(&mut sh("head -c 3000000 /dev/zero"), Options { capture: Some(1000), ..Options::default() }).unwrap();
        assert!(matches!(f.ended, Ended::Exited(s) if s.success()));
        assert_eq!(f.stdout.len(), 1000);
    }

    /// The whole group dies: a grandchild that would outlive a plain `kill` is gone too.
    #[test]
    fn a_timeout_kills_the_group() {
        let dir = std::env::temp_dir().join(format!("forge-process-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("grandchild-survived");
        let script = format!("(sleep 1; touch {}) & sleep 30", marker.display());
        let started = Instant::now();
        let f =
            run(&mut sh(&script), Options { timeout: Some(Duration::from_millis(200)), ..Options::default() }).unwrap();
        assert!(matches!(f.ended, Ended::TimedOut(_)), "{f:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(!marker.exists(), "the grandchild outlived the timeout");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn cancellation_kills_it() {
        let t = Instant::now();
        let cancel = move || t.elapsed() > Duration::from_millis(100);
        let f = run(&mut sh("sleep 30"), Options { cancelled: Some(&cancel), ..Options::default() }).unwrap();
        assert!(matches!(f.ended, Ended::Cancelled));
    }

    /// Hostile testing: `command` verifiers were not contained like command stages, so they
    /// outlived a killed forge. This test runs itself as the parent, kills it with SIGKILL, and
    /// watches the contained child die with it.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_contained_child_dies_with_its_parent() {
        if let Ok(pidfile) = std::env::var("FORGE_PROCESS_TEST_PARENT") {
            let _ = run(
                &mut sh(&format!("echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 30")),
                Options::default(),
            );
            return;
        }
        let pidfile = std::env::temp_dir().join(format!("forge-process-parent-{}", std::process::id()));
        let _ = std::fs::remove_file(&pidfile);
        let mut parent = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tests::a_contained_child_dies_with_its_parent", "--test-threads=1"])
            .env("FORGE_PROCESS_TEST_PARENT", &pidfile)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let pid = loop {
            if let Ok(s) = std::fs::read_to_string(&pidfile) {
                break s.trim().to_string();
            }
            assert!(Instant::now() < deadline, "the child never started");
            std::thread::sleep(Duration::from_millis(10));
        };
        parent.kill().unwrap();
        parent.wait().unwrap();
        // Gone, or a zombie waiting for init to reap it: either way it runs no more.
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive() {
            assert!(Instant::now() < deadline, "the contained child {pid} outlived its parent");
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&pidfile);
    }

    #[test]
    fn a_missing_program_is_an_error() {
        assert!(run(&mut Command::new("/nonexistent/forge-test"), Options::default()).is_err());
    }
}
