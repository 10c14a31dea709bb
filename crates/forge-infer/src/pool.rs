//! forge's decoder thread pool: the caller plus `threads - 1` workers.

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `state`: the pass number (high 32 bits), closed (bit 31), how many workers joined.
const CLOSED: u64 = 1 << 31;
const JOINED: u64 = CLOSED - 1;
/// A waiting worker spins this long, then yields this long, then sleeps.
const SPIN: Duration = Duration::from_micros(50);
const YIELD: Duration = Duration::from_micros(500);

type Job = *const (dyn Fn() + Sync + 'static);

struct Shared {
    state: AtomicU64,
    left: AtomicU32,
    /// The pass's work, set before its number is published, cleared after every worker
    /// that joined it has left.
    job: UnsafeCell<Option<Job>>,
    parked: Box<[AtomicBool]>,
    stop: AtomicBool,
    panicked: AtomicBool,
}

// SAFETY: `job` is written only by the dispatcher while no worker may read it (see `run`).
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// The last pass's number; locked while a pass runs.
    pass: Mutex<u32>,
}

impl Pool {
    pub fn new(threads: usize) -> Pool {
        let n = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            left: AtomicU32::new(0),
            job: UnsafeCell::new(None),
            parked: (0..n).map(|_| AtomicBool::new(false)).collect(),
            stop: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
        });
        let workers = (0..n)
            .map(|id| {
                let sh = shared.clone();
                std::thread::Builder::new()
                    .name(format!("forge-decode-{}", id + 1))
                    .spawn(move || worker(&sh, id))
                    .expect("spawning a decoder thread")
            })
            .collect();
        Pool { shared, workers, pass: Mutex::new(0) }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f` on this thread and on every worker that picks the pass up before this
    /// thread's own call returns; `f` must share its work out (a shared cursor), since any
    /// number of workers, even none, may join. Returns when all that joined are done.
    pub fn run(&self, f: &(dyn Fn() + Sync)) {
        if self.workers.is_empty() {
            return f();
        }
        // Another thread mid-pass (two generations on one model): do it alone.
        let Ok(mut pass) = self.pass.try_lock() else { return f() };
        let sh = &*self.shared;
        *pass = pass.wrapping_add(1).max(1);
        // SAFETY: no worker reads `job` before it joins this pass, which needs the state
        // stored below; the lifetime is erased only until every joined worker has left.
        unsafe {
            *sh.job.get() = Some(std::mem::transmute::<*const (dyn Fn() + Sync + '_), Job>(f as *const _));
        }
        sh.left.store(0, Relaxed);
        sh.state.store((*pass as u64) << 32, SeqCst);
        for (w, parked) in self.workers.iter().zip(sh.parked.iter()) {
            if parked.swap(false, SeqCst) {
                w.thread().unpark();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(f));
        let joined = (sh.state.fetch_or(CLOSED, SeqCst) & JOINED) as u32;
        let t0 = Instant::now();
        let mut spins = 0u32;
        while sh.left.load(Acquire) != joined {
            spins += 1;
            if spins < 64 || t0.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: every worker that joined has left; no other may join a closed pass.
        unsafe { *sh.job.get() = None };
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if sh.panicked.swap(false, SeqCst) {
            panic!("a decoder thread panicked");
        }
    }
}

fn worker(sh: &Shared, id: usize) {
    let mut seen = 0u32;
    loop {
        // Wait for a new pass.
        let t0 = Instant::now();
        let mut spins = 0u32;
        let pass = loop {
            let p = (sh.state.load(Acquire) >> 32) as u32;
            if p != seen {
                break p;
            }
            if sh.stop.load(Relaxed) {
                return;
            }
            spins += 1;
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            let waited = t0.elapsed();
            if waited < SPIN {
                std::hint::spin_loop();
            } else if waited < YIELD {
                std::thread::yield_now();
            } else {
                sh.parked[id].store(true, SeqCst);
                if (sh.state.load(SeqCst) >> 32) as u32 == seen && !sh.stop.load(SeqCst) {
                    std::thread::park();
                }
                sh.parked[id].store(false, SeqCst);
            }
        };
        seen = pass;
        // Join it unless it is already closed.
        let mut s = sh.state.load(Acquire);
        while (s >> 32) as u32 == pass && s & CLOSED == 0 {
            match sh.state.compare_exchange_weak(s, s + 1, AcqRel, Acquire) {
                Ok(_) => {
                    // SAFETY: joined an open pass: its job stays valid until we leave.
                    let job = unsafe { (*sh.job.get()).expect("an open pass has a job") };
                    if catch_unwind(AssertUnwindSafe(|| unsafe { (*job)() })).is_err() {
                        sh.panicked.store(true, SeqCst);
                    }
                    sh.left.fetch_add(1, Release);
                    break;
                }
                Err(now) => s = now,
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        for w in &self.workers {
            w.thread().unpark();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
